//! `Tensor`: a shape plus shared, immutable, contiguous f32 storage (NCHW for
//! images). Ops never write into an existing tensor; they make new ones, so a
//! clone is an `Arc` bump and the tape can keep what backward needs.

use std::fmt;
use std::sync::Arc;

use anyhow::{bail, ensure, Result};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use crate::device::cpu::CpuStorage;
use crate::device::cuda::CudaStorage;
use crate::device::{CpuDevice, Device, MemCounter};

pub enum Storage {
    Cpu(CpuStorage),
    Cuda(CudaStorage),
}

#[derive(Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Arc<Storage>,
}

/// `[2, 3, 4]` style, for error messages.
pub fn fmt_shape(shape: &[usize]) -> String {
    format!("{shape:?}")
}

impl Tensor {
    /// Wrap host data; `data.len()` must equal the product of `shape`.
    pub fn from_vec(data: Vec<f32>, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        ensure!(
            data.len() == n,
            "tensor data has {} values but shape {} needs {n}",
            data.len(),
            fmt_shape(shape)
        );
        Ok(match device {
            Device::Cpu(d) => Tensor::from_cpu(data, shape, d),
            Device::Cuda(d) => Tensor::from_cuda(d.upload(&data)?, shape),
        })
    }

    /// Wrap device storage holding exactly `shape`'s element count.
    pub(crate) fn from_cuda(s: CudaStorage, shape: &[usize]) -> Tensor {
        debug_assert_eq!(s.len(), shape.iter().product::<usize>());
        Tensor {
            shape: shape.to_vec(),
            storage: Arc::new(Storage::Cuda(s)),
        }
    }

    pub(crate) fn from_cpu(data: Vec<f32>, shape: &[usize], dev: &CpuDevice) -> Tensor {
        debug_assert_eq!(data.len(), shape.iter().product::<usize>());
        Tensor {
            shape: shape.to_vec(),
            storage: Arc::new(Storage::Cpu(CpuStorage::new(data, dev.clone()))),
        }
    }

    pub fn zeros(shape: &[usize], device: &Device) -> Tensor {
        Tensor::full(shape, 0.0, device)
    }

    /// Panics only when the GPU is out of memory.
    pub fn full(shape: &[usize], value: f32, device: &Device) -> Tensor {
        let n = shape.iter().product();
        match device {
            Device::Cpu(d) => {
                let mut v = d.buffer(n);
                v.fill(value);
                Tensor::from_cpu(v, shape, d)
            }
            Device::Cuda(d) => {
                let s = d
                    .alloc(n)
                    .and_then(|mut s| s.fill(value).map(|()| s))
                    .unwrap_or_else(|e| panic!("Tensor::full {}: {e:#}", fmt_shape(shape)));
                Tensor::from_cuda(s, shape)
            }
        }
    }

    /// Standard normal values times `std`. Panics (as [`Tensor::full`] does)
    /// when the values cannot be placed on `device`, naming the cause.
    pub fn randn(shape: &[usize], std: f32, rng: &mut impl Rng, device: &Device) -> Tensor {
        let n: usize = shape.iter().product();
        let data = (0..n)
            .map(|_| std * Distribution::<f32>::sample(&StandardNormal, rng))
            .collect::<Vec<f32>>();
        Tensor::from_vec(data, shape, device)
            .unwrap_or_else(|e| panic!("Tensor::randn {}: {e:#}", fmt_shape(shape)))
    }

