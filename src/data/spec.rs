//! Dataset specs: the one string every command takes to name a dataset.
//! See [`SPEC_HELP`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};

use super::cluttered::{mnist_split, Mode, SceneConfig, SceneDataset, Task, BASE_SIDE};
use super::megapixel::{self, MegapixelDataset};
use super::mnist::{default_dir, Mnist};
use super::proxy::DEFAULT_PROXY_SIZE;
use super::store::StoreDataset;
use super::{Dataset, Split};

/// The `--dataset` syntax, for `--help` texts.
pub const SPEC_HELP: &str = "\
Dataset spec: NAME[@SIZE[:MODE]][,KEY=VALUE...] or STORE[,KEY=VALUE...]
  NAME   cluttered-mnist    two digits + 8 clutter fragments, label = unordered pair (55 classes)
         mnist-sum          two digits, no clutter, label = their sum (19 classes)
         cluttered-mnist-1  one digit + clutter (10 classes; small and fast)
         megapixel-mnist    attention sampling's and IPS's benchmark: 1500x1500, five 28-px digits
                            (3 of the majority class) among 50 line-pair noise patterns; four tasks:
                            majority, max, top (highest digit), multi (classes present);
                            default sizes 5000/1000/1000 images, proxy 128
  SIZE   image side in pixels, 100 (default, the original 100x100 task) to 65536;
         megapixel-mnist: the canvas side (default 1500), same digits and noise, no MODE
  MODE   upsampled  the 100x100 image bilinearly upsampled to SIZE (default; the paper's protocol)
         native     digits drawn on the SIZE canvas itself, SIZE/16 px wide, clutter scaled to
                    match: the 32x32 proxy shows where digits are but not which
  KEYS   proxy=J     proxy side (default 32; megapixel-mnist 128)
         noise=S     std of Gaussian noise added to the proxy (default 0; robustness ablation)
         digit=PX    native mode: digit side in pixels (default SIZE/16)
  STORE  a folder made by `saccade data import` or `saccade data generate`
Examples: cluttered-mnist, mnist-sum, cluttered-mnist@2528, cluttered-mnist@16384:native,
          cluttered-mnist,noise=0.3, megapixel-mnist@6000,proxy=96, ./stores/mit5k,proxy=64
Generated images are rendered on demand from a seed: they need no disk.";

/// Samples per split of the generated datasets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitSizes {
    pub train: usize,
    pub valid: usize,
    pub test: usize,
}

impl Default for SplitSizes {
    fn default() -> Self {
        SplitSizes {
            train: 100_000,
            valid: 10_000,
            test: 10_000,
        }
    }
}

impl SplitSizes {
    pub fn get(&self, split: Split) -> usize {
        match split {
            Split::Train => self.train,
            Split::Valid => self.valid,
            Split::Test => self.test,
        }
    }
}

/// Largest proxy side: the proxy is read whole for every image (the
/// paper's is 32).
pub const MAX_PROXY: usize = 1024;

/// What besides the spec decides a dataset.
#[derive(Clone, Debug, Default)]
pub struct DataConfig {
    /// Seed of the generated datasets (and of proxy noise).
    pub seed: u64,
    pub sizes: SplitSizes,
    /// Folder of the MNIST files; [`default_dir`] when `None`.
    pub mnist_dir: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    Generated(SceneConfig),
    /// Megapixel MNIST on a canvas of this side.
    Megapixel(usize),
    Store(PathBuf),
}

/// A parsed dataset spec.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetSpec {
    pub source: Source,
    pub proxy: usize,
    pub noise: f32,
}

