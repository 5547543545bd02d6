//! `saccade data generate|import|inspect`: the flags, turned into the
//! argument structs of [`crate::data::commands`].

use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};

use super::{usage, Failure};
use crate::data::commands::{self, GenerateArgs, ImportArgs, InspectArgs, OutputFormat};
use crate::data::labels::LABELS_HELP;
use crate::data::spec::{DatasetSpec, SPEC_HELP};
use crate::data::{Split, SplitSizes};

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum Format {
    /// Tiled pyramid store (use the folder as --dataset).
    Store,
    /// PNG files, OUT/<split>/<class>/<index>.png.
    Png,
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum SplitArg {
    Train,
    Valid,
    Test,
}

#[derive(Subcommand)]
pub(super) enum DataCommand {
    /// Write a generated dataset (all three splits) to disk.
    ///
    /// Example: saccade data generate --dataset cluttered-mnist@2528 --train 1000 --valid 100 --test 100 --out stores/c2528
    #[command(after_help = SPEC_HELP)]
    Generate {
        /// Dataset spec (see below).
        #[arg(long, default_value = "cluttered-mnist")]
        dataset: String,
        /// Output folder (must be new or empty).
        #[arg(long)]
        out: PathBuf,
        /// Seed of the generator: the same seed writes the same images.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Images in the train split [default: 100000, or the dataset's own: megapixel-mnist 5000].
        #[arg(long)]
        train: Option<usize>,
        /// Images in the valid split [default: 10000, or the dataset's own: megapixel-mnist 1000].
        #[arg(long)]
        valid: Option<usize>,
        /// Images in the test split [default: 10000, or the dataset's own: megapixel-mnist 1000].
        #[arg(long)]
        test: Option<usize>,
        /// What to write.
        #[arg(long, value_enum, default_value = "store")]
        format: Format,
    },
    /// Import PNG/JPEG/TIFF images into a tiled store: one class per
    /// subfolder, or several labels per image from a labels CSV.
    ///
    /// Examples: saccade data import --folder ~/slides --out stores/slides --size 4096
    ///           saccade data import --folder ~/scans --labels ~/scans/labels.csv --out stores/scans
    /// (then: saccade train --dataset stores/slides)
    #[command(after_help = LABELS_HELP)]
    Import {
        /// Folder with one subfolder of images per class, or the images a
        /// --labels CSV lists.
        #[arg(long)]
        folder: PathBuf,
        /// Labels CSV: each image's path under --folder, its class per task
        /// and optionally its split (see below).
        #[arg(long)]
        labels: Option<PathBuf>,
        /// Store folder to create.
        #[arg(long)]
        out: PathBuf,
        /// Resize every image to SIZE x SIZE (required when sizes differ).
        #[arg(long)]
        size: Option<usize>,
        /// Fraction of images in the valid split (fixed per file by a hash of
        /// its path), unless the labels CSV has a split column.
        #[arg(long, default_value_t = 0.1)]
        valid_frac: f64,
        /// Fraction of images in the test split.
        #[arg(long, default_value_t = 0.1)]
        test_frac: f64,
    },
    /// Draw a grid of images with their proxies and labels to a PNG.
    ///
    /// Example: saccade data inspect stores/slides --count 8 --seed 3 --out slides.png
    #[command(after_help = SPEC_HELP)]
    Inspect {
        /// A store folder or a dataset spec (see below).
        dataset: String,
        /// PNG file to write.
        #[arg(long, default_value = "grid.png")]
        out: PathBuf,
        /// Images to draw.
        #[arg(long, default_value_t = 12)]
        count: usize,
        /// Which split to draw from.
        #[arg(long, value_enum, default_value = "train")]
        split: SplitArg,
        /// Seed: of the generator for a generated dataset, of the choice of
        /// images for a store.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Side of each picture in pixels.
        #[arg(long, default_value_t = 160)]
        cell: u32,
    },
}

/// Run a data command; the checks on its arguments alone come first, as
/// usage errors.
pub(super) fn run_data(command: DataCommand) -> Result<(), Failure> {
    match command {
        DataCommand::Generate {
            dataset,
            out,
            seed,
            train,
            valid,
            test,
            format,
        } => {
            let default = DatasetSpec::parse(&dataset)
                .map_err(usage)?
                .default_sizes()
                .unwrap_or_default();
            let args = GenerateArgs {
                dataset,
                out,
                seed,
                sizes: SplitSizes {
                    train: train.unwrap_or(default.train),
                    valid: valid.unwrap_or(default.valid),
                    test: test.unwrap_or(default.test),
                },
                format: match format {
                    Format::Store => OutputFormat::Store,
                    Format::Png => OutputFormat::Png,
                },
                mnist_dir: None,
            };
            args.check().map_err(usage)?;
            commands::generate(&args)?;
        }
        DataCommand::Import {
            folder,
            labels,
            out,
            size,
            valid_frac,
            test_frac,
        } => {
            let args = ImportArgs {
                folder,
                labels,
                out,
                size,
                valid_frac,
                test_frac,
            };
            args.check().map_err(usage)?;
            let listing = args.list().map_err(usage)?;
            commands::import_listed(&args, &listing)?;
        }
        DataCommand::Inspect {
            dataset,
            out,
            count,
            split,
            seed,
            cell,
        } => {
            let args = InspectArgs {
                dataset,
                out,
                count,
                split: match split {
                    SplitArg::Train => Split::Train,
                    SplitArg::Valid => Split::Valid,
                    SplitArg::Test => Split::Test,
                },
                seed,
                cell,
            };
            args.check().map_err(usage)?;
            commands::inspect(&args)?;
        }
    }
    Ok(())
}
