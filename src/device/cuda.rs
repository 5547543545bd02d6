//! The CUDA backend: probing the driver and NVRTC (both loaded at run time,
//! so nothing here needs CUDA to build), one context and stream per device,
//! kernels compiled by NVRTC at first use for the device's own architecture
//! and cached on disk, and a caching allocator whose live bytes count into
//! the same [`MemCounter`] as the CPU backend's.

use std::collections::HashMap;
use std::ffi::c_void;
use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, LaunchConfig};
use cudarc::nvrtc::{self, CompileError, CompileOptions, Ptx};
use md5::{Digest, Md5};

pub use super::launch::{Ints, KernelArg, KernelValue, Launcher, View, ViewMut};
use super::MemCounter;

/// Helpers every kernel file sees, prepended at compile time.
pub const COMMON: &str = include_str!("../../kernels/common.cuh");

/// Every kernel file, by module name (`kernels/<name>.cu`).
pub const KERNEL_FILES: &[(&str, &str)] = &[
    ("elementwise", include_str!("../../kernels/elementwise.cu")),
    ("reduce", include_str!("../../kernels/reduce.cu")),
    ("shape", include_str!("../../kernels/shape.cu")),
    ("matmul", include_str!("../../kernels/matmul.cu")),
    ("optim", include_str!("../../kernels/optim.cu")),
    ("gaussian", include_str!("../../kernels/gaussian.cu")),
    ("norm", include_str!("../../kernels/norm.cu")),
    ("gru", include_str!("../../kernels/gru.cu")),
    ("pool", include_str!("../../kernels/pool.cu")),
    ("resize", include_str!("../../kernels/resize.cu")),
    ("loss", include_str!("../../kernels/loss.cu")),
    ("conv", include_str!("../../kernels/conv.cu")),
    ("sampler", include_str!("../../kernels/sampler.cu")),
];

/// Threads per block of the one-dimensional kernels and the block
/// reductions; kernels/common.cuh defines the same (a test checks).
pub const BLOCK: u32 = 256;

/// How to make NVRTC or the driver findable; part of every "not found" message.
const NVRTC_HINT: &str =
    "install the CUDA 13 toolkit, or `pip install --target DIR nvidia-cuda-nvrtc==13.*` \
                          and add DIR/nvidia/cu13/lib to LD_LIBRARY_PATH";
const DRIVER_HINT: &str = "install the NVIDIA driver (580 or newer, for CUDA 13) or run with --device cpu";

/// Whether NVRTC can be loaded; never panics.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen candidate library names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether the driver library can be loaded; never panics.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen candidate library names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// NVRTC's (major, minor) version; NVRTC must be present.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    ensure!(nvrtc_present(), "NVRTC (libnvrtc) not found: {NVRTC_HINT}");
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; the pointers are valid for the call.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| anyhow!("nvrtcVersion failed: {e:?}"))?;
    Ok((major, minor))
}

/// The driver's CUDA version as `major * 1000 + minor * 10`; the driver must be present.
fn driver_version() -> Result<i32> {
    let mut v = 0;
    // SAFETY: the library is present; the pointer is valid for the call.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(|e| anyhow!("cuDriverGetVersion failed: {e}"))?;
    Ok(v)
}

/// What a probe of one GPU found.
#[derive(Clone, Debug)]
pub struct CudaInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_bytes: usize,
    pub free_bytes: usize,
    /// The driver's CUDA version, e.g. 13000.
    pub driver_version: i32,
    pub nvrtc_version: (i32, i32),
}

impl CudaInfo {
    /// NVRTC's name of the device's architecture, e.g. `sm_90`.
    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.compute_capability.0, self.compute_capability.1)
    }
}

impl fmt::Display for CudaInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        write!(
            f,
            "cuda:{} {} (compute capability {}.{}, {:.1} GiB, {:.1} GiB free; driver CUDA {}.{}, NVRTC {}.{})",
            self.ordinal,
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            gib(self.total_bytes),
            gib(self.free_bytes),
            self.driver_version / 1000,
            (self.driver_version % 1000) / 10,
            self.nvrtc_version.0,
            self.nvrtc_version.1
        )
    }
}

