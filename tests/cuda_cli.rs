//! The command line with and without a usable GPU: `saccade device` always
//! works, `--device auto` takes a usable GPU or falls back to the CPU and
//! says why, `--device cuda` without a GPU exits with code 2 naming the
//! missing piece.

use std::process::{Command, Output};

fn saccade(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_saccade"))
        .args(args)
        .output()
        .expect("the saccade binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A one-epoch training run on a tiny generated dataset into a temporary folder.
fn tiny_train(device: &str) -> Output {
    let out = tempfile::tempdir().unwrap();
    saccade(&[
        "train",
        "--device",
        device,
        "--dataset",
        "cluttered-mnist-1",
        "--train-size",
        "64",
        "--valid-size",
        "16",
        "--test-size",
        "16",
        "--epochs",
        "1",
        "--out",
        out.path().to_str().unwrap(),
    ])
}

#[test]
fn device_command_reports_cpu_and_cuda_status() {
    let o = saccade(&["device"]);
    let stdout = text(&o.stdout);
    assert!(o.status.success(), "{stdout}{}", text(&o.stderr));
    assert!(stdout.contains("cpu: "), "{stdout}");
    assert!(stdout.contains("cuda: "), "{stdout}");
    assert!(stdout.contains("nvrtc: "), "{stdout}");
}

#[test]
fn train_device_cuda_without_gpu_exits_2_naming_the_missing_piece() {
    if saccade::device::cuda::probe(0).is_ok() {
        println!("skipped: a GPU is usable here");
        return;
    }
    let o = tiny_train("cuda");
    let stderr = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--device cuda"), "{stderr}");
    assert!(
        ["driver", "GPU", "NVRTC"].iter().any(|w| stderr.contains(w)),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn train_device_auto_takes_a_usable_gpu_else_the_cpu_in_one_line() {
    let o = tiny_train("auto");
    let stderr = text(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("device: "))
        .unwrap_or_else(|| panic!("no device line in:\n{stderr}"));
    // Every op has a kernel, so auto takes the GPU whenever one is usable.
    if saccade::Device::cuda(0).is_ok() {
        assert!(
            !line.starts_with("device: cpu"),
            "a usable GPU was not taken: {line}"
        );
    } else {
        assert!(line.starts_with("device: cpu (no usable GPU: "), "{line}");
    }
}
