//! Runs the CUDA kernels on the CPU: every kernel file is compiled as C++ by
//! g++ together with `cuda_emu.h` (the CUDA keywords and built-ins mapped onto
//! plain C++) and `cuda_emu.cpp` (a scheduler that runs the threads of a block
//! as fibers switching at barriers), into one shared library per file, cached
//! under `target/tmp/kernel-emulation/` by a hash of everything that goes in.
//!
//! [`Emu::device`] makes an emulated `CudaDevice` whose launches (every
//! `launch!` of the engine's launchers, with its grid and argument list) go
//! to [`Emu::run`], which runs the kernel by file and name. On top of what a
//! GPU would do it checks that the argument types match the kernel's
//! parameters (`int` vs `long long`, `const float*` for `slice()` and
//! `float*` for `slice_mut()`), that the launch fits the hardware limits, that
//! no kernel writes outside its buffers (each is copied between NaN guard
//! zones; a read outside gives NaN), and that every barrier is reached by
//! every thread of its block or warp. [`Emu::launch`] runs a kernel by hand
//! (the emulator's own tests).
//! (Shared by kernel_emulation.rs and emulated.rs, which use parts of it.)
#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::LaunchConfig;
use libloading::Library;
use saccade::device::cuda::{CudaDevice, COMMON, KERNEL_FILES};
use saccade::device::launch::{IntoKernelArg, KernelArg, KernelValue, View, ViewMut};
use saccade::Device;

/// The parameter type of `arg` as g++ names it.
fn c_type(arg: &KernelArg) -> &'static str {
    match arg {
        KernelArg::In(_) => "float const*",
        KernelArg::InInt(_) => "int const*",
        KernelArg::Out(_) => "float*",
        KernelArg::Value { c_type, .. } => c_type,
    }
}

/// A buffer read (`x`) or written (`y`) by a kernel launched by hand, as the
/// emulator's own tests do.
pub fn read(x: &[f32]) -> KernelArg<'_> {
    KernelArg::In(View::Host(x))
}

pub fn write(y: &mut [f32]) -> KernelArg<'_> {
    KernelArg::Out(ViewMut::Host(y))
}

/// A value passed by copy (`&(n as i32)`, `&1.5f32`).
pub fn value<T: KernelValue>(v: &T) -> KernelArg<'_> {
    v.into_kernel_arg()
}

/// NaN guard zone around every buffer, in floats; a NaN payload of our own
/// so the check can tell the guard from a NaN a kernel wrote.
const GUARD: usize = 1024;
const GUARD_BITS: u32 = 0x7fc0_dead;

/// `n` NaNs: an output buffer whose unwritten elements fail every comparison.
pub fn poisoned(n: usize) -> Vec<f32> {
    vec![f32::NAN; n]
}

/// Fails unless `got` is within 1e-4 relative of `want` (relative to the
/// largest `|want|` for elements near zero); NaN anywhere fails.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, w| m.max(w.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(w.is_finite(), "{what}: element {i} of the CPU reference is {w}");
        let tol = 1e-4 * w.abs().max(1e-2 * scale).max(1e-30);
        assert!((g - w).abs() <= tol, "{what}: element {i}: kernel {g} vs CPU {w}");
    }
}

#[repr(C)]
struct Launch {
    grid: [u32; 3],
    block: [u32; 3],
    shared_bytes: u32,
}

type Run = unsafe extern "C" fn(*const Launch, *const *mut c_void, *mut c_char, usize) -> c_int;

/// A row of a library's `emu_kernels` table (`emu::Entry` in cuda_emu.h).
#[repr(C)]
struct Entry {
    name: *const c_char,
    signature: unsafe extern "C" fn() -> *const c_char,
    run: Run,
}

struct Kernel {
    signature: String,
    run: Run,
}

/// Every kernel file compiled and loaded.
pub struct Emu {
    kernels: HashMap<(String, String), Kernel>,
    _libraries: Vec<Library>,
}

/// Kernels used only to test the emulation itself (compiled like a kernel file).
const SELFTEST: &str = include_str!("selftest.cu");