/// Check the driver library, a device and NVRTC, in that order, and open a
/// context on GPU `ordinal`. The error names the missing piece and the fix.
fn open(ordinal: usize) -> Result<(Arc<CudaContext>, CudaInfo)> {
    ensure!(
        driver_present(),
        "no CUDA driver library (libcuda.so) found: {DRIVER_HINT}"
    );
    cudarc::driver::result::init()
        .map_err(|e| anyhow!("the CUDA driver is installed but failed to start ({e}); check `nvidia-smi`"))?;
    let count = CudaContext::device_count().map_err(|e| anyhow!("counting CUDA devices failed: {e}"))?;
    ensure!(
        count > 0,
        "the CUDA driver found no GPU; check `nvidia-smi` and CUDA_VISIBLE_DEVICES, or run with --device cpu"
    );
    ensure!(
        ordinal < count as usize,
        "GPU {ordinal} does not exist: the driver sees {count} GPU(s)"
    );
    let nvrtc_version = nvrtc_version()?;
    let driver_version = driver_version()?;
    ensure!(
        driver_version >= 13000,
        "the NVIDIA driver supports CUDA {}.{} but this build needs CUDA 13: {DRIVER_HINT}",
        driver_version / 1000,
        (driver_version % 1000) / 10
    );
    let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("opening a context on GPU {ordinal}: {e}"))?;
    let err = |e: cudarc::driver::DriverError| anyhow!("querying GPU {ordinal}: {e}");
    let (free_bytes, total_bytes) = ctx.mem_get_info().map_err(err)?;
    let info = CudaInfo {
        ordinal,
        name: ctx.name().map_err(err)?,
        compute_capability: ctx.compute_capability().map_err(err)?,
        total_bytes,
        free_bytes,
        driver_version,
        nvrtc_version,
    };
    Ok((ctx, info))
}

/// Probe GPU `ordinal` without keeping a device: what was found, or why not.
pub fn probe(ordinal: usize) -> Result<CudaInfo> {
    open(ordinal).map(|(_, info)| info)
}

/// Options every kernel is compiled with for `arch` (e.g. `sm_90`).
fn compile_options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()]
}

/// Compile one kernel file to PTX for `arch`; a compile error carries NVRTC's log.
pub fn compile(name: &str, source: &str, arch: &str) -> Result<String> {
    ensure!(nvrtc_present(), "NVRTC (libnvrtc) not found: {NVRTC_HINT}");
    let opts = CompileOptions {
        options: compile_options(arch),
        name: Some(format!("{name}.cu")),
        ..Default::default()
    };
    match nvrtc::compile_ptx_with_opts(format!("{COMMON}\n{source}"), opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(CompileError::CompileError { log, options, .. }) => bail!(
            "kernels/{name}.cu does not compile for {arch} (options {options:?}):\n{}",
            log.to_string_lossy().trim_end()
        ),
        Err(e) => bail!("NVRTC failed on kernels/{name}.cu for {arch}: {e}"),
    }
}

/// Where compiled PTX is kept: `$SACCADE_KERNEL_CACHE`, else the user's cache folder.
fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("SACCADE_KERNEL_CACHE") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("saccade").join("kernels"))
}

/// The on-disk PTX of one kernel file, keyed by a hash of everything that
/// changes the result: source, options, driver and NVRTC versions.
fn cached_compile(name: &str, source: &str, info: &CudaInfo) -> Result<String> {
    let arch = info.arch();
    let mut h = Md5::new();
    for part in [COMMON, source, &compile_options(&arch).join(" ")] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.update(format!("{} {:?}", info.driver_version, info.nvrtc_version).as_bytes());
    let key: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let path = cache_dir().map(|d| d.join(format!("{name}-{arch}-{key}.ptx")));
    if let Some(ptx) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        return Ok(ptx);
    }
    let ptx = compile(name, source, &arch)?;
    // A cache that cannot be written only costs a recompile next time.
    if let Some(p) = path {
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if p.parent().is_some_and(|d| std::fs::create_dir_all(d).is_ok())
            && std::fs::write(&tmp, &ptx).is_ok()
        {
            let _ = std::fs::rename(&tmp, &p);
        }
    }
    Ok(ptx)
}

/// Result of `saccade kernels check` for one file and architecture.
pub struct KernelCheck {
    pub file: &'static str,
    pub arch: String,
    /// NVRTC's log when the file does not compile.
    pub error: Option<String>,
}

