//! `saccade data generate|import|inspect`: the flags, turned into the
//! argument structs of [`crate::data::commands`].

use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};

use super::{usage, Failure};
use crate::data::commands::{self, GenerateArgs, ImportArgs, InspectArgs, OutputFormat};
use crate::data::spec::SPEC_HELP;
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
    #[command(after_help = SPEC_HELP)]
    Generate {
        /// Dataset spec (see below).
        #[arg(long, default_value = "cluttered-mnist")]
        dataset: String,
        /// Output folder (must be new or empty).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 100_000)]
        train: usize,
        #[arg(long, default_value_t = 10_000)]
        valid: usize,
        #[arg(long, default_value_t = 10_000)]
        test: usize,
        #[arg(long, value_enum, default_value = "store")]
        format: Format,
    },
    /// Import PNG/JPEG/TIFF images, one class per subfolder, into a tiled store.
    Import {
        /// Folder with one subfolder of images per class.
        #[arg(long)]
        folder: PathBuf,
        /// Store folder to create.
        #[arg(long)]
        out: PathBuf,
        /// Resize every image to SIZE x SIZE (required when sizes differ).
        #[arg(long)]
        size: Option<usize>,
        /// Fraction of images in the valid split (fixed per file by a hash of its path).
        #[arg(long, default_value_t = 0.1)]
        valid_frac: f64,
        /// Fraction of images in the test split.
        #[arg(long, default_value_t = 0.1)]
        test_frac: f64,
    },
    /// Draw a grid of images with their proxies and labels to a PNG.
    #[command(after_help = SPEC_HELP)]
    Inspect {
        /// A store folder or a dataset spec (see below).
        dataset: String,
        #[arg(long, default_value = "grid.png")]
        out: PathBuf,
        #[arg(long, default_value_t = 12)]
        count: usize,
        #[arg(long, value_enum, default_value = "train")]
        split: SplitArg,
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
            let args = GenerateArgs {
                dataset,
                out,
                seed,
                sizes: SplitSizes { train, valid, test },
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
            out,
            size,
            valid_frac,
            test_frac,
        } => {
            let args = ImportArgs {
                folder,
                out,
                size,
                valid_frac,
                test_frac,
            };
            args.check().map_err(usage)?;
            commands::import(&args)?;
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
