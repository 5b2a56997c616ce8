//! The conformance suite as a test: on a machine with a CUDA device every kernel and GEMM form
//! must match the cpu reference; on a machine without one the test prints
//! `skipped: no CUDA device (<reason>)` and passes. It never panics for lack of CUDA.

use moelab::backend::cuda::check::{self, CheckOptions};
use moelab_kernels::{probe, Device};

#[test]
fn kernels_match_the_cpu_reference() {
    let info = match probe() {
        Ok(info) => info,
        Err(e) => {
            println!("skipped: no CUDA device ({e})");
            return;
        }
    };
    println!("device: {} (cc {}.{})", info.name, info.compute_capability.0, info.compute_capability.1);
    // A device is present, so a missing NVRTC or cuBLAS is a broken setup: fail with its message.
    let dev = Device::open(0).unwrap_or_else(|e| panic!("CUDA device present but unusable: {e}"));
    let opts = CheckOptions { seed: check::fresh_seed(), bench: None, nccl: false };
    println!("seed {}", opts.seed);
    let report = check::run(&dev, &opts, &mut |r| println!("{}", r.line()));
    println!("{} passed, {} failed", report.passed, report.failed);
    let failed: Vec<String> = report.checks.iter().filter(|c| !c.passed).map(|c| c.line()).collect();
    assert!(failed.is_empty(), "failed checks (seed {}):\n{}", opts.seed, failed.join("\n"));
}

#[test]
fn the_binary_skips_or_passes_and_writes_json() {
    let json = std::env::temp_dir().join(format!("moelab-gpu-check-{}.json", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moelab-gpu-check"))
        .args(["--no-bench", "--no-nccl", "--json"])
        .arg(&json)
        .output()
        .expect("run moelab-gpu-check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    match probe() {
        Err(e) if e.is_absent() => {
            assert!(out.status.success(), "the check must exit 0 without CUDA");
            assert!(stdout.starts_with("skipped: "), "{stdout}");
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("json written")).expect("valid json");
            assert!(v["skipped"].is_string());
        }
        _ => {
            assert!(out.status.success(), "moelab-gpu-check failed");
            assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
        }
    }
    let _ = std::fs::remove_file(&json);
}
