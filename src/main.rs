//! The `saccade` program: all of it is the library's [`saccade::cli`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    if let Some(missing) = missing_cpu_features() {
        eprintln!(
            "error: this build of saccade needs a CPU with {missing} (x86-64-v3, see .cargo/config.toml); \
             this one has not. Rebuild for any x86-64 CPU with \
             RUSTFLAGS=\"-C target-cpu=x86-64\" cargo build --release"
        );
        return ExitCode::from(2);
    }
    saccade::cli::run(saccade::cli::Cli::parse())
}

/// The instruction sets the build was compiled for that this CPU lacks
/// (checked first: without them the program would die of SIGILL).
fn missing_cpu_features() -> Option<String> {
    #[cfg(target_arch = "x86_64")]
    {
        let mut missing = Vec::new();
        if cfg!(target_feature = "avx2") && !std::arch::is_x86_feature_detected!("avx2") {
            missing.push("AVX2");
        }
        if cfg!(target_feature = "fma") && !std::arch::is_x86_feature_detected!("fma") {
            missing.push("FMA");
        }
        if !missing.is_empty() {
            return Some(missing.join(" and "));
        }
    }
    None
}