impl DatasetSpec {
    pub fn parse(spec: &str) -> Result<DatasetSpec> {
        let mut parts = spec.split(',');
        let head = parts.next().unwrap_or_default().trim();
        let (mut proxy, mut noise, mut digit) = (None, 0.0f32, None);
        let mut seen = Vec::new();
        for kv in parts {
            let Some((k, v)) = kv.split_once('=') else {
                bail!("dataset spec `{spec}`: `{kv}` is not KEY=VALUE\n\n{SPEC_HELP}");
            };
            ensure!(
                !seen.contains(&k.trim()),
                "dataset spec `{spec}`: {}= is given twice (--proxy-size adds proxy=, --proxy-noise \
                 adds noise=): give each once",
                k.trim()
            );
            seen.push(k.trim());
            let bad = || anyhow::anyhow!("dataset spec `{spec}`: bad value in `{kv}`\n\n{SPEC_HELP}");
            match k.trim() {
                "proxy" => {
                    proxy = Some(
                        v.trim()
                            .parse()
                            .ok()
                            .filter(|&j| j > 0 && j <= MAX_PROXY)
                            .ok_or_else(|| {
                                anyhow::anyhow!(
                                    "dataset spec `{spec}`: proxy= must be within 1..={MAX_PROXY}"
                                )
                            })?,
                    )
                }
                "noise" => {
                    noise = v
                        .trim()
                        .parse()
                        .ok()
                        .filter(|&s: &f32| s.is_finite() && s >= 0.0)
                        .ok_or_else(bad)?
                }
                "digit" => digit = Some(v.trim().parse().map_err(|_| bad())?),
                _ => bail!("dataset spec `{spec}`: unknown key `{k}`\n\n{SPEC_HELP}"),
            }
        }
        let (name, rest) = head.split_once('@').unwrap_or((head, ""));
        ensure!(
            !head.contains('@') || !rest.split(':').next().unwrap_or_default().is_empty(),
            "dataset spec `{spec}`: no size after `@`: give one (`{name}@2528`) or leave out the `@`"
        );
        let parse_size = |text: &str, default: usize| -> Result<usize> {
            if text.is_empty() {
                Ok(default)
            } else {
                text.parse()
                    .map_err(|_| anyhow::anyhow!("dataset spec `{spec}`: size `{text}` is not a number"))
            }
        };
        let source = match Task::parse(name) {
            None if name == megapixel::NAME => {
                if rest.contains(':') {
                    bail!("dataset spec `{spec}`: {name} takes no MODE, only @SIDE (its canvas side)");
                }
                if digit.is_some() {
                    bail!("dataset spec `{spec}`: digit= applies to native mode only; {name}'s digits are 28 px");
                }
                Source::Megapixel(parse_size(rest, megapixel::DEFAULT_SIDE)?)
            }
            Some(task) => {
                let (size, mode) = rest.split_once(':').unwrap_or((rest, "upsampled"));
                let size = parse_size(size, BASE_SIDE)?;
                let mode = match mode {
                    "upsampled" => Mode::Upsampled,
                    "native" => Mode::Native,
                    _ => bail!("dataset spec `{spec}`: mode `{mode}` is neither upsampled nor native"),
                };
                let mut cfg = SceneConfig::large(task, size, mode);
                if let Some(d) = digit {
                    if mode != Mode::Native {
                        bail!("dataset spec `{spec}`: digit= applies to native mode only");
                    }
                    cfg.digit_px = d;
                }
                Source::Generated(cfg)
            }
            None if Path::new(head).is_dir() => Source::Store(PathBuf::from(head)),
            None if super::commands::partial_of(Path::new(head)).is_dir() => bail!(
                "{head} is not there, but {} is: a `saccade data generate` or `import` into {head} was \
                 stopped before it finished; run it again (it clears the partial folder first)",
                super::commands::partial_of(Path::new(head)).display()
            ),
            None => bail!(
                "unknown dataset `{head}`: not one of {}, {} and not a store folder\n\n{SPEC_HELP}",
                Task::ALL.map(Task::name).join(", "),
                megapixel::NAME
            ),
        };
        let proxy = proxy.unwrap_or(match source {
            Source::Megapixel(_) => megapixel::DEFAULT_PROXY,
            _ => DEFAULT_PROXY_SIZE,
        });
        Ok(DatasetSpec { source, proxy, noise })
    }

    /// The split sizes the dataset comes with, where it has its own (a
    /// benchmark's); otherwise the command's defaults apply.
    pub fn default_sizes(&self) -> Option<SplitSizes> {
        matches!(self.source, Source::Megapixel(_)).then_some(megapixel::DEFAULT_SIZES)
    }
}

