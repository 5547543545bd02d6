//! Devices own tensor storage. Every allocation goes through a device, which
//! counts live and peak bytes in one [`MemCounter`]: all memory figures the
//! project reports come from here, and so does the per-op profile when one
//! is switched on.

pub mod cpu;
pub mod cuda;
pub mod launch;

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

pub use cpu::CpuDevice;
pub use cuda::CudaDevice;

use crate::profile::{Phase, Profile};

/// Live and peak bytes of tensor storage on one device, all bytes ever
/// allocated, and the device's profile once switched on.
#[derive(Debug, Default)]
pub struct MemCounter {
    live: AtomicUsize,
    peak: AtomicUsize,
    allocated: AtomicUsize,
    profile: OnceLock<Mutex<Profile>>,
}

impl MemCounter {
    pub(crate) fn alloc(&self, bytes: usize) {
        self.allocated.fetch_add(bytes, Ordering::Relaxed);
        let live = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(live, Ordering::Relaxed);
    }

    pub(crate) fn allocated(&self) -> usize {
        self.allocated.load(Ordering::Relaxed)
    }

    /// The profile, when profiling is on.
    pub(crate) fn profile(&self) -> Option<MutexGuard<'_, Profile>> {
        self.profile.get().map(|p| p.lock().unwrap())
    }

    pub(crate) fn free(&self, bytes: usize) {
        self.live.fetch_sub(bytes, Ordering::Relaxed);
    }

    pub fn stats(&self) -> MemStats {
        MemStats {
            live_bytes: self.live.load(Ordering::Relaxed),
            peak_bytes: self.peak.load(Ordering::Relaxed),
        }
    }

    /// Restart peak tracking from the bytes live now.
    pub fn reset_peak(&self) {
        self.peak
            .store(self.live.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

/// A snapshot of a [`MemCounter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemStats {
    pub live_bytes: usize,
    pub peak_bytes: usize,
}

/// What [`Device::cuda`] gives instead of opening a GPU, when set.
static CUDA_STAND_IN: Mutex<Option<CudaDevice>> = Mutex::new(None);

/// Make [`Device::cuda`] give `dev` in this process (`None`: open GPUs
/// again): tests run whole commands (`--device cuda`) on an emulated GPU.
pub fn set_cuda_stand_in(dev: Option<CudaDevice>) {
    *CUDA_STAND_IN.lock().unwrap_or_else(|e| e.into_inner()) = dev;
}

/// Where tensors live. Cloning a device is cheap and shares its counter.
#[derive(Clone)]
pub enum Device {
    Cpu(CpuDevice),
    Cuda(CudaDevice),
}

impl Device {
    /// A fresh CPU device with its own memory counter.
    pub fn cpu() -> Device {
        Device::Cpu(CpuDevice::new())
    }

    /// GPU `ordinal`, or an error naming the missing piece (driver
    /// library, device, NVRTC) and how to fix it.
    pub fn cuda(ordinal: usize) -> anyhow::Result<Device> {
        if let Some(dev) = CUDA_STAND_IN.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(Device::Cuda(dev));
        }
        CudaDevice::new(ordinal).map(Device::Cuda)
    }

    pub fn memory(&self) -> MemStats {
        self.counter().stats()
    }

    pub fn reset_peak(&self) {
        self.counter().reset_peak()
    }

    /// Record a per-op profile of the ops run on this device from now on.
    pub fn enable_profile(&self) {
        let c = self.counter();
        c.profile.get_or_init(|| Mutex::new(Profile::new(c.allocated())));
    }

    /// The profile so far (None unless enabled), restarting it empty.
    pub fn take_profile(&self) -> Option<Profile> {
        let c = self.counter();
        let fresh = Profile::new(c.allocated());
        c.profile().map(|mut p| std::mem::replace(&mut *p, fresh))
    }

    /// Start a lap of the profile now (e.g. at the start of a step).
    pub fn profile_mark(&self) {
        let c = self.counter();
        if let Some(mut p) = c.profile() {
            p.mark(c.allocated());
        }
    }

    /// Charge the time since the last profile event to `name` (work outside
    /// the tape, such as the optimizer).
    pub fn profile_lap(&self, name: &'static str) {
        let c = self.counter();
        if let Some(mut p) = c.profile() {
            p.lap(name, Phase::Forward, c.allocated());
        }
    }

    pub(crate) fn counter(&self) -> &Arc<MemCounter> {
        match self {
            Device::Cpu(d) => &d.mem,
            Device::Cuda(d) => &d.mem,
        }
    }

    /// Whether two handles refer to the same device (same counter).
    pub fn same(&self, other: &Device) -> bool {
        Arc::ptr_eq(self.counter(), other.counter())
    }
}

/// The device `--device auto` picks: the GPU when one is usable, else the
/// CPU. The string says which and why, in one line.
pub fn auto_device() -> (Device, String) {
    match Device::cuda(0) {
        Err(e) => (Device::cpu(), format!("device: cpu (no usable GPU: {e:#})")),
        Ok(gpu) => {
            let line = format!("device: {gpu}");
            (gpu, line)
        }
    }
}

/// What `saccade device` prints: the CPU, the GPU or why there is none,
/// and the NVRTC that compiles the kernels.
pub fn report() -> String {
    let mut out = format!("cpu: {} threads\n", rayon::current_num_threads());
    match cuda::probe(0) {
        Ok(info) => out += &format!("cuda: {info}\n"),
        Err(e) => out += &format!("cuda: not available: {e:#}\n"),
    }
    match cuda::nvrtc_version() {
        Ok((major, minor)) => out += &format!("nvrtc: {major}.{minor}\n"),
        Err(e) => out += &format!("nvrtc: {e:#}\n"),
    }
    out
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu(_) => write!(f, "cpu ({} threads)", rayon::current_num_threads()),
            Device::Cuda(d) => write!(f, "{d}"),
        }
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
