//! Helpers shared by the integration tests (`mod common;` in each; a test
//! crate that uses only some of them would otherwise warn of the others).
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// The release binary run in `dir` with `args`, its output collected.
pub fn saccade_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_saccade"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("the saccade binary runs")
}

/// The epochs listed in a metrics.jsonl, in order.
pub fn metric_epochs(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["epoch"]
                .as_u64()
                .unwrap()
        })
        .collect()
}
