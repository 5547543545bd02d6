//! Helpers shared by the integration tests (`mod common;` in each).

use std::path::Path;

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