/// Compile every kernel file for every architecture; needs NVRTC, no GPU.
pub fn check_kernels(archs: &[String]) -> Result<Vec<KernelCheck>> {
    ensure!(nvrtc_present(), "NVRTC (libnvrtc) not found: {NVRTC_HINT}");
    let mut out = Vec::new();
    for arch in archs {
        for &(file, src) in KERNEL_FILES {
            let error = compile(file, src, arch).err().map(|e| format!("{e:#}"));
            out.push(KernelCheck {
                file,
                arch: arch.clone(),
                error,
            });
        }
    }
    Ok(out)
}

/// Buffers are kept in size classes `2^k * {4, 5, 6, 7} / 4` so a freed
/// buffer serves any later request of its class (at most 25% slack).
fn size_class(n: usize) -> usize {
    if n <= 64 {
        return 64;
    }
    let top = usize::BITS - 1 - n.leading_zeros();
    let quarter = 1usize << (top - 2);
    n.div_ceil(quarter) * quarter
}

/// A GPU through the driver: context, stream, compiled kernels and the
/// caching allocator.
struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: CudaInfo,
    /// Free buffers by size class.
    pool: Mutex<HashMap<usize, Vec<CudaSlice<f32>>>>,
    /// Bytes held by the pool and by live tensors together.
    reserved: Mutex<usize>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
}

enum Backend {
    Gpu(Box<Gpu>),
    /// Host memory (at most `capacity` bytes live), and launches handed to
    /// the maker's [`Launcher`].
    Emulated {
        launcher: Box<Launcher>,
        capacity: usize,
    },
}

/// A buffer the GPU's memory cannot hold, even with the pool emptied.
#[derive(Debug)]
pub struct OutOfMemory {
    pub requested: usize,
    /// Bytes in live tensors.
    pub live: usize,
    /// What the driver reports free and in all.
    pub free: usize,
    pub total: usize,
}

impl fmt::Display for OutOfMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "out of GPU memory allocating {} bytes: {} bytes live in tensors, {} of {} bytes free",
            self.requested, self.live, self.free, self.total
        )
    }
}

impl std::error::Error for OutOfMemory {}

struct Inner {
    backend: Backend,
    /// Fill every new buffer with NaN so a kernel that skips an output shows.
    poison: AtomicBool,
    /// Scratch floats a chunked launcher (conv's) aims for per chunk.
    scratch_budget: AtomicUsize,
}

/// One GPU, or its emulation. Cloning shares the context, stream, kernels,
/// pool and counter.
#[derive(Clone)]
pub struct CudaDevice {
    pub(crate) mem: Arc<MemCounter>,
    inner: Arc<Inner>,
}

impl CudaDevice {
    /// Open GPU `ordinal`; the error says which piece is missing. Setting
    /// `SACCADE_CUDA_POISON=1` fills new buffers with NaN (tests).
    pub fn new(ordinal: usize) -> Result<CudaDevice> {
        let (ctx, info) = open(ordinal)?;
        // One stream orders every kernel, copy and free, so cudarc's
        // per-buffer events would only add work.
        // SAFETY: no buffer exists yet on this context from this process.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let poison = std::env::var("SACCADE_CUDA_POISON").is_ok_and(|v| v == "1");
        let gpu = Gpu {
            ctx,
            stream,
            info,
            pool: Mutex::new(HashMap::new()),
            reserved: Mutex::new(0),
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
        };
        Ok(CudaDevice::with(Backend::Gpu(Box::new(gpu)), poison))
    }

    /// A device whose memory is host memory, NaN when allocated (as
    /// unwritten GPU memory is garbage), and whose kernels `launcher` runs:
    /// the launchers' code runs unchanged, without a GPU.
    pub fn emulated(launcher: Box<Launcher>) -> CudaDevice {
        CudaDevice::emulated_with_capacity(launcher, usize::MAX)
    }

    /// [`CudaDevice::emulated`] with `capacity` bytes of memory: a larger
    /// allocation fails as on a full GPU ([`OutOfMemory`]).
    pub fn emulated_with_capacity(launcher: Box<Launcher>, capacity: usize) -> CudaDevice {
        CudaDevice::with(Backend::Emulated { launcher, capacity }, false)
    }

    fn with(backend: Backend, poison: bool) -> CudaDevice {
        CudaDevice {
            mem: Arc::new(MemCounter::default()),
            inner: Arc::new(Inner {
                backend,
                poison: AtomicBool::new(poison),
                scratch_budget: AtomicUsize::new(1 << 22),
            }),
        }
    }

