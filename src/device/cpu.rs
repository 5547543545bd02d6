//! The CPU reference backend: storage with byte accounting, a pool of
//! freed buffers, and the GEMM every matmul and convolution on the CPU goes
//! through.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::MemCounter;

/// Host memory. Cloning shares the counter and the buffer pool.
#[derive(Clone, Debug, Default)]
pub struct CpuDevice {
    pub(crate) mem: Arc<MemCounter>,
    pool: Arc<Mutex<Pool>>,
}

/// The pool keeps freed buffers while live tensor bytes plus pooled bytes
/// stay within the peak of live bytes (or this floor, below which pooling
/// never matters): a training loop reuses its buffers step after step, and
/// the process holds no more than its peak. A fixed cap of 1 GiB made the
/// tiled ResNet18 at 2528² (9.2 GiB live at its peak) take most of its
/// buffers fresh from the system every step: 13.5 s a step against 11.0 s.
const POOL_MIN_BYTES: usize = if cfg!(test) { 1 << 20 } else { 256 << 20 };

/// Freed buffers by exact length. A training step allocates the same shapes
/// every step, so from the second step on nearly every tensor reuses one:
/// no page faults, no zero-filling, no unmapping (which made about a fifth
/// of a step's time before the pool). Pooled bytes are not live tensor
/// bytes, so the memory counter does not see them.
#[derive(Debug, Default)]
struct Pool {
    free: HashMap<usize, Vec<Vec<f32>>>,
    bytes: usize,
}

impl Pool {
    /// Take buffers of any length out of the pool until `bytes` are freed
    /// (or the pool is empty); the caller drops them outside the lock.
    fn evict(&mut self, bytes: usize) -> Vec<Vec<f32>> {
        let (mut out, mut freed) = (Vec::new(), 0);
        for list in self.free.values_mut() {
            while freed < bytes {
                let Some(v) = list.pop() else { break };
                freed += v.capacity() * 4;
                out.push(v);
            }
        }
        self.bytes -= freed;
        out
    }
}

impl CpuDevice {
    pub fn new() -> Self {
        Self::default()
    }

    /// `n` floats to be overwritten entirely: a pooled buffer (holding stale
    /// values) when one of that length is free, else a zeroed one, after
    /// evicting pooled buffers that would take the process past its peak.
    pub(crate) fn buffer(&self, n: usize) -> Vec<f32> {
        let mut p = self.pool.lock().unwrap();
        if let Some(v) = p.free.get_mut(&n).and_then(Vec::pop) {
            p.bytes -= v.capacity() * 4;
            return v;
        }
        let excess = (self.in_use(&p) + n * 4).saturating_sub(self.bound());
        let evicted = p.evict(excess);
        drop(p);
        drop(evicted);
        vec![0.0; n]
    }

    /// Live tensor bytes plus pooled bytes.
    fn in_use(&self, p: &Pool) -> usize {
        self.mem.stats().live_bytes + p.bytes
    }

    /// What [`CpuDevice::in_use`] may reach before the pool gives memory back.
    fn bound(&self) -> usize {
        self.mem.stats().peak_bytes.max(POOL_MIN_BYTES)
    }

    /// `n` zeros, in a pooled buffer when one is free.
    pub(crate) fn zeros(&self, n: usize) -> Vec<f32> {
        let mut v = self.buffer(n);
        v.fill(0.0);
        v
    }

    /// Hand a buffer back for reuse (scratch space; storage does it on drop).
    pub(crate) fn recycle(&self, v: Vec<f32>) {
        let bytes = v.capacity() * 4;
        let mut p = self.pool.lock().unwrap();
        if v.is_empty() || self.in_use(&p) + bytes > self.bound() {
            return;
        }
        p.bytes += bytes;
        p.free.entry(v.len()).or_default().push(v);
    }
}

/// Host storage of one tensor; its bytes count as live until it drops, and
/// then its buffer goes back to the device's pool.
pub struct CpuStorage {
    data: Vec<f32>,
    dev: CpuDevice,
}

