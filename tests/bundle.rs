//! The GPU bundle's script (.ci/gpu-run.sh, run.sh in the bundle) as a dry
//! run on the CPU: the first GPU session has minutes, so the script itself
//! must already work. Its saccade commands run on the CPU at reduced sizes;
//! the test binaries it would run on a GPU are absent here and recorded as
//! skipped.

use std::path::Path;
use std::process::Command;

#[test]
fn the_gpu_script_runs_every_step_and_writes_one_json() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_saccade"), bin.join("saccade")).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/gpu-run.sh");
    let o = Command::new("bash")
        .arg(&script)
        .env("OUT", dir.path())
        .env("SACCADE_BUNDLE_BIN", &bin)
        .env("SACCADE_BUNDLE_DEVICE", "cpu")
        .env("SACCADE_BUNDLE_QUICK", "1")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{log}");
    let text = std::fs::read_to_string(dir.path().join("gpu-results.json")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let steps = r["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "device",
            "cuda_parity",
            "whole_steps",
            "bench_batch2",
            "bench_batch4",
            "train_paper"
        ],
        "{log}"
    );
    for s in steps {
        let name = s["step"].as_str().unwrap();
        if matches!(name, "cuda_parity" | "whole_steps") {
            assert!(s["skipped"].as_str().unwrap().contains("not found"), "{s}");
            continue;
        }
        assert_eq!(s["rc"], 0, "{name} failed: {log}");
        assert!(s["seconds"].as_f64().unwrap() > 0.0, "{s}");
    }
    let saccade = &steps[3]["figures"]["comparisons"][0]["saccade"];
    assert!(saccade["step_seconds"].as_f64().unwrap() > 0.0, "{}", steps[3]);
    assert_eq!(steps[4]["figures"]["comparisons"][0]["batch_size"], 4);
    assert!(steps[5]["figures"]["test_accuracy"].is_number(), "{}", steps[5]);
    assert_eq!(r["device"], "cpu");
    assert!(dir.path().join("gpu-logs/train_paper.err").exists());
}
