//! The `saccade` program: all of it is the library's [`saccade::cli`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    saccade::cli::run(saccade::cli::Cli::parse())
}
