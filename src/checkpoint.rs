//! Checkpoints: safetensors files holding every parameter and buffer by name,
//! the optimizer's moments, and a JSON metadata entry (model config, training
//! state). Written atomically: a temporary file in the same folder, then a
//! rename, so a crash never leaves a half-written checkpoint.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::device::Device;
use crate::nn::ParamStore;
use crate::optim::Adam;
use crate::tensor::Tensor;

const FORMAT: &str = "saccade-checkpoint-1";

/// Write `params`, the optimizer state and `meta` (a JSON value) to `path`.
pub fn save(path: &Path, params: &ParamStore, adam: Option<&Adam>, meta: &serde_json::Value) -> Result<()> {
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut push = |name: String, t: &Tensor| -> Result<()> {
        named.push((
            name,
            t.shape().to_vec(),
            bytemuck::cast_slice(&t.to_vec()?).to_vec(),
        ));
        Ok(())
    };
    for (id, p) in params.iter() {
        push(format!("param/{}", p.name), &p.value)?;
        if let Some((m, v)) = adam.and_then(|a| a.moments(id)) {
            push(format!("adam_m/{}", p.name), m)?;
            push(format!("adam_v/{}", p.name), v)?;
        }
    }
    let views = named
        .iter()
        .map(|(n, s, b)| Ok((n.as_str(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut info = HashMap::new();
    info.insert("format".to_string(), FORMAT.to_string());
    info.insert("meta".to_string(), meta.to_string());
    if let Some(a) = adam {
        info.insert("adam_step".to_string(), a.step.to_string());
    }
    let bytes = safetensors::tensor::serialize(views, Some(info))?;
    write_atomic(path, &bytes).context("writing the checkpoint")
}

/// Replace `path` with `bytes` whole or not at all: a temporary file in the
/// same folder, flushed to disk before it is renamed over `path` (else a
/// crash can leave the new name on an empty file); removed if anything fails.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut name = path.file_name().context("a file name")?.to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let written = (|| -> Result<()> {
        let mut f = fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    // The rename itself is durable once the folder is flushed (unix only).
    #[cfg(unix)]
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = fs::File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// A checkpoint read back: its metadata and raw tensors.
pub struct Checkpoint {
    pub meta: serde_json::Value,
    pub adam_step: Option<u64>,
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Checkpoint {
    pub fn load(path: &Path) -> Result<Checkpoint> {
        let bytes = fs::read(path).with_context(|| {
            format!(
                "cannot read checkpoint {} (check the --checkpoint/--resume path)",
                path.display()
            )
        })?;
        let bad = || {
            format!(
                "{} is not a saccade checkpoint (damaged or another format)",
                path.display()
            )
        };
        let (_, md) = SafeTensors::read_metadata(&bytes).with_context(bad)?;
        let info = md.metadata().clone().unwrap_or_default();
        if info.get("format").map(String::as_str) != Some(FORMAT) {
            bail!("{}", bad());
        }
        let meta =
            serde_json::from_str(info.get("meta").map(String::as_str).unwrap_or("null")).with_context(bad)?;
        let adam_step = info.get("adam_step").and_then(|s| s.parse().ok());
        let st = SafeTensors::deserialize(&bytes).with_context(bad)?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            ensure!(
                view.dtype() == Dtype::F32,
                "{}: tensor {name} is not f32",
                path.display()
            );
            let data: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            tensors.insert(name, (view.shape().to_vec(), data));
        }
        Ok(Checkpoint {
            meta,
            adam_step,
            tensors,
        })
    }

    fn tensor(&self, key: &str, dev: &Device) -> Result<Option<Tensor>> {
        self.tensors
            .get(key)
            .map(|(s, d)| Tensor::from_vec(d.clone(), s, dev))
            .transpose()
    }

    /// Load every parameter (names and shapes must match the model) and, if
    /// given, the optimizer state.
    pub fn restore(&self, params: &mut ParamStore, adam: Option<&mut Adam>, dev: &Device) -> Result<()> {
        let ids: Vec<_> = params.ids().collect();
        for &id in &ids {
            let name = params.get(id).name.clone();
            let t = self.tensor(&format!("param/{name}"), dev)?.with_context(|| {
                format!(
                    "checkpoint has no parameter {name}: it was written by a different model configuration"
                )
            })?;
            params
                .set(id, t)
                .context("checkpoint does not match this model configuration")?;
        }
        if let Some(adam) = adam {
            adam.step = self.adam_step.unwrap_or(0);
            for &id in &ids {
                let name = &params.get(id).name;
                let m = self.tensor(&format!("adam_m/{name}"), dev)?;
                let v = self.tensor(&format!("adam_v/{name}"), dev)?;
                if let (Some(m), Some(v)) = (m, v) {
                    adam.set_moments(id, m, v);
                }
            }
        }
        Ok(())
    }
}
