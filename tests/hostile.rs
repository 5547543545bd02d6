//! The hostile probe of issue #24, replayed: every subcommand given sizes
//! that wrap, damaged or swapped files, a FIFO, flags that conflict, an
//! output that would replace a user's file. Each case must end within its
//! time bound with the exit code of its kind (2: refused as given; 1: the
//! input is bad), a message, no panic, and no file of the user's touched.
//! The slow cases (interruptions, a full disk) have their own tests in
//! tests/cli.rs and the library; these run in seconds.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Run the binary in `dir`, killing it after `limit`: its exit code (None
/// when killed or signalled) and stderr.
fn run_bounded(dir: &Path, args: &[&str], limit: Duration) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_saccade"))
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the saccade binary runs");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            child.kill().unwrap();
            let _ = child.wait();
            return (None, format!("hung: killed after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_hostile_probe_finds_no_panic_hang_silent_wrong_or_loss() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ok = |args: &[&str]| {
        let (code, err) = run_bounded(d, args, Duration::from_secs(60));
        assert_eq!(code, Some(0), "{args:?}: {err}");
    };
    let gen = [
        "data",
        "generate",
        "--dataset",
        "cluttered-mnist-1",
        "--train",
        "4",
        "--valid",
        "2",
        "--test",
        "2",
    ];
    ok(&[&gen[..], &["--out", "S"]].concat());
    ok(&[&gen[..], &["--format", "png", "--out", "P"]].concat());
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/pretrained/cluttered-mnist/model.safetensors"
    );
    // A checkpoint with bytes flipped in its tensors, a FIFO and an empty
    // JPEG where images are expected, a user's file where outputs go.
    let mut bytes = fs::read(model).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0x40;
    fs::write(d.join("damaged.safetensors"), &bytes).unwrap();
    let made = Command::new("mkfifo").arg(d.join("fifo.png")).status();
    let fifo = made.is_ok_and(|s| s.success());
    fs::write(d.join("empty.jpg"), b"").unwrap();
    fs::write(d.join("mine.png"), b"a user's picture").unwrap();
    fs::create_dir(d.join("flat")).unwrap();
    fs::write(d.join("flat/a.png"), b"").unwrap();

    let max = "18446744073709551615";
    let t = ["--device", "cpu"];
    let mut cases: Vec<(Vec<&str>, i32, &str)> = vec![
        // Sizes that wrap, overflow or cannot be allocated.
        (vec!["train", "--train-size", max], 2, "--train-size"),
        (vec!["train", "--valid-size", max], 2, "--valid-size"),
        (vec!["train", "--train-size", "4294967296"], 2, "--train-size"),
        (
            vec!["eval", "--checkpoint", model, "--test-size", max],
            2,
            "--test-size",
        ),
        (
            vec![
                "data", "generate", "--train", max, "--valid", "2", "--test", "2", "--out", "G",
            ],
            2,
            "--train",
        ),
        (
            vec![
                "data", "generate", "--train", "0", "--valid", "0", "--test", "0", "--out", "G",
            ],
            2,
            "nothing",
        ),
        (vec!["train", "--minutes", "inf"], 2, "--minutes"),
        (vec!["train", "--minutes", "1e300"], 2, "--minutes"),
        (vec!["train", "--proxy-noise", "inf"], 2, "--proxy-noise"),
        (vec!["train", "--batch-size", "0"], 2, "--batch-size"),
        (vec!["train", "--threads", "0"], 2, "--threads"),
        (vec!["train", "--lr", "-0.1"], 2, "--lr"),
        // Conflicting or idle flags.
        (
            vec![
                "train",
                "--dataset",
                "cluttered-mnist,proxy=16",
                "--proxy-size",
                "64",
            ],
            2,
            "twice",
        ),
        (vec!["train", "--dataset", "cluttered-mnist@"], 2, "no size"),
        (vec!["train", "--dataset", "S", "--train-size", "2"], 2, "store"),
        (vec!["train", "--tile", "64"], 2, "--tile"),
        (
            vec!["train", "--checkpointing"],
            2,
            "apply to --model tiled-resnet18 only",
        ),
        (
            vec!["train", "--resnet-width", "8"],
            2,
            "applies to the baselines",
        ),
        (
            vec!["train", "--threads", "100000"],
            2,
            "--threads 100000: this machine has",
        ),
        (vec!["train", "--resume", model], 2, "weights only"),
        (
            vec!["predict", "--checkpoint", model, "--split", "test", "P/test"],
            2,
            "--split",
        ),
        // Damaged, missing or wrong files.
        (vec!["eval", "--checkpoint", "damaged.safetensors"], 1, "damaged"),
        (
            vec!["eval", "--checkpoint", "nowhere.safetensors"],
            1,
            "nowhere.safetensors",
        ),
        (
            vec!["predict", "--checkpoint", model, "empty.jpg"],
            1,
            "empty.jpg: the file is empty (0 bytes)",
        ),
        (
            vec!["data", "import", "--folder", "flat", "--out", "I"],
            2,
            "no subfolders",
        ),
        (vec!["data", "inspect", "S", "--out", "mine.png"], 2, "mine.png"),
    ];
    // The paper preset at batch 4096 needs about 56 GiB: refused where
    // there is less (a larger machine would start training it).
    if saccade::bench::available_memory().is_some_and(|a| a < 40 << 30) {
        cases.push((
            vec!["train", "--preset", "paper", "--batch-size", "4096"],
            2,
            "--batch-size",
        ));
    } else {
        println!("skipped the memory case: over 40 GiB available here (or unknown)");
    }
    if fifo {
        cases.push((
            vec!["predict", "--checkpoint", model, "fifo.png"],
            1,
            "not a regular file",
        ));
    } else {
        println!("skipped the FIFO case: mkfifo failed here");
    }
    let mut failures = Vec::new();
    for (args, want, says) in &cases {
        let mut args = args.clone();
        if ["train", "eval", "predict"].contains(&args[0]) {
            args.extend(t);
        }
        if args[0] == "train" {
            args.extend(["--out", "R"]);
        }
        let (code, err) = run_bounded(d, &args, Duration::from_secs(60));
        let fine = code == Some(*want) && err.contains(says) && !err.contains("panicked");
        if !fine {
            failures.push(format!("{args:?}: exit {code:?} (want {want}), stderr: {err}"));
        }
        if d.join("R").exists() {
            failures.push(format!("{args:?}: left a run folder"));
            let _ = fs::remove_dir_all(d.join("R"));
        }
    }
    assert_eq!(fs::read(d.join("mine.png")).unwrap(), b"a user's picture");
    assert!(
        !d.join("G").exists() && !d.join("I").exists(),
        "a refused command wrote a dataset"
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