impl Emu {
    /// The kernels, compiled at first use; None (after saying so) without
    /// g++. Panics with g++'s messages when a file does not compile.
    pub fn get() -> Option<&'static Emu> {
        static EMU: OnceLock<Option<Result<Emu, String>>> = OnceLock::new();
        let emu = EMU.get_or_init(|| {
            if Command::new("g++").arg("--version").output().is_err() {
                return None;
            }
            // (module name, path for g++'s messages, source)
            let mut files: Vec<(&str, String, &str)> = KERNEL_FILES
                .iter()
                .map(|&(name, src)| (name, format!("kernels/{name}.cu"), src))
                .collect();
            files.push(("selftest", "tests/emulation/selftest.cu".into(), SELFTEST));
            Some(Emu::build(&files))
        });
        match emu {
            None => {
                println!("skipped: g++ not found");
                None
            }
            Some(Ok(emu)) => Some(emu),
            Some(Err(e)) => panic!("{e}"),
        }
    }

    fn build(files: &[(&str, String, &str)]) -> Result<Emu, String> {
        let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emulation");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel-emulation");
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {dir:?}: {e}"))?;
        let read = |f: &str| std::fs::read_to_string(here.join(f)).map_err(|e| format!("reading {f}: {e}"));
        let (header, runtime) = (read("cuda_emu.h")?, read("cuda_emu.cpp")?);
        let flags = ["-O1", "-std=c++17", "-fPIC", "-pthread", "-fvisibility=hidden"];
        // Outputs are named by a hash of every input, so a changed input
        // rebuilds and an unchanged one is loaded as it is.
        let key = |parts: &[&str]| {
            let mut h = DefaultHasher::new();
            (parts, &flags).hash(&mut h);
            format!("{:016x}", h.finish())
        };
        let runtime_o = dir.join(format!("cuda_emu-{}.o", key(&[&header, &runtime])));
        if !runtime_o.exists() {
            gxx(&flags, &["-c"], &here.join("cuda_emu.cpp"), &here, &runtime_o)?;
        }
        let built: Vec<Result<(String, PathBuf), String>> = std::thread::scope(|s| {
            let jobs: Vec<_> = files
                .iter()
                .map(|&(file, ref path, src)| {
                    let (dir, here, runtime_o) = (&dir, &here, &runtime_o);
                    let source = emulation_source(path, src);
                    let key = key(&[&header, &runtime, &source]);
                    s.spawn(move || {
                        let lib = dir.join(format!("{file}-{key}.so"));
                        if !lib.exists() {
                            // Kept next to the library, for reading g++'s view of the file.
                            let cpp = dir.join(format!("{file}-{key}.cpp"));
                            let tmp = cpp.with_extension(format!("tmp{}", std::process::id()));
                            std::fs::write(&tmp, source)
                                .and_then(|_| std::fs::rename(&tmp, &cpp))
                                .map_err(|e| format!("writing {cpp:?}: {e}"))?;
                            gxx(
                                &flags,
                                &["-shared", runtime_o.to_str().unwrap()],
                                &cpp,
                                here,
                                &lib,
                            )?;
                        }
                        Ok((file.to_string(), lib))
                    })
                })
                .collect();
            jobs.into_iter().map(|j| j.join().unwrap()).collect()
        });
        let errors: Vec<String> = built.iter().filter_map(|r| r.clone().err()).collect();
        if !errors.is_empty() {
            return Err(errors.join("\n"));
        }
        let mut emu = Emu {
            kernels: HashMap::new(),
            _libraries: Vec::new(),
        };
        for (file, path) in built.into_iter().flatten() {
            // SAFETY: our own library; loading runs no constructors of note.
            let lib = unsafe { Library::new(&path) }.map_err(|e| format!("loading {path:?}: {e}"))?;
            // SAFETY: `emu_kernels` has this type (EMU_EXPORT_KERNELS in cuda_emu.h).
            let table = unsafe {
                let f = lib
                    .get::<unsafe extern "C" fn(*mut c_int) -> *const Entry>(b"emu_kernels")
                    .map_err(|e| format!("{path:?}: {e}"))?;
                let mut n = 0;
                let rows = f(&mut n);
                std::slice::from_raw_parts(rows, n as usize)
            };
            for e in table {
                // SAFETY: the table holds NUL-terminated strings that live as long as the library.
                let (name, signature) = unsafe {
                    (
                        CStr::from_ptr(e.name).to_string_lossy().into_owned(),
                        CStr::from_ptr((e.signature)()).to_string_lossy().into_owned(),
                    )
                };
                emu.kernels.insert(
                    (file.clone(), name),
                    Kernel {
                        signature,
                        run: e.run,
                    },
                );
            }
            emu._libraries.push(lib);
        }
        Ok(emu)
    }

    /// A GPU whose kernels run here: the engine's own launchers (`mod cuda`
    /// in src/ops/*.rs) launch them through [`Emu::run`]. Every launch is
    /// recorded in `launched` as `"file::kernel"`.
    pub fn device(&'static self) -> (Device, Arc<Mutex<BTreeSet<String>>>) {
        self.device_with_capacity(usize::MAX)
    }

    /// [`Emu::device`] with `capacity` bytes of memory.
    pub fn device_with_capacity(&'static self, capacity: usize) -> (Device, Arc<Mutex<BTreeSet<String>>>) {
        let launched = Arc::new(Mutex::new(BTreeSet::new()));
        let log = launched.clone();
        let launcher = Box::new(move |file: &str, kernel: &str, cfg, args: &mut [KernelArg]| {
            log.lock().unwrap().insert(format!("{file}::{kernel}"));
            self.run(file, kernel, cfg, args).map_err(|e| anyhow::anyhow!(e))
        });
        let dev = CudaDevice::emulated_with_capacity(launcher, capacity);
        (Device::Cuda(dev), launched)
    }

    /// [`Emu::run`], panicking with the reason when the launch is wrong.
    #[track_caller]
    pub fn launch(&self, file: &str, kernel: &str, cfg: LaunchConfig, args: &mut [KernelArg]) {
        if let Err(e) = self.run(file, kernel, cfg, args) {
            panic!("{e}");
        }
    }

    /// Run `kernel` of `kernels/<file>.cu` as a GPU would run `launch!(dev,
    /// file, kernel, cfg, args...)`, then copy every written buffer back; an
    /// error says why the launch is wrong.
    pub fn run(
        &self,
        file: &str,
        kernel: &str,
        cfg: LaunchConfig,
        args: &mut [KernelArg],
    ) -> Result<(), String> {
        let k = self
            .kernels
            .get(&(file.to_string(), kernel.to_string()))
            .ok_or_else(|| format!("no kernel {kernel} in kernels/{file}.cu"))?;
        let passed: Vec<&str> = args.iter().map(c_type).collect();
        if passed.join(", ") != k.signature {
            return Err(format!(
                "{file}::{kernel} takes ({}) but is launched with ({})",
                k.signature,
                passed.join(", ")
            ));
        }
        // Each buffer between guard zones; the kernel sees the middle.
        let mut copies = Vec::new();
        for a in args.iter() {
            let b: &[f32] = match a {
                KernelArg::In(View::Host(b)) | KernelArg::InInt(View::Host(b)) => b,
                KernelArg::Out(ViewMut::Host(b)) => b,
                KernelArg::Value { .. } => continue,
                _ => return Err(format!("{file}::{kernel} given a buffer of a real GPU")),
            };
            let guard = vec![f32::from_bits(GUARD_BITS); GUARD];
            copies.push([&guard[..], b, &guard[..]].concat());
        }
        let pointers: Vec<*mut f32> = copies.iter_mut().map(|c| c[GUARD..].as_mut_ptr()).collect();
        let mut next = pointers.iter();
        // Like cuLaunchKernel's kernelParams: a pointer to each value.
        let params: Vec<*mut c_void> = args
            .iter()
            .map(|a| match a {
                KernelArg::Value { bytes, .. } => bytes.as_ptr() as *mut c_void,
                _ => next.next().unwrap() as *const *mut f32 as *mut c_void,
            })
            .collect();
        let launch = Launch {
            grid: [cfg.grid_dim.0, cfg.grid_dim.1, cfg.grid_dim.2],
            block: [cfg.block_dim.0, cfg.block_dim.1, cfg.block_dim.2],
            shared_bytes: cfg.shared_mem_bytes,
        };
        let mut err = [0 as c_char; 1024];
        // SAFETY: the signature matched, every pointer buffer holds the data it
        // had in the launcher's call, and `params` outlives the call.
        let rc = unsafe { (k.run)(&launch, params.as_ptr(), err.as_mut_ptr(), err.len()) };
        if rc != 0 {
            // SAFETY: the runner wrote a NUL-terminated message.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy();
            return Err(format!("{file}::{kernel}: {msg}"));
        }
        for (i, c) in copies.iter().enumerate() {
            let len = c.len() - 2 * GUARD;
            let clobbered = (0..GUARD)
                .map(|j| (j, j as isize - GUARD as isize))
                .chain((0..GUARD).map(|j| (GUARD + len + j, (len + j) as isize)))
                .find(|&(j, _)| c[j].to_bits() != GUARD_BITS);
            if let Some((_, at)) = clobbered {
                return Err(format!(
                    "{file}::{kernel} wrote outside buffer argument {i} (length {len}) at index {at}"
                ));
            }
        }
        let buffers = args.iter_mut().filter(|a| !matches!(a, KernelArg::Value { .. }));
        for (a, c) in buffers.zip(&copies) {
            if let KernelArg::Out(ViewMut::Host(b)) = a {
                b.copy_from_slice(&c[GUARD..GUARD + b.len()]);
            }
        }
        Ok(())
    }
}