    /// What the probe found; None on an emulated device.
    pub fn info(&self) -> Option<&CudaInfo> {
        self.gpu().map(|g| &g.info)
    }

    fn gpu(&self) -> Option<&Gpu> {
        match &self.inner.backend {
            Backend::Gpu(g) => Some(g),
            Backend::Emulated { .. } => None,
        }
    }

    /// Fill every new buffer with NaN from now on (or stop).
    pub fn set_poison(&self, on: bool) {
        self.inner.poison.store(on, Ordering::Relaxed);
    }

    /// Scratch floats a chunked launcher aims for per chunk (16 MiB; one
    /// image always fits).
    pub fn scratch_budget(&self) -> usize {
        self.inner.scratch_budget.load(Ordering::Relaxed)
    }

    /// Change the scratch budget: a tiny one makes small batches split into
    /// chunks, so that tests reach every chunking path on small shapes.
    pub fn set_scratch_budget(&self, floats: usize) {
        self.inner.scratch_budget.store(floats, Ordering::Relaxed);
    }

    /// Bytes this device holds: live tensors plus cached free buffers.
    pub fn reserved_bytes(&self) -> usize {
        match self.gpu() {
            Some(g) => *g.reserved.lock().unwrap(),
            None => self.mem.stats().live_bytes,
        }
    }

    /// The driver's (free, total) bytes of the GPU.
    pub fn mem_get_info(&self) -> Result<(usize, usize)> {
        let g = self
            .gpu()
            .ok_or_else(|| anyhow!("an emulated device has no driver memory"))?;
        g.ctx.mem_get_info().map_err(|e| anyhow!("cuMemGetInfo: {e}"))
    }

    /// Hand every cached free buffer back to the driver.
    pub fn empty_cache(&self) {
        let Some(g) = self.gpu() else { return };
        let freed: Vec<CudaSlice<f32>> = g.pool.lock().unwrap().drain().flat_map(|(_, v)| v).collect();
        *g.reserved.lock().unwrap() -= freed.iter().map(|s| s.len() * 4).sum::<usize>();
    }

    /// Wait for all queued work; surfaces asynchronous kernel errors.
    pub fn synchronize(&self) -> Result<()> {
        match self.gpu() {
            Some(g) => g.stream.synchronize().map_err(|e| anyhow!("CUDA stream: {e}")),
            None => Ok(()),
        }
    }

    /// A buffer of at least `n` floats: from the pool when its class has one,
    /// else from the driver (emptying the pool and retrying once on failure).
    fn raw_alloc(&self, g: &Gpu, n: usize) -> Result<CudaSlice<f32>> {
        let class = size_class(n);
        if let Some(s) = g.pool.lock().unwrap().get_mut(&class).and_then(|v| v.pop()) {
            return Ok(s);
        }
        // SAFETY: f32 has no invalid bit patterns; kernels write before reading.
        let fresh = || unsafe { g.stream.alloc::<f32>(class) };
        let slice = match fresh() {
            Ok(s) => s,
            Err(_) => {
                self.empty_cache();
                self.synchronize()?;
                fresh().map_err(|e| {
                    let (free, total) = self.mem_get_info().unwrap_or((0, 0));
                    anyhow::Error::new(OutOfMemory {
                        requested: class * 4,
                        live: self.mem.stats().live_bytes,
                        free,
                        total,
                    })
                    .context(format!("cuMemAlloc: {e}"))
                })?
            }
        };
        *g.reserved.lock().unwrap() += class * 4;
        Ok(slice)
    }

    /// Fails as a full GPU would when `n` more floats exceed the emulated
    /// device's capacity.
    fn emulated_room(&self, n: usize) -> Result<()> {
        if let Backend::Emulated { capacity, .. } = self.inner.backend {
            let live = self.mem.stats().live_bytes;
            let requested = n * 4;
            if live.saturating_add(requested) > capacity {
                let free = capacity.saturating_sub(live);
                return Err(OutOfMemory {
                    requested,
                    live,
                    free,
                    total: capacity,
                }
                .into());
            }
        }
        Ok(())
    }