impl CpuStorage {
    pub(crate) fn new(data: Vec<f32>, dev: CpuDevice) -> Self {
        dev.mem.alloc(data.len() * 4);
        CpuStorage { data, dev }
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub(crate) fn counter(&self) -> &MemCounter {
        &self.dev.mem
    }

    pub(crate) fn device(&self) -> &CpuDevice {
        &self.dev
    }
}

impl Drop for CpuStorage {
    fn drop(&mut self) {
        self.dev.mem.free(self.data.len() * 4);
        self.dev.recycle(std::mem::take(&mut self.data));
    }
}

/// Row-major matrix operand: `data` is `rows x cols` unless `trans`, in which
/// case the stored matrix is `cols x rows` and is read transposed.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub trans: bool,
}

impl<'a> Mat<'a> {
    pub fn n(data: &'a [f32]) -> Self {
        Mat { data, trans: false }
    }
    pub fn t(data: &'a [f32]) -> Self {
        Mat { data, trans: true }
    }
}

/// `c (m x n) = a (m x k) * b (k x n) + (accumulate ? c : 0)`, row-major.
/// Threads with rayon above a size where it pays.
pub fn sgemm(m: usize, n: usize, k: usize, a: Mat, b: Mat, c: &mut [f32], accumulate: bool) {
    assert!(a.data.len() >= m * k && b.data.len() >= k * n && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    // gemm takes (column stride, row stride) per operand.
    let (a_cs, a_rs) = if a.trans { (m as isize, 1) } else { (1, k as isize) };
    let (b_cs, b_rs) = if b.trans { (k as isize, 1) } else { (1, n as isize) };
    // Threads from 4 MFLOP (about 70 us on one AVX2 core): below it, waking
    // the other threads costs more than they save. At 256 kFLOP the default
    // step's 32-row VRNN products were threaded, and the step took 1.10x as
    // long (6 alternated rounds, 2-core AVX2 EPYC; 1 MFLOP: 1.12x).
    let flops = 2 * m * n * k;
    let par = if flops >= 1 << 22 && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above bound every index gemm derives from
    // (m, n, k) and the strides, which describe dense storage.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], ta: bool, b: &[f32], tb: bool) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for p in 0..k {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                    s += av * bv;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    #[test]
    fn sgemm_matches_naive_loop_for_all_transposes() {
        let (m, n, k) = (7, 5, 9);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let want = naive(m, n, k, &a, ta, &b, tb);
            let mut c = vec![1.0; m * n];
            let am = Mat { data: &a, trans: ta };
            let bm = Mat { data: &b, trans: tb };
            sgemm(m, n, k, am, bm, &mut c, false);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-4, "{ta} {tb}: {x} vs {y}");
            }
            sgemm(m, n, k, am, bm, &mut c, true);
            for (x, y) in c.iter().zip(&want) {
                assert!((x - 2.0 * y).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn the_pool_never_takes_the_process_past_its_peak() {
        let dev = CpuDevice::new();
        let mb = (1 << 20) / 4;
        // A step's tensors: 3 MiB live at the peak, then freed into the pool.
        let tensors: Vec<CpuStorage> = (0..3)
            .map(|_| CpuStorage::new(dev.buffer(mb), dev.clone()))
            .collect();
        drop(tensors);
        let pooled = dev.pool.lock().unwrap().bytes;
        assert_eq!(pooled, 3 << 20, "a steady loop reuses every buffer");
        // The same shape again comes from the pool.
        let again = CpuStorage::new(dev.buffer(mb), dev.clone());
        assert_eq!(dev.pool.lock().unwrap().bytes, 2 << 20);
        // A new shape evicts pooled buffers rather than grow past the peak.
        let other = CpuStorage::new(dev.buffer(mb / 2), dev.clone());
        let p = dev.pool.lock().unwrap();
        let (in_use, pooled) = (dev.in_use(&p), p.bytes);
        drop(p);
        assert!(in_use <= 3 << 20, "live + pooled {in_use} exceeds the 3 MiB peak");
        assert_eq!(pooled, 1 << 20, "one pooled buffer evicted, one kept");
        drop((again, other));
    }
}
