//! `moelab-gpu-check`: runs every kernel and GEMM form on the GPU against the cpu reference,
//! times a dense bf16 GEMM, prints one line per check and a summary, and writes everything as
//! JSON with `--json PATH`.
//!
//! Exit status: 0 when every check passed or when there is no CUDA here (`skipped: <reason>`),
//! 1 when a check failed, 2 when CUDA is present but unusable (a missing library, a bad
//! ordinal) or the arguments are wrong.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use moelab::backend::cuda::check::{self, BenchOptions, CheckOptions};
use moelab_kernels::device::library_report;
use moelab_kernels::{probe_ordinal, Device};

const USAGE: &str = "usage: moelab-gpu-check [--json PATH] [--device N] [--seed N] [--no-bench] \
[--bench-size N] [--bench-reps N] [--no-nccl]";

struct Args {
    json: Option<PathBuf>,
    device: usize,
    seed: Option<u64>,
    bench: Option<BenchOptions>,
    nccl: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args { json: None, device: 0, seed: None, bench: Some(BenchOptions::default()), nccl: true };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value\n{USAGE}"));
        match a.as_str() {
            "--json" => args.json = Some(PathBuf::from(value("--json")?)),
            "--device" => args.device = value("--device")?.parse().context("--device")?,
            "--seed" => args.seed = Some(value("--seed")?.parse().context("--seed")?),
            "--no-bench" => args.bench = None,
            "--bench-size" => {
                let size = value("--bench-size")?.parse().context("--bench-size")?;
                args.bench.get_or_insert_with(BenchOptions::default).size = size;
            }
            "--bench-reps" => {
                let reps = value("--bench-reps")?.parse().context("--bench-reps")?;
                args.bench.get_or_insert_with(BenchOptions::default).reps = reps;
            }
            "--no-nccl" => args.nccl = false,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    Ok(args)
}

fn write_json(path: &Option<PathBuf>, value: &serde_json::Value) -> Result<()> {
    if let Some(p) = path {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(value)?;
        std::fs::write(p, text + "\n").with_context(|| format!("writing {}", p.display()))?;
        println!("wrote {}", p.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> Result<ExitCode> {
    let args = parse_args()?;

    let info = match probe_ordinal(args.device) {
        Ok(info) => info,
        Err(e) if e.is_absent() => {
            println!("skipped: {e}");
            write_json(&args.json, &serde_json::json!({ "skipped": e.to_string(), "libraries": library_report() }))?;
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => {
            write_json(&args.json, &serde_json::json!({ "error": e.to_string(), "libraries": library_report() }))?;
            bail!(e);
        }
    };
    println!(
        "device {}: {} (sm_{}{}, {} SMs, {:.1} GiB), driver CUDA {}.{}",
        info.ordinal,
        info.name,
        info.compute_capability.0,
        info.compute_capability.1,
        info.sm_count,
        info.total_memory_bytes as f64 / (1u64 << 30) as f64,
        info.driver_cuda_version.0,
        info.driver_cuda_version.1
    );

    let dev = match Device::open(args.device) {
        Ok(d) => d,
        Err(e) => {
            write_json(&args.json, &serde_json::json!({ "error": e.to_string(), "device": info, "libraries": library_report() }))?;
            bail!(e);
        }
    };
    println!("nvrtc {}.{}, target {}", dev.nvrtc_version().0, dev.nvrtc_version().1, dev.arch());
    // Compile (or read from the cache) every family up front, so that compile errors show
    // once here; the checks below would report them again, one per kernel.
    if let Err(e) = dev.load_all() {
        println!("kernels: {e}");
    }
    for r in dev.compile_records() {
        let how = if r.cache_hit { "cached".to_string() } else { format!("compiled in {:.0} ms", r.compile_ms) };
        let note = r.cache_error.as_ref().map(|e| format!(" (cache not written: {e})")).unwrap_or_default();
        println!("kernels {:?}: {how}{note}", r.family);
    }

    let opts = CheckOptions { seed: args.seed.unwrap_or_else(check::fresh_seed), bench: args.bench, nccl: args.nccl };
    println!("seed {}", opts.seed);
    let report = check::run(&dev, &opts, &mut |r| println!("{}", r.line()));

    if let Some(b) = &report.bench {
        println!(
            "gemm bf16 {}x{}x{}: median {:.3} ms (min {:.3}, max {:.3}) over {} reps after {} warm-up: {:.1} TFLOP/s",
            b.dims.m, b.dims.k, b.dims.n, b.median_ms, b.min_ms, b.max_ms, b.reps, b.warmup, b.tflops
        );
    }
    println!("{} passed, {} failed", report.passed, report.failed);
    write_json(&args.json, &serde_json::to_value(&report)?)?;
    Ok(if report.failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