    /// Storage for `n` floats whose contents the caller's kernel will write
    /// (NaN when poisoning is on).
    pub(crate) fn alloc(&self, n: usize) -> Result<CudaStorage> {
        let buf = match self.gpu() {
            Some(g) => Buf::Gpu(self.raw_alloc(g, n)?),
            None => {
                self.emulated_room(n)?;
                Buf::Host(vec![f32::NAN; n])
            }
        };
        let mut s = CudaStorage::new(buf, n, self.clone());
        if self.inner.poison.load(Ordering::Relaxed) {
            s.fill(f32::NAN)?;
        }
        Ok(s)
    }

    /// Copy host values into new storage.
    pub(crate) fn upload(&self, data: &[f32]) -> Result<CudaStorage> {
        let buf = match self.gpu() {
            None => {
                self.emulated_room(data.len())?;
                Buf::Host(data.to_vec())
            }
            Some(g) => {
                let mut slice = self.raw_alloc(g, data.len())?;
                if !data.is_empty() {
                    let mut view = slice.slice_mut(0..data.len());
                    g.stream
                        .memcpy_htod(data, &mut view)
                        .map_err(|e| anyhow!("copying {} values to the GPU: {e}", data.len()))?;
                }
                Buf::Gpu(slice)
            }
        };
        Ok(CudaStorage::new(buf, data.len(), self.clone()))
    }

    /// Queue `kernel` of `kernels/<module>.cu` over `cfg` with `args` (in
    /// the kernel's parameter order), or hand it to the emulation.
    pub(crate) fn launch(
        &self,
        module: &'static str,
        kernel: &'static str,
        cfg: LaunchConfig,
        args: &mut [KernelArg],
    ) -> Result<()> {
        let g = match &self.inner.backend {
            Backend::Emulated { launcher, .. } => return launcher(module, kernel, cfg, args),
            Backend::Gpu(g) => g,
        };
        let f = g.function(module, kernel)?;
        // cuLaunchKernel takes a pointer to each argument's value; a
        // buffer's value is its device address.
        let addresses: Vec<u64> = args
            .iter()
            .map(|a| match a {
                KernelArg::In(View::Gpu(v)) | KernelArg::InInt(View::Gpu(v)) => Ok(v.device_ptr(&g.stream).0),
                KernelArg::Out(ViewMut::Gpu(v)) => Ok(v.device_ptr(&g.stream).0),
                KernelArg::Value { .. } => Ok(0),
                _ => Err(anyhow!("internal: {module}::{kernel} given an emulated buffer")),
            })
            .collect::<Result<_>>()?;
        let mut params: Vec<*mut c_void> = args
            .iter()
            .zip(&addresses)
            .map(|(a, address)| match a {
                KernelArg::Value { bytes, .. } => bytes.as_ptr() as *mut c_void,
                _ => address as *const u64 as *mut c_void,
            })
            .collect();
        let err = |e| anyhow!("CUDA kernel {module}::{kernel}: {e}");
        g.ctx.bind_to_thread().map_err(err)?;
        // SAFETY: the arguments match the kernel's parameters in number,
        // order and type, and every buffer holds what the kernel indexes:
        // tests/kernel_emulation.rs runs every launcher through this same
        // argument list on an emulated device, which checks each launch
        // against the kernel's signature and each access against its buffer.
        // `params` and the values it points at outlive the call (the driver
        // copies them when queueing).
        unsafe {
            cudarc::driver::result::launch_kernel(
                f.cu_function(),
                cfg.grid_dim,
                cfg.block_dim,
                cfg.shared_mem_bytes,
                g.stream.cu_stream(),
                &mut params,
            )
        }
        .map_err(err)
    }
}

impl Gpu {
    /// The kernel `function` of `kernels/<module>.cu`, compiling and loading
    /// the module at first use.
    fn function(&self, module: &'static str, function: &'static str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().unwrap().get(&(module, function)) {
            return Ok(f.clone());
        }
        let m = self.module(module)?;
        let f = m
            .load_function(function)
            .map_err(|e| anyhow!("kernel {function} not found in kernels/{module}.cu: {e}"))?;
        self.functions
            .lock()
            .unwrap()
            .insert((module, function), f.clone());
        Ok(f)
    }

    fn module(&self, name: &'static str) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().unwrap();
        if let Some(m) = modules.get(name) {
            return Ok(m.clone());
        }
        let (_, source) = KERNEL_FILES
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| anyhow!("internal: no kernel file kernels/{name}.cu"))?;
        let ptx = cached_compile(name, source, &self.info)?;
        let m = self
            .ctx
            .load_module(Ptx::from_src(ptx))
            .map_err(|e| anyhow!("loading kernels/{name}.cu on {}: {e}", self.info.name))?;
        modules.insert(name, m.clone());
        Ok(m)
    }
}

