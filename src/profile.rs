//! A per-op profile of the work recorded on one device: for each op kind,
//! calls, forward and backward wall time, bytes of tensor storage allocated,
//! and an estimate of the FLOPs and bytes moved, to compare with the
//! machine's limits. A device holds one only once profiling is switched on
//! ([`Device::enable_profile`](crate::Device::enable_profile)); until then
//! recording an op costs one atomic load more.
//!
//! Times are laps of one clock: an op's forward time is the time since the
//! previous event on the device (so glue code between two ops counts towards
//! the second), and its backward time covers its backward closure plus the
//! accumulation of the gradients it returns. On a GPU these are launch times,
//! not kernel times.

use std::collections::HashMap;
use std::fmt::Write;
use std::time::{Duration, Instant};

/// Sums over every call of one op kind.
#[derive(Clone, Debug, Default)]
pub struct OpStats {
    pub calls: usize,
    pub fwd: Duration,
    pub bwd: Duration,
    /// Bytes of tensor storage allocated during the forward, the backward.
    pub fwd_alloc: usize,
    pub bwd_alloc: usize,
    /// Estimated multiply-adds times two (GEMM-shaped ops only), forward
    /// and backward.
    pub flops: f64,
    /// Estimated bytes read and written, forward and backward.
    pub bytes: f64,
}

/// Which half of the step an event belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Forward,
    Backward,
}

#[derive(Debug)]
pub struct Profile {
    pub ops: HashMap<&'static str, OpStats>,
    last: Instant,
    last_alloc: usize,
}

impl Profile {
    pub(crate) fn new(allocated: usize) -> Self {
        Profile {
            ops: HashMap::new(),
            last: Instant::now(),
            last_alloc: allocated,
        }
    }

    /// Start the next lap now, attributing the time since the last event to
    /// nothing.
    pub(crate) fn mark(&mut self, allocated: usize) {
        self.last = Instant::now();
        self.last_alloc = allocated;
    }

    /// Charge the lap since the last event to `name`'s `phase`.
    pub(crate) fn lap(&mut self, name: &'static str, phase: Phase, allocated: usize) -> &mut OpStats {
        let now = Instant::now();
        let (dt, da) = (now - self.last, allocated - self.last_alloc);
        self.mark(allocated);
        let s = self.ops.entry(name).or_default();
        match phase {
            Phase::Forward => {
                s.calls += 1;
                s.fwd += dt;
                s.fwd_alloc += da;
            }
            Phase::Backward => {
                s.bwd += dt;
                s.bwd_alloc += da;
            }
        }
        s
    }

    /// The stats as a Markdown table, per step over `steps` steps, sorted by
    /// time. `gflops` and `gbytes` are the machine's limits (per second);
    /// "× limit" is the time over what the slower of the two limits allows.
    pub fn table(&self, steps: usize, gflops: f64, gbytes: f64) -> String {
        let per = 1.0 / steps.max(1) as f64;
        let total: f64 = self.ops.values().map(|s| (s.fwd + s.bwd).as_secs_f64()).sum();
        let mut rows: Vec<_> = self.ops.iter().collect();
        rows.sort_by(|a, b| (b.1.fwd + b.1.bwd).cmp(&(a.1.fwd + a.1.bwd)).then(a.0.cmp(b.0)));
        let mut s = format!(
            "step: {:.1} ms over {} op kinds; limits: GEMM {gflops:.0} GFLOP/s, memory {gbytes:.1} GB/s\n\n\
             | op | calls | forward ms | backward ms | share | MiB allocated | GFLOP | GB moved | achieved | × limit |\n\
             |---|---|---|---|---|---|---|---|---|---|\n",
            1e3 * total * per,
            rows.len()
        );
        for (name, o) in rows {
            let t = (o.fwd + o.bwd).as_secs_f64();
            let (flops, bytes) = (o.flops * per, o.bytes * per);
            let floor = (flops / (gflops * 1e9)).max(bytes / (gbytes * 1e9));
            let achieved = if o.flops > 0.0 {
                format!("{:.1} GFLOP/s", o.flops / t / 1e9)
            } else if o.bytes > 0.0 {
                format!("{:.1} GB/s", o.bytes / t / 1e9)
            } else {
                "-".into()
            };
            let over = if floor > 0.0 {
                format!("{:.0}", t * per / floor)
            } else {
                "-".into()
            };
            let _ = writeln!(
                s,
                "| {name} | {:.0} | {:.2} | {:.2} | {:.1}% | {:.1} | {:.3} | {:.3} | {achieved} | {over} |",
                o.calls as f64 * per,
                1e3 * o.fwd.as_secs_f64() * per,
                1e3 * o.bwd.as_secs_f64() * per,
                100.0 * t / total.max(f64::MIN_POSITIVE),
                (o.fwd_alloc + o.bwd_alloc) as f64 * per / (1 << 20) as f64,
                flops / 1e9,
                bytes / 1e9,
            );
        }
        s
    }
}

