//! Megapixel MNIST's four tasks end to end through the binary: a tiny run
//! trains one head per task, `eval --json` reports each task by name, and a
//! store of the same images written as PNGs with a labels CSV, whose `max`
//! task lacks classes the model has, is scored the same after matching
//! classes by name.

mod common;
use common::saccade_in;

use std::path::Path;

fn ok(dir: &Path, args: &[&str]) -> String {
    let o = saccade_in(dir, args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn accuracies(json: &str) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_str(json.lines().last().unwrap()).unwrap();
    v["accuracy"].clone()
}

#[test]
fn four_tasks_train_eval_and_match_an_imported_store_by_class_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = ["--dataset", "megapixel-mnist@300,proxy=32"];
    let sizes = ["--train-size", "16", "--valid-size", "4", "--test-size", "6"];
    let model = [
        "--glimpses",
        "2",
        "--crop",
        "16",
        "--min-scale",
        "0.1",
        "--max-scale",
        "0.2",
    ];
    let policy = [
        "--focus",
        "peak",
        "--glimpse-pool",
        "attention",
        "--glimpse-position",
        "--ink-prior",
    ];
    let run = [
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--out",
        "R",
    ];
    ok(
        d,
        &["train"]
            .iter()
            .chain(&data)
            .chain(&sizes)
            .chain(&model)
            .chain(&policy)
            .chain(&run)
            .copied()
            .collect::<Vec<_>>(),
    );

    let generated = ok(
        d,
        &[
            "eval",
            "--checkpoint",
            "R/checkpoint.safetensors",
            "--test-size",
            "6",
            "--device",
            "cpu",
            "--json",
        ],
    );
    let acc = accuracies(&generated);
    for task in ["majority", "max", "top", "multi"] {
        let a = acc[task]
            .as_f64()
            .unwrap_or_else(|| panic!("no accuracy for {task}: {acc}"));
        assert!((0.0..=1.0).contains(&a));
    }

    // The test split (the run's data seed, 1) as PNGs + labels.csv, imported as a store: the same
    // images, the classes of each task those that occur.
    ok(
        d,
        &[
            "data",
            "generate",
            "--dataset",
            "megapixel-mnist@300",
            "--format",
            "png",
            "--train",
            "1",
            "--valid",
            "1",
            "--test",
            "6",
            "--seed",
            "1",
            "--out",
            "P",
        ],
    );
    ok(
        d,
        &[
            "data",
            "import",
            "--folder",
            "P",
            "--labels",
            "P/labels.csv",
            "--out",
            "S",
        ],
    );
    let imported = ok(
        d,
        &[
            "eval",
            "--checkpoint",
            "R/checkpoint.safetensors",
            "--dataset",
            "S",
            "--device",
            "cpu",
            "--json",
        ],
    );
    assert_eq!(
        accuracies(&imported),
        acc,
        "the same images scored differently through the store"
    );

    let text = ok(
        d,
        &[
            "eval",
            "--checkpoint",
            "R/checkpoint.safetensors",
            "--device",
            "cpu",
            "--test-size",
            "6",
        ],
    );
    assert!(
        text.contains("mean accuracy over 4 tasks") && text.contains("multi"),
        "{text}"
    );
}