impl fmt::Display for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.info() {
            Some(info) => write!(f, "{info}"),
            None => write!(f, "cuda (emulated)"),
        }
    }
}

impl fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A buffer of device storage.
enum Buf {
    Gpu(CudaSlice<f32>),
    /// An emulated device's memory.
    Host(Vec<f32>),
}

/// Device storage of one tensor: `len` floats at the start of a buffer; a
/// GPU buffer goes back to the pool when the storage drops.
pub struct CudaStorage {
    buf: Option<Buf>,
    len: usize,
    dev: CudaDevice,
}

impl CudaStorage {
    fn new(buf: Buf, len: usize, dev: CudaDevice) -> Self {
        dev.mem.alloc(len * 4);
        CudaStorage {
            buf: Some(buf),
            len,
            dev,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn buf(&self) -> &Buf {
        self.buf.as_ref().expect("buffer present until drop")
    }

    /// The values, as a kernel argument the kernel reads.
    pub(crate) fn slice(&self) -> View<'_> {
        self.view(0..self.len)
    }

    /// The values, as a kernel argument the kernel writes.
    pub(crate) fn slice_mut(&mut self) -> ViewMut<'_> {
        self.view_mut(0..self.len)
    }

    /// Elements `range` (one chunk of a batch), for reading.
    pub(crate) fn view(&self, range: Range<usize>) -> View<'_> {
        assert!(range.end <= self.len, "view {range:?} of {} elements", self.len);
        match self.buf() {
            Buf::Gpu(s) => View::Gpu(s.slice(range)),
            Buf::Host(v) => View::Host(&v[range]),
        }
    }

    /// Elements `range` (one chunk of a batch), for writing.
    pub(crate) fn view_mut(&mut self, range: Range<usize>) -> ViewMut<'_> {
        assert!(range.end <= self.len, "view {range:?} of {} elements", self.len);
        match self.buf.as_mut().expect("buffer present until drop") {
            Buf::Gpu(s) => ViewMut::Gpu(s.slice_mut(range)),
            Buf::Host(v) => ViewMut::Host(&mut v[range]),
        }
    }

    pub(crate) fn device(&self) -> CudaDevice {
        self.dev.clone()
    }

    pub(crate) fn counter(&self) -> &MemCounter {
        &self.dev.mem
    }

    /// Copy the values to the host (waits for the queued work).
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        if self.len == 0 {
            return Ok(Vec::new());
        }
        match (self.buf(), self.dev.gpu()) {
            (Buf::Gpu(s), Some(g)) => {
                let mut out = vec![0.0f32; self.len];
                g.stream
                    .memcpy_dtoh(&s.slice(0..self.len), &mut out)
                    .with_context(|| format!("copying {} values from the GPU", self.len))?;
                Ok(out)
            }
            (Buf::Host(v), _) => Ok(v.clone()),
            (Buf::Gpu(_), None) => bail!("internal: GPU storage on an emulated device"),
        }
    }
}

impl Drop for CudaStorage {
    fn drop(&mut self) {
        self.dev.mem.free(self.len * 4);
        if let (Some(Buf::Gpu(buf)), Some(g)) = (self.buf.take(), self.dev.gpu()) {
            // Later kernels on the same stream run after every earlier use,
            // so the buffer can be handed out again at once.
            g.pool.lock().unwrap().entry(buf.len()).or_default().push(buf);
        }
    }
}

/// Index maps of up to [`MAX_RANK`] axes passed to kernels by value
/// (mirrors `struct Dims` in kernels/common.cuh).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Dims {
    rank: i32,
    shape: [i32; MAX_RANK],
    sa: [i32; MAX_RANK],
    sb: [i32; MAX_RANK],
}

/// The most axes a [`Dims`] holds.
pub const MAX_RANK: usize = 8;

// SAFETY: plain `repr(C)` integers, laid out as the kernels' `struct Dims`.
unsafe impl KernelValue for Dims {
    const C_TYPE: &'static str = "Dims";
}