/// Open one split of the dataset named by `spec` (see [`SPEC_HELP`]).
pub fn open_dataset(spec: &str, split: Split, cfg: &DataConfig) -> Result<Arc<dyn Dataset>> {
    let parsed = DatasetSpec::parse(spec)?;
    let mnist = || -> Result<Arc<Mnist>> {
        let dir = cfg.mnist_dir.clone().unwrap_or_else(default_dir);
        Ok(Arc::new(Mnist::load(&dir, mnist_split(split))?))
    };
    Ok(match parsed.source {
        Source::Generated(scene) => {
            let ds = SceneDataset::new(
                scene,
                split,
                cfg.seed,
                cfg.sizes.get(split),
                mnist()?,
                parsed.proxy,
                parsed.noise,
            )
            .with_context(|| format!("dataset `{spec}`"))?;
            Arc::new(ds)
        }
        Source::Megapixel(side) => {
            let ds = MegapixelDataset::new(
                side,
                split,
                cfg.seed,
                cfg.sizes.get(split),
                mnist()?,
                parsed.proxy,
                parsed.noise,
            )
            .with_context(|| format!("dataset `{spec}`"))?;
            Arc::new(ds)
        }
        Source::Store(dir) => Arc::new(StoreDataset::open(
            &dir,
            split,
            parsed.proxy,
            parsed.noise,
            cfg.seed,
        )?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_explain() {
        let p = DatasetSpec::parse("cluttered-mnist").unwrap();
        assert_eq!(p.source, Source::Generated(SceneConfig::base(Task::Pair)));
        assert_eq!((p.proxy, p.noise), (32, 0.0));
        let p = DatasetSpec::parse("mnist-sum@2528").unwrap();
        assert_eq!(
            p.source,
            Source::Generated(SceneConfig::large(Task::Sum, 2528, Mode::Upsampled))
        );
        let p = DatasetSpec::parse("cluttered-mnist-1@16384:native,proxy=64,noise=0.25,digit=512").unwrap();
        let Source::Generated(cfg) = p.source else {
            panic!()
        };
        assert_eq!((cfg.size, cfg.mode, cfg.digit_px), (16384, Mode::Native, 512));
        assert_eq!((p.proxy, p.noise), (64, 0.25));
        let p = DatasetSpec::parse("megapixel-mnist").unwrap();
        assert_eq!((&p.source, p.proxy), (&Source::Megapixel(1500), 128));
        assert_eq!(p.default_sizes(), Some(megapixel::DEFAULT_SIZES));
        let p = DatasetSpec::parse("megapixel-mnist@6000,proxy=64,noise=0.1").unwrap();
        assert_eq!((p.source, p.proxy, p.noise), (Source::Megapixel(6000), 64, 0.1));
        assert_eq!(
            DatasetSpec::parse("cluttered-mnist").unwrap().default_sizes(),
            None
        );
        let dir = tempfile::tempdir().unwrap();
        let spec = format!("{},proxy=16", dir.path().display());
        assert_eq!(
            DatasetSpec::parse(&spec).unwrap().source,
            Source::Store(dir.path().to_path_buf())
        );

        for (bad, needle) in [
            ("mnist-plus", "unknown dataset"),
            ("cluttered-mnist@big", "not a number"),
            ("cluttered-mnist@2528:sideways", "neither upsampled nor native"),
            ("cluttered-mnist,proxy=0", "proxy= must be within"),
            ("cluttered-mnist,zoom=2", "unknown key"),
            ("cluttered-mnist@2528,digit=64", "native mode only"),
            ("megapixel-mnist@2000:native", "takes no MODE"),
            ("megapixel-mnist,digit=64", "digits are 28 px"),
            ("megapixel-mnist@huge", "not a number"),
            ("cluttered-mnist@", "no size after `@`"),
            ("cluttered-mnist@:native", "no size after `@`"),
            (
                "cluttered-mnist,proxy=16,proxy=64",
                "proxy= is given twice (--proxy-size adds",
            ),
            ("cluttered-mnist,noise=0.1,noise=0.2", "noise= is given twice"),
        ] {
            let err = DatasetSpec::parse(bad).err().unwrap().to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn a_huge_proxy_is_refused_before_allocating_it() {
        let err = DatasetSpec::parse("cluttered-mnist,proxy=100000")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("proxy= must be within 1..=1024"), "{err}");
        assert_eq!(
            DatasetSpec::parse("cluttered-mnist,proxy=1024").unwrap().proxy,
            1024
        );
    }

    #[test]
    fn open_dataset_builds_every_task() {
        let cfg = DataConfig {
            seed: 1,
            sizes: SplitSizes {
                train: 5,
                valid: 3,
                test: 2,
            },
            mnist_dir: None,
        };
        for task in Task::ALL {
            let ds = open_dataset(task.name(), Split::Valid, &cfg).unwrap();
            assert_eq!(
                (ds.len(), ds.num_classes(), ds.image_size()),
                (3, task.num_classes(), (100, 100))
            );
            assert_eq!(ds.class_names().len(), task.num_classes());
        }
        let ds = open_dataset("cluttered-mnist@600:native,proxy=16", Split::Test, &cfg).unwrap();
        assert_eq!((ds.image_size(), ds.proxy_shape()), ((600, 600), (1, 16)));
        assert_eq!(ds.get(1).unwrap().proxy.len(), 256);
        let ds = open_dataset("megapixel-mnist@300", Split::Valid, &cfg).unwrap();
        assert_eq!(
            (ds.len(), ds.image_size(), ds.proxy_shape()),
            (3, (300, 300), (1, 128))
        );
        assert_eq!((ds.tasks().len(), ds.get(2).unwrap().labels.len()), (4, 4));
        assert!(open_dataset("megapixel-mnist@99", Split::Test, &cfg).is_err());
        let err = open_dataset("cluttered-mnist@99", Split::Test, &cfg)
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("out of range"), "{err:#}");
    }
}