    /// Uniform values in `[lo, hi)`; panics like [`Tensor::randn`].
    pub fn uniform(shape: &[usize], lo: f32, hi: f32, rng: &mut impl Rng, device: &Device) -> Tensor {
        let n: usize = shape.iter().product();
        let data = (0..n).map(|_| rng.random_range(lo..hi)).collect::<Vec<f32>>();
        Tensor::from_vec(data, shape, device)
            .unwrap_or_else(|e| panic!("Tensor::uniform {}: {e:#}", fmt_shape(shape)))
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Size of axis `i`; negative `i` counts from the end.
    pub fn dim(&self, i: isize) -> usize {
        let r = self.shape.len() as isize;
        self.shape[(if i < 0 { r + i } else { i }) as usize]
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The counter of the device holding the tensor.
    pub(crate) fn counter(&self) -> &MemCounter {
        match &*self.storage {
            Storage::Cpu(s) => s.counter(),
            Storage::Cuda(s) => s.counter(),
        }
    }

    /// The host device of a CPU tensor, for its ops' output buffers.
    /// Panics on a GPU tensor: ops call it on their CPU path only.
    pub(crate) fn host(&self) -> &CpuDevice {
        match &*self.storage {
            Storage::Cpu(s) => s.device(),
            Storage::Cuda(_) => panic!("internal: host() of a GPU tensor"),
        }
    }

    pub fn device(&self) -> Device {
        match &*self.storage {
            Storage::Cpu(s) => Device::Cpu(s.device().clone()),
            Storage::Cuda(s) => Device::Cuda(s.device()),
        }
    }

    /// The host slice of a CPU tensor; an error for a GPU tensor.
    pub fn cpu(&self) -> Result<&[f32]> {
        match &*self.storage {
            Storage::Cpu(s) => Ok(s.data()),
            Storage::Cuda(_) => bail!(
                "tensor {} is on the GPU; host code must copy it with to_vec() or to_device()",
                fmt_shape(&self.shape)
            ),
        }
    }

    /// The device storage of a GPU tensor; an error for a host tensor (an op
    /// given tensors on different devices).
    pub(crate) fn cuda(&self) -> Result<&CudaStorage> {
        match &*self.storage {
            Storage::Cuda(s) => Ok(s),
            Storage::Cpu(_) => bail!(
                "tensor {} is on the CPU but the op runs on the GPU; move it with to_device()",
                fmt_shape(&self.shape)
            ),
        }
    }

    /// Copy the values to a host `Vec`, from any device.
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        match &*self.storage {
            Storage::Cpu(s) => Ok(s.data().to_vec()),
            Storage::Cuda(s) => s.to_vec(),
        }
    }

    /// The single value of a one-element tensor.
    pub fn item(&self) -> Result<f32> {
        ensure!(
            self.numel() == 1,
            "item() needs a one-element tensor, got shape {}",
            fmt_shape(&self.shape)
        );
        Ok(self.to_vec()?[0])
    }

    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if self.device().same(device) {
            return Ok(self.clone());
        }
        Tensor::from_vec(self.to_vec()?, &self.shape, device)
    }

    /// Same storage, new shape with the same number of elements.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            bail!(
                "cannot reshape {} ({} values) to {} ({n} values)",
                fmt_shape(&self.shape),
                self.numel(),
                fmt_shape(shape)
            );
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: self.storage.clone(),
        })
    }

    /// `self + other` for equal shapes: the tape's gradient accumulation
    /// (broadcasting sums are the `add` op's).
    pub fn add_same(&self, other: &Tensor) -> Result<Tensor> {
        ensure!(
            self.shape == other.shape,
            "add_same: shapes {} and {} differ",
            fmt_shape(&self.shape),
            fmt_shape(&other.shape)
        );
        match &*self.storage {
            Storage::Cpu(s) => {
                let (a, b) = (s.data(), other.cpu()?);
                let mut out = s.device().buffer(a.len());
                out.par_iter_mut()
                    .with_min_len(1 << 14)
                    .zip(a.par_iter().zip(b))
                    .for_each(|(o, (x, y))| *o = x + y);
                Ok(Tensor::from_cpu(out, &self.shape, s.device()))
            }
            Storage::Cuda(s) => Ok(Tensor::from_cuda(s.add(other.cuda()?)?, &self.shape)),
        }
    }

    /// A new tensor of the same shape on the same device.
    pub fn same_shape(&self, data: Vec<f32>) -> Result<Tensor> {
        Tensor::from_vec(data, &self.shape, &self.device())
    }

    /// Fail with a message naming `what` unless the shapes are equal.
    pub fn expect_shape(&self, shape: &[usize], what: &str) -> Result<()> {
        ensure!(
            self.shape == shape,
            "{what}: expected shape {}, got {}",
            fmt_shape(shape),
            fmt_shape(&self.shape)
        );
        Ok(())
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor{:?} on {}", self.shape, self.device())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_bytes_are_counted_live_and_peak() {
        let dev = Device::cpu();
        let a = Tensor::zeros(&[10, 10], &dev);
        assert_eq!(dev.memory().live_bytes, 400);
        {
            let _b = Tensor::zeros(&[100], &dev);
            let _c = a.reshape(&[100]).unwrap(); // shares storage: no new bytes
            assert_eq!(dev.memory().live_bytes, 800);
        }
        assert_eq!(dev.memory().live_bytes, 400);
        assert_eq!(dev.memory().peak_bytes, 800);
        dev.reset_peak();
        assert_eq!(dev.memory().peak_bytes, 400);
    }

    #[test]
    fn bad_shapes_are_errors_not_panics() {
        let dev = Device::cpu();
        let e = Tensor::from_vec(vec![1.0; 5], &[2, 3], &dev).unwrap_err();
        assert!(e.to_string().contains("[2, 3]"), "{e}");
        let t = Tensor::zeros(&[2, 3], &dev);
        assert!(t.reshape(&[4]).is_err());
        assert!(t.item().is_err());
    }
}