impl Dims {
    /// Output `shape` with the element strides `sa`, `sb` of two inputs.
    pub fn new(shape: &[usize], sa: &[usize], sb: &[usize]) -> Result<Dims> {
        ensure!(
            shape.len() <= MAX_RANK,
            "CUDA kernels take at most {MAX_RANK} axes, got shape {shape:?}"
        );
        let mut d = Dims {
            rank: shape.len() as i32,
            ..Dims::default()
        };
        for i in 0..shape.len() {
            d.shape[i] = shape[i] as i32;
            d.sa[i] = sa[i] as i32;
            d.sb[i] = sb[i] as i32;
        }
        Ok(d)
    }
}

/// A launch over `n` items, one thread each, `BLOCK` per block.
pub fn grid(n: usize) -> Result<LaunchConfig> {
    ensure!(
        n <= i32::MAX as usize,
        "{n} elements exceed the CUDA kernels' 32-bit indexing"
    );
    Ok(LaunchConfig {
        grid_dim: ((n as u32).div_ceil(BLOCK).max(1), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// `launch!(dev, "module", "kernel", cfg, arg, ...)`: launch `kernel` of
/// `kernels/<module>.cu` through [`CudaDevice::launch`]. Arguments are what
/// [`IntoKernelArg`] takes: views (`x.slice()`, `y.slice_mut()`, `&view`,
/// [`Ints`]) and references to values (`&(n as i32)`, `&dims`); they live
/// until the end of the one statement that launches.
macro_rules! launch {
    ($dev:expr, $module:literal, $kernel:literal, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        use $crate::device::launch::IntoKernelArg as _;
        let dev: &$crate::device::cuda::CudaDevice = $dev;
        dev.launch($module, $kernel, $cfg, &mut [$(($arg).into_kernel_arg()),+])?;
    }};
}
pub(crate) use launch;

impl CudaStorage {
    /// Set every element to `value` (kernels/elementwise.cu's `fill`).
    pub(crate) fn fill(&mut self, value: f32) -> Result<()> {
        let (dev, n) = (self.device(), self.len());
        launch!(
            &dev,
            "elementwise",
            "fill",
            grid(n)?,
            self.slice_mut(),
            &(n as i32),
            &value
        );
        Ok(())
    }

    /// `self + other` as new storage (`binary_forward` over one flat axis;
    /// op 0 is `ops::elementwise::Binary::Add`).
    pub(crate) fn add(&self, other: &CudaStorage) -> Result<CudaStorage> {
        let (dev, n) = (self.device(), self.len());
        ensure!(other.len() == n, "add: {n} and {} elements", other.len());
        let mut out = dev.alloc(n)?;
        let dims = Dims::new(&[n], &[1], &[1])?;
        launch!(
            &dev,
            "elementwise",
            "binary_forward",
            grid(n)?,
            self.slice(),
            other.slice(),
            out.slice_mut(),
            &(n as i32),
            &0i32,
            &dims
        );
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels size their shared arrays by common.cuh's BLOCK; launches
    /// use this one.
    #[test]
    fn block_matches_common_cuh() {
        let line = COMMON.lines().find(|l| l.starts_with("#define BLOCK "));
        assert_eq!(line, Some(format!("#define BLOCK {BLOCK}").as_str()));
    }

    #[test]
    fn size_classes_cover_requests_with_little_slack() {
        for n in [1, 63, 64, 65, 100, 1000, 4097, 1 << 20, (1 << 20) + 1, 123_457] {
            let c = size_class(n);
            assert!(c >= n && (c <= 64 || c * 4 <= n * 5 + 4 * (1 << 2)), "{n} -> {c}");
            assert_eq!(size_class(c), c, "class {c} is its own class");
        }
    }

    #[test]
    fn every_kernel_file_compiles_and_errors_show_the_nvrtc_log() {
        if !nvrtc_present() {
            println!("skipped: NVRTC not found ({NVRTC_HINT})");
            return;
        }
        let archs = ["sm_80".to_string()];
        for c in check_kernels(&archs).unwrap() {
            assert!(c.error.is_none(), "{}: {}", c.file, c.error.unwrap());
        }
        let src = "extern \"C\" __global__ void k(float* x) { x[0] = not_declared; }";
        let e = compile("broken", src, "sm_80").unwrap_err().to_string();
        assert!(
            e.contains("kernels/broken.cu") && e.contains("not_declared"),
            "{e}"
        );
    }

    #[test]
    fn probing_never_panics() {
        // Without CUDA this says which piece is missing; with it, what was found.
        match probe(0) {
            Ok(info) => assert!(info.arch().starts_with("sm_")),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
}