/// Compile `src` to `out` through a temporary name, so that a concurrent
/// test run never loads a half-written file; the error holds g++'s messages.
fn gxx(flags: &[&str], extra: &[&str], src: &Path, include: &Path, out: &Path) -> Result<(), String> {
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    let o = Command::new("g++")
        .args(flags)
        .arg("-I")
        .arg(include)
        .arg(src)
        .args(extra)
        .arg("-o")
        .arg(&tmp)
        .output()
        .map_err(|e| format!("running g++: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "g++ failed on {}:\n{}",
            src.display(),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    std::fs::rename(&tmp, out).map_err(|e| format!("renaming {tmp:?}: {e}"))
}

/// The C++ translation unit of the kernel file at `path`: the emulation
/// header, common.cuh, the file (after `#line` marks, so g++ names the real
/// lines), and the table that exports each `extern "C" __global__` kernel.
fn emulation_source(path: &str, src: &str) -> String {
    let kernels: String = kernel_names(src)
        .iter()
        .map(|k| format!("EMU_KERNEL({k}) "))
        .collect();
    format!(
        "#include \"cuda_emu.h\"\n#line 1 \"kernels/common.cuh\"\n{COMMON}\n\
         #line 1 \"{path}\"\n{}\n#line 1 \"(kernel table)\"\nEMU_EXPORT_KERNELS({kernels})\n",
        dynamic_shared(src)
    )
}

/// The names of the `extern "C" __global__ void name(...)` kernels in `src`
/// (`__launch_bounds__(...)` allowed before the name).
pub fn kernel_names(src: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (at, _) in src.match_indices("__global__") {
        if !src[..at].trim_end().ends_with("extern \"C\"") {
            continue;
        }
        // `void [__launch_bounds__(...)] name(params) {`: the name is the last
        // word before the parameter list.
        let decl = &src[at + "__global__".len()..];
        let decl = &decl[..decl.find('{').unwrap_or(decl.len())];
        let head = &decl[..decl.rfind('(').unwrap_or(0)];
        if let Some(name) = head.split_whitespace().last() {
            names.push(name.to_string());
        }
    }
    names
}

/// Dynamic shared memory: `extern __shared__ T name[];` becomes a macro for
/// the block's buffer (all such arrays alias it, as on a GPU).
fn dynamic_shared(src: &str) -> String {
    src.lines()
        .map(|line| {
            let Some(decl) = line.trim().strip_prefix("extern __shared__") else {
                return line.to_string();
            };
            let decl = decl.split(';').next().unwrap_or_default();
            let mut decl = decl.trim().trim_end_matches("[]");
            if let Some(rest) = decl.strip_prefix("__align__(") {
                decl = rest.split_once(')').map_or(rest, |(_, d)| d).trim_start();
            }
            let (ty, name) = decl
                .rsplit_once(char::is_whitespace)
                .expect("extern __shared__ T name[];");
            format!("#define {name} (({ty}*)emu::dynamic_shared())")
        })
        .collect::<Vec<_>>()
        .join("\n")
}
