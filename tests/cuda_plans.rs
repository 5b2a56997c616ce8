//! The cuda backend against the cpu reference, on real GPUs: every experiment in
//! experiments/gpu/ that fits the visible GPUs is cross-checked (one step's gradients, then
//! every training step's loss); a killed worker ends the job quickly with that rank's error.
//! Without a GPU each test prints `skipped: ...` and passes (CI has none; scripts/gpu-plans
//! runs the same checks on the device machines).

use moelab::backend::cuda::visible_gpus;
use moelab::run::crosscheck::crosscheck;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn gpu_experiments(max_world: usize) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/gpu");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "toml")).collect();
    files.sort();
    files.retain(|f| moelab::spec::load_file(f).map(|s| s.world() <= max_world).unwrap_or(true));
    files
}

#[test]
fn every_gpu_experiment_matches_the_cpu_reference() {
    let gpus = visible_gpus();
    if gpus == 0 {
        println!("skipped: no CUDA device visible");
        return;
    }
    std::env::set_var("MOELAB_BIN", env!("CARGO_BIN_EXE_moelab"));
    let runs = tempfile::tempdir().unwrap();
    let mut failed = Vec::new();
    for f in gpu_experiments(gpus) {
        let spec = moelab::spec::load_file(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let c = crosscheck(&spec, runs.path(), &Default::default()).unwrap();
        println!("{} {}: worst rel err {:.2e} over {} values", if c.passed { "PASS" } else { "FAIL" }, f.display(), c.worst, c.items.len());
        if !c.passed {
            failed.push(format!("{}: {:?} {:?}", f.display(), c.error, c.items.iter().filter(|i| !i.passed).take(5).collect::<Vec<_>>()));
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
}

/// Global ranks of this job's live workers: pid -> RANK from /proc.
fn workers_of(run_root: &Path) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if !cmd.contains("cuda-worker") || !cmd.contains(&*run_root.to_string_lossy()) {
            continue;
        }
        let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let rank = String::from_utf8_lossy(&env).split('\0').find_map(|kv| kv.strip_prefix("RANK=").and_then(|v| v.parse().ok()));
        if let Some(r) = rank {
            out.push((pid, r));
        }
    }
    out
}

#[test]
fn killing_a_worker_ends_the_job_with_its_error_quickly() {
    if visible_gpus() < 2 {
        println!("skipped: needs 2 GPUs ({} visible)", visible_gpus());
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/gpu/topk-2gpu.toml")).unwrap();
    let spec = src.replace("steps = 3", "steps = 100000");
    assert_ne!(spec, src, "the experiment names its step count");
    let file = tmp.path().join("long.toml");
    std::fs::write(&file, spec).unwrap();
    let runs = tmp.path().join("runs");
    let mut child = Command::new(env!("CARGO_BIN_EXE_moelab"))
        .args(["run", "-q"])
        .arg(&file)
        .arg("--runs-dir")
        .arg(&runs)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until both workers run, then let them train a moment.
    let t0 = Instant::now();
    let victim = loop {
        let w = workers_of(&runs);
        if w.len() == 2 {
            break w.into_iter().find(|(_, r)| *r == 1).unwrap().0;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "workers never started");
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_secs(5));
    let killed = Instant::now();
    Command::new("kill").args(["-9", &victim.to_string()]).status().unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(killed.elapsed() < Duration::from_secs(30), "the job still runs 30 s after a worker died");
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = killed.elapsed();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    println!("job ended {took:?} after the kill: {err}");
    assert!(!status.success());
    assert!(err.contains("rank 1") && err.contains("signal 9"), "{err}");
    assert!(workers_of(&runs).is_empty(), "no worker outlives the job");
    // The run directory keeps the spec, the log and the status.
    let dir = std::fs::read_dir(&runs).unwrap().next().unwrap().unwrap().path();
    let summary = std::fs::read_to_string(dir.join("summary.json")).unwrap();
    assert!(summary.contains("\"failed\""), "{summary}");
    assert!(dir.join("spec.toml").is_file() && dir.join("run.log").is_file());
}