/// The op name of a backward closure's type, e.g.
/// `saccade::ops::conv::<impl saccade::autograd::Graph>::conv2d::{{closure}}`
/// gives `conv2d`.
pub(crate) fn op_name(closure_type: &'static str) -> &'static str {
    let mut s = closure_type;
    while let Some(t) = s.strip_suffix("::{{closure}}") {
        s = t;
    }
    s.rsplit("::").next().unwrap_or(s)
}

/// Estimated (FLOPs, bytes moved) of one call of op `name`, forward plus
/// backward, from the shapes of its inputs and output. FLOPs are counted
/// for the GEMM-shaped ops only (the backward doing twice the forward's);
/// bytes assume each input and the output are read or written once forward
/// and twice backward.
pub(crate) fn op_cost(name: &str, inputs: &[&[usize]], out: &[usize]) -> (f64, f64) {
    let numel = |s: &[usize]| s.iter().product::<usize>() as f64;
    let moved: f64 = inputs.iter().map(|s| numel(s)).sum::<f64>() + numel(out);
    // Multiply-adds per output element (or per input element, transposed).
    let per = |w: &[usize]| numel(w) / w.first().copied().unwrap_or(1).max(1) as f64;
    let fwd = match (name, inputs) {
        ("conv2d" | "linear", [_, w, ..]) => 2.0 * numel(out) * per(w),
        ("conv_transpose2d", [x, w, ..]) => 2.0 * numel(x) * per(w),
        ("matmul", [a, ..]) => 2.0 * numel(out) * a.last().copied().unwrap_or(0) as f64,
        ("gru_cell", [x, h, ..]) => 2.0 * 3.0 * numel(h) * (x[x.len() - 1] + h[h.len() - 1]) as f64,
        _ => 0.0,
    };
    (3.0 * fwd, 3.0 * 4.0 * moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_names_come_from_closure_types() {
        assert_eq!(
            op_name("saccade::ops::conv::<impl saccade::autograd::Graph>::conv2d::{{closure}}"),
            "conv2d"
        );
        assert_eq!(op_name("a::b::{{closure}}::{{closure}}"), "b");
        assert_eq!(op_name("plain"), "plain");
    }

    #[test]
    fn gemm_ops_count_flops_others_bytes() {
        let (f, b) = op_cost("conv2d", &[&[2, 3, 8, 8], &[4, 3, 3, 3]], &[2, 4, 8, 8]);
        assert_eq!(f, 3.0 * 2.0 * (2 * 4 * 64) as f64 * 27.0);
        assert!(b > 0.0);
        assert_eq!(op_cost("elu", &[&[10]], &[10]), (0.0, 3.0 * 4.0 * 20.0));
    }

    #[test]
    fn laps_charge_the_named_op() {
        let mut p = Profile::new(0);
        p.lap("a", Phase::Forward, 100);
        p.lap("a", Phase::Backward, 150);
        let a = &p.ops["a"];
        assert_eq!((a.calls, a.fwd_alloc, a.bwd_alloc), (1, 100, 50));
        assert!(p.table(1, 100.0, 10.0).contains("| a | 1 |"));
    }
}
