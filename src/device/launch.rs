//! The one seam every kernel launch goes through. A launcher (`mod cuda` in
//! src/ops/*.rs and src/optim.rs) names its kernel and lists its arguments
//! with [`launch!`](super::cuda::launch); they become one [`KernelArg`]
//! list, which [`CudaDevice::launch`](super::CudaDevice::launch) hands to the
//! driver, or, on an emulated device, to the [`Launcher`] its maker
//! installed. tests/kernel_emulation.rs installs one that runs the kernels
//! compiled as C++, so the real launchers (grids, argument order, chunking)
//! are tested without a GPU.

use anyhow::Result;
use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig};

/// Floats of device storage a kernel reads: a `const float*` parameter.
pub enum View<'a> {
    Gpu(CudaView<'a, f32>),
    /// The memory of an emulated device.
    Host(&'a [f32]),
}

/// Floats of device storage a kernel writes: a `float*` parameter.
pub enum ViewMut<'a> {
    Gpu(CudaViewMut<'a, f32>),
    /// The memory of an emulated device.
    Host(&'a mut [f32]),
}

impl<'a> View<'a> {
    /// The same elements (a view is a shared borrow).
    fn copy(&self) -> View<'a> {
        match self {
            View::Gpu(v) => View::Gpu(v.slice(..)),
            View::Host(v) => View::Host(v),
        }
    }
}

impl ViewMut<'_> {
    /// The same elements, borrowed for a shorter time.
    fn reborrow(&mut self) -> ViewMut<'_> {
        match self {
            ViewMut::Gpu(v) => ViewMut::Gpu(v.slice_mut(..)),
            ViewMut::Host(v) => ViewMut::Host(v),
        }
    }
}

/// `i32` bit patterns kept in f32 storage, passed to a `const int*`
/// parameter (the localized crop's window table).
pub struct Ints<'a>(pub View<'a>);

/// A value a kernel takes by copy.
///
/// # Safety
/// `Self` is a primitive or `repr(C)` without padding, laid out as the
/// kernel's parameter type `C_TYPE`: its bytes are what the kernel gets.
pub unsafe trait KernelValue: Copy {
    /// The kernel's parameter type as g++ spells it (`long long`, `Dims`),
    /// which the emulation tests compare with the kernel's signature.
    const C_TYPE: &'static str;
}

// SAFETY: primitives, the kernels' `int`, `long long` and `float`.
unsafe impl KernelValue for i32 {
    const C_TYPE: &'static str = "int";
}
// SAFETY: as above.
unsafe impl KernelValue for i64 {
    const C_TYPE: &'static str = "long long";
}
// SAFETY: as above.
unsafe impl KernelValue for f32 {
    const C_TYPE: &'static str = "float";
}

/// One kernel argument, in the kernel's parameter order.
pub enum KernelArg<'a> {
    /// A buffer the kernel reads (`const float*`).
    In(View<'a>),
    /// A buffer of [`Ints`] the kernel reads (`const int*`).
    InInt(View<'a>),
    /// A buffer the kernel writes (`float*`).
    Out(ViewMut<'a>),
    /// A [`KernelValue`]: its C type and its bytes.
    Value { c_type: &'static str, bytes: &'a [u8] },
}

/// What an emulated device does with a launch: run `kernel` of
/// `kernels/<module>.cu` over `cfg` with `args`.
pub type Launcher = dyn Fn(&str, &str, LaunchConfig, &mut [KernelArg]) -> Result<()> + Send + Sync;

/// What `launch!` accepts as an argument.
pub trait IntoKernelArg<'a> {
    fn into_kernel_arg(self) -> KernelArg<'a>;
}

impl<'a> IntoKernelArg<'a> for View<'a> {
    fn into_kernel_arg(self) -> KernelArg<'a> {
        KernelArg::In(self)
    }
}

impl<'a> IntoKernelArg<'a> for &View<'a> {
    fn into_kernel_arg(self) -> KernelArg<'a> {
        KernelArg::In(self.copy())
    }
}

impl<'a> IntoKernelArg<'a> for Ints<'a> {
    fn into_kernel_arg(self) -> KernelArg<'a> {
        KernelArg::InInt(self.0)
    }
}

impl<'a> IntoKernelArg<'a> for ViewMut<'a> {
    fn into_kernel_arg(self) -> KernelArg<'a> {
        KernelArg::Out(self)
    }
}

impl<'a> IntoKernelArg<'a> for &'a mut ViewMut<'_> {
    fn into_kernel_arg(self) -> KernelArg<'a> {
        KernelArg::Out(self.reborrow())
    }
}

impl<'a, T: KernelValue> IntoKernelArg<'a> for &'a T {
    fn into_kernel_arg(self) -> KernelArg<'a> {
        // SAFETY: `T: KernelValue` has no padding, so all its bytes are
        // initialized; they are borrowed for as long as `self`.
        let bytes = unsafe { std::slice::from_raw_parts((self as *const T).cast::<u8>(), size_of::<T>()) };
        KernelArg::Value {
            c_type: T::C_TYPE,
            bytes,
        }
    }
}
