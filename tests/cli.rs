//! The `moelab` binary end to end, as a user runs it.

mod common;

use common::moelab;
use std::path::Path;

fn only_run_dir(root: &Path) -> std::path::PathBuf {
    let dirs: Vec<_> = std::fs::read_dir(root).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].clone()
}

#[test]
fn quickstart_runs_and_writes_a_complete_run_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let (code, out, err) = moelab(&["run", "experiments/quickstart.toml", "--runs-dir", runs.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    for needle in ["expert_gemm1", "all_to_all", "overlap", "Memory at peak", "peak memory: plan predicts", "run directory:"] {
        assert!(out.contains(needle), "output lacks {needle:?}:\n{out}");
    }
    let dir = only_run_dir(&runs);
    assert!(dir.file_name().unwrap().to_str().unwrap().ends_with("-quickstart"));
    for f in ["spec.toml", "run.log", "trace.json", "summary.json", "stages.parquet", "stages.csv", "overlap.parquet",
        "overlap.csv", "memory.parquet", "memory.csv"] {
        assert!(dir.join(f).is_file(), "missing {f}");
    }
    // The pictures: one step's timeline per rank and stream, the stages, memory per rank.
    let svg = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    assert!(svg("timeline.svg").starts_with("<svg") && svg("timeline.svg").contains("rank 3 comm"));
    assert!(svg("stages.svg").contains(">expert_gemm1<") && svg("stages.svg").contains(">all_to_all<"));
    assert_eq!(svg("memory.svg").matches(">rank ").count(), 4);
    let trace: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("trace.json")).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    assert!(events.iter().filter(|e| e["ph"] == "X").count() > 100);
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["status"], "completed");
    // Exposed communication is per rank and step, like the step time it is part of.
    let (exposed, step) = (summary["exposed_comm_ms"].as_f64().unwrap(), summary["step_time_ms"].as_f64().unwrap());
    assert!(exposed > 0.0 && exposed < step, "exposed {exposed} ms of a {step} ms step");
    for m in summary["memory"].as_array().unwrap() {
        assert_eq!(m["predicted_peak"], m["tracked_peak"], "{m}");
    }
    // The resolved spec runs unchanged.
    let again = tmp.path().join("again");
    let spec = dir.join("spec.toml");
    let (code, out, err) = moelab(&["run", "-q", spec.to_str().unwrap(), "--runs-dir", again.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}\n{err}");
}

#[test]
fn bad_spec_gives_one_clear_error_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.toml");
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/quickstart.toml"))
        .unwrap()
        .replace("ep = 4", "ep = 3");
    std::fs::write(&bad, text).unwrap();
    let runs = tmp.path().join("runs");
    let (code, _out, err) = moelab(&["run", bad.to_str().unwrap(), "--runs-dir", runs.to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("layout.ep") && err.contains("ep=3 does not divide n_experts=8"), "{err}");
    assert!(!runs.exists(), "a rejected spec must not create a run directory");
    let (code, _, err) = moelab(&["validate", bad.to_str().unwrap(), "experiments/quickstart.toml"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("bad.toml"), "{err}");
}

#[test]
fn validate_accepts_every_shipped_experiment() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments");
    // Every folder: on a machine without the GPUs a cuda spec needs, validate still checks it
    // and notes the missing GPUs instead of failing.
    let files: Vec<String> = [root.clone(), root.join("seeds"), root.join("gpu"), root.join("mixtral-ish"), root.join("bench-sim"), root.join("scaling")]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path().display().to_string()))
        .filter(|p| p.ends_with(".toml"))
        .collect();
    assert!(files.iter().any(|f| f.contains("seeds")), "the seed comparison specs are covered");
    let mut args = vec!["validate"];
    args.extend(files.iter().map(String::as_str));
    let (code, out, err) = moelab(&args, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().filter(|l| l.starts_with("ok: ")).count(), files.len());
    if moelab::backend::cuda::visible_gpus() < 2 {
        assert!(out.lines().any(|l| l.contains("topk-2gpu.toml") && l.contains("backend cuda") && l.contains("so `moelab run` refuses it on this machine")), "{out}");
    }
}

#[test]
fn a_failed_run_keeps_spec_log_trace_and_status() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let (code, _out, err) = moelab(
        &["run", "-q", "experiments/quickstart.toml", "--runs-dir", runs.to_str().unwrap()],
        &[("MOELAB_INJECT_FAILURE", "1:L1.expert_gemm2")],
    );
    assert_eq!(code, 1);
    assert!(err.contains("rank 1 failed in op L1.expert_gemm2"), "{err}");
    let dir = only_run_dir(&runs);
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["status"], "failed");
    assert!(summary["error"].as_str().unwrap().contains("L1.expert_gemm2"));
    // It failed in the warmup step: no step time to report (null, not 0).
    assert!(summary["step_time_ms"].is_null(), "{}", summary["step_time_ms"]);
    assert!(dir.join("spec.toml").is_file() && dir.join("trace.json").is_file());
    let log = std::fs::read_to_string(dir.join("run.log")).unwrap();
    assert!(log.contains("failed") && log.contains("status: failed"), "{log}");
}

#[test]
fn help_lists_every_command() {
    let (code, out, _) = moelab(&["--help"], &[]);
    assert_eq!(code, 0);
    for c in ["run", "validate", "plan", "predict"] {
        assert!(out.contains(c), "{out}");
    }
    let (code, out, _) = moelab(&["plan", "experiments/topk-dp2-ep2.toml"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("rank 3") && out.contains("predicted peak"), "{out}");
}

#[test]
fn compare_prints_one_row_per_experiment_and_writes_tables() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let (code, out, err) = moelab(
        &["compare", "experiments/seeds/topk.toml", "experiments/seeds/scmoe.toml", "--runs-dir", runs.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("seed-topk") && out.contains("seed-scmoe") && out.contains("overlap"), "{out}");
    let cmp = std::fs::read_dir(&runs).unwrap().map(|e| e.unwrap().path()).find(|p| p.to_str().unwrap().ends_with("-compare")).unwrap();
    let csv = std::fs::read_to_string(cmp.join("compare.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    assert!(cmp.join("compare.parquet").is_file());
}

/// Step lines come as the steps end, in order, the run log's own lines; `-q` drops them.
/// `MOELAB_RUNS_DIR` stands for `--runs-dir`, and empty means unset.
#[test]
fn step_lines_print_as_steps_end_and_moelab_runs_dir_places_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("from-env");
    let (code, out, err) = moelab(&["run", "experiments/quickstart.toml", "--set", "run.steps=2"], &[("MOELAB_RUNS_DIR", runs.to_str().unwrap())]);
    assert_eq!(code, 0, "{err}");
    let at = |needle: &str| out.find(needle).unwrap_or_else(|| panic!("{needle:?} missing: {out}"));
    assert!(at("running quickstart") < at("step 0 (warmup): loss") && at("step 0 (warmup)") < at("step 1: loss") && at("step 2: loss") < at("Stage"), "{out}");
    let dir = only_run_dir(&runs);
    let log = std::fs::read_to_string(dir.join("run.log")).unwrap();
    let line = out.lines().find(|l| l.starts_with("step 1:")).unwrap();
    assert!(log.contains(line), "the CLI's line is the log's: {line:?}\n{log}");
    let (code, out, _) = moelab(&["run", "-q", "experiments/quickstart.toml", "--set", "run.steps=1"], &[("MOELAB_RUNS_DIR", runs.to_str().unwrap())]);
    assert_eq!(code, 0);
    assert!(!out.lines().any(|l| l.starts_with("step ")), "{out}");
    assert_eq!(std::fs::read_dir(&runs).unwrap().count(), 2);
}

#[test]
fn compare_goes_on_past_a_failed_experiment_and_says_which_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let diverging = tmp.path().join("diverging.toml");
    let text = std::fs::read_to_string("experiments/quickstart.toml").unwrap();
    let text = text.replace("name = \"quickstart\"", "name = \"diverging\"").replace("[run]\n", "[run]\nlr = 1e30\n");
    std::fs::write(&diverging, text).unwrap();
    let (code, out, err) = moelab(
        &["compare", diverging.to_str().unwrap(), "experiments/seeds/topk.toml", "--set", "run.steps=8", "--runs-dir", runs.to_str().unwrap()],
        &[],
    );
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("the loss is NaN") && err.contains("1 of 2 experiments failed") && err.contains("diverging"), "{err}");
    // The other experiment still ran and is compared.
    assert!(out.contains("seed-topk") && !out.contains("diverging "), "{out}");
    let cmp = std::fs::read_dir(&runs).unwrap().map(|e| e.unwrap().path()).find(|p| p.to_str().unwrap().ends_with("-compare")).expect("comparison written");
    assert_eq!(std::fs::read_to_string(cmp.join("compare.csv")).unwrap().lines().count(), 2);
}

#[test]
fn set_overrides_fields_and_the_run_directory_keeps_them() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let (code, out, err) = moelab(
        &["run", "-q", "experiments/quickstart.toml", "--runs-dir", runs.to_str().unwrap(), "--set", "model.n_layers=1", "--set", "run.steps=1"],
        &[],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let spec = std::fs::read_to_string(only_run_dir(&runs).join("spec.toml")).unwrap();
    let doc: toml::Table = toml::from_str(&spec).unwrap();
    assert_eq!(doc["model"]["n_layers"].as_integer(), Some(1), "{spec}");
    assert_eq!(doc["run"]["steps"].as_integer(), Some(1), "{spec}");
    // --backend is one more override: --set still applies beside it.
    let runs2 = tmp.path().join("runs2");
    let (code, out, err) = moelab(
        &["run", "-q", "experiments/quickstart.toml", "--backend", "cpu", "--runs-dir", runs2.to_str().unwrap(), "--set", "model.n_layers=1", "--set", "run.steps=1"],
        &[],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let doc: toml::Table = toml::from_str(&std::fs::read_to_string(only_run_dir(&runs2).join("spec.toml")).unwrap()).unwrap();
    assert_eq!((doc["model"]["n_layers"].as_integer(), doc["run"]["backend"].as_str()), (Some(1), Some("cpu")));
    // Overrides are checked like the file: the field and the fix are named, nothing runs.
    let bad_runs = tmp.path().join("bad");
    let (code, _, err) = moelab(&["run", "experiments/quickstart.toml", "--runs-dir", bad_runs.to_str().unwrap(), "--set", "layout.ep=3"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("ep=3 does not divide n_experts=8"), "{err}");
    assert!(!bad_runs.exists());
    let (code, _, err) = moelab(&["validate", "experiments/quickstart.toml", "--set", "model.d_modle=3"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("d_modle") && err.contains("--set model.d_modle"), "{err}");
    let (code, _, err) = moelab(&["validate", "experiments/quickstart.toml", "--set", "oops"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("expected KEY=VALUE"), "{err}");
}

/// `crosscheck --buffers` without a GPU: the spec's cuda backend is refused with the usual
/// message before anything runs, and a cuda run that cannot start (the spec forced to pass
/// validation) is a failed cross-check with its error and no buffer list, never a panic.
#[test]
fn crosscheck_buffers_without_a_gpu_fails_clearly() {
    if moelab::backend::cuda::visible_gpus() > 0 {
        println!("skipped: a CUDA device is visible (scripts/gpu-xc-buffers runs the real thing)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let file = "experiments/gpu/topk-bf16-dropless-1gpu.toml";
    let (code, out, err) = moelab(&["crosscheck", "--buffers", file, "--runs-dir", runs.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("needs one GPU per rank"), "{err}");
    assert!(!err.contains("panicked") && !runs.exists(), "{err}");
    // A spec whose own backend is cpu (and one of 4 ranks) is checked for its cuda side too,
    // before the cpu reference runs: no work, no run directory, no panic from a missing NCCL.
    let json = tmp.path().join("xc.json");
    for f in [file, "experiments/quickstart.toml"] {
        let (code, out, err) =
            moelab(&["--set", "run.backend=cpu", "crosscheck", "--buffers", f, "--runs-dir", runs.to_str().unwrap(), "--json", json.to_str().unwrap()], &[]);
        assert_eq!(code, 1, "{out}\n{err}");
        assert!(err.contains("the cuda side of the cross-check") && err.contains("needs one GPU per rank"), "{err}");
        assert!(!err.contains("panicked") && !runs.exists() && !json.exists(), "{err}");
    }
}

#[test]
fn predict_compares_a_run_directory_with_the_sim_and_names_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let (code, out, err) = moelab(&["run", "-q", "experiments/gpu/topk-1gpu.toml", "--backend", "cpu", "--runs-dir", runs.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    let dir = only_run_dir(&runs);
    let d = dir.to_str().unwrap();
    let json = tmp.path().join("p.json");
    let (code, out, err) = moelab(&["predict", d, "--profile", "h200", "--json", json.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    for needle in ["profile h200", "cpu ", "ms, sim ", "error ", "(target 15%:", "expert_gemm1_bwd", "small", "within 25%"] {
        assert!(out.contains(needle), "output lacks {needle:?}:\n{out}");
    }
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc[0]["comparison"]["predicted_backend"], "sim");
    assert!(doc[0]["comparison"]["stages"].as_array().unwrap().len() > 10);
    let (code, out, err) = moelab(&["predict", d, "--profile", "h200", "--markdown"], &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.starts_with("| run | measured step (ms) | sim step (ms) |"), "{out}");
    assert_eq!(out.lines().count(), 3, "{out}");
    // The measured run directory is only read.
    assert_eq!(std::fs::read_dir(&runs).unwrap().count(), 1);
    // The folder of run directories stands for the runs in it.
    let (code, out, err) = moelab(&["predict", runs.to_str().unwrap(), "--profile", "h200", "--markdown"], &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(out.lines().count(), 3, "{out}");
    // A folder with no run directory in it is read as one, and says so.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (code, _, err) = moelab(&["predict", empty.to_str().unwrap(), "--profile", "h200"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("summary.json"), "{err}");

    let (code, _, err) = moelab(&["predict", d], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("records no GPU") && err.contains("--profile"), "{err}");
    let missing = tmp.path().join("no-such-run");
    let (code, _, err) = moelab(&["predict", missing.to_str().unwrap(), "--profile", "h200"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("no-such-run") && err.contains("no such run directory"), "{err}");
}

/// `moelab calibrate --from` refits a stored calibration without a GPU and writes the profile
/// and the JSON into folders that do not exist yet (a typo'd or fresh `--out` loses nothing).
#[test]
fn calibrate_from_writes_into_missing_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("new/profiles/h200-refit.toml");
    let json = tmp.path().join("other/dir/refit.json");
    let from = "docs/device-runs/calibration/calibration-h200-20261123-1511.json";
    let (code, stdout, err) = moelab(&["calibrate", "--from", from, "--out", out.to_str().unwrap(), "--json", json.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{err}");
    let text = std::fs::read_to_string(&out).expect("profile written");
    assert!(text.contains("[gpu.gemm"), "{text}");
    assert!(json.is_file(), "json written");
}

/// Measurements the profile fit refuses (here a GEMM above the GPU's peak) still reach the
/// `--json` file, and the error says where they are: nothing measured is lost to a bad fit.
#[test]
fn calibrate_keeps_the_raw_measurements_when_the_fit_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let from = "docs/device-runs/calibration/calibration-h200-20261123-1511.json";
    let mut doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(from).unwrap()).unwrap();
    doc["calibration"]["gemms"][0]["tflops"] = serde_json::json!(5000.0);
    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, doc.to_string()).unwrap();
    let (out, json) = (tmp.path().join("p.toml"), tmp.path().join("raw.json"));
    let (code, stdout, err) = moelab(&["calibrate", "--from", bad.to_str().unwrap(), "--out", out.to_str().unwrap(), "--json", json.to_str().unwrap()], &[]);
    assert_ne!(code, 0, "stdout:\n{stdout}");
    assert!(err.contains("exceeds peak_tflops") && err.contains("raw.json") && err.contains("--from"), "{err}");
    assert!(!out.exists(), "no profile from a refused fit");
    let raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("raw measurements written")).unwrap();
    assert_eq!(raw["calibration"]["gemms"][0]["tflops"], 5000.0);
}

/// The shipped H200 profile against stored H200 measurements (`docs/device-runs`): the sim's
/// step stays within the 15% target on the runs docs/benchmarks.md reports within it, so a
/// change to the cost model or the profile that breaks its calibration fails here, without a
/// GPU. (Three of them were the fit's own data, two were not.)
#[test]
fn the_shipped_profiles_predict_the_stored_session_8_to_17_runs_within_15_percent() {
    // The executor's runs on 1x H100 and 1x H200: six bf16 bench plans, bf16 topk and MPMoE
    // mixtral-ish, from session 8 (routing on the device), session 9 (the memory pool
    // reserved up front) and session 10 (a warp per token in the routing kernel, per-block
    // routing counts; also ScMoE, DGMoE and Tutel at mixtral-ish size), and the f32 topk
    // mixtral-ish run of session 7 (GEMM-bound); the profile is chosen by the device each run
    // recorded. Session 10's runs also hold the stages of at least 2% of the step within
    // 25%, dropless ones at their measured imbalance and capacity ones at their measured kept
    // share: all 204 (the executor calls every per-expert GEMM shape once before the first
    // step, so no step meets cuBLAS's first call of a shape). Session 11 (H200): the
    // executor no longer zeroes expert outputs that the GEMMs write whole, and warms batched
    // block shapes too; its H200 stages are held the same way. Session 12 (both GPUs, the
    // variants again): the executor keeps host copies of its routing tables, so only a
    // table's first reader waits for the stream (the sim prices the runs before it with a
    // synchronising copy per read, as their records say); its stages are held too. DGMoE's
    // expert_gemm2_bwd (+28% H200, +30% H100 before session 14) is held since the sim prices
    // the expert GEMMs' speed-up over their zero padding rows (`kernels.zero_row_gain`).
    // Session 14 (both GPUs, fresh runs after the zero-row gains went into the profiles):
    // the five designs, topk at capacity factors 1.0 and 2.0 too (kept 0.28 and 0.63: 72% and
    // 69% of the expert rows zero), and the bench plans; every stage held. Session 14b: the
    // routing backward one warp per token (topk, DGMoE, the bench plans); every stage held,
    // and the routing backward's small stage (`topk_bwd`) within 25% in every run. Session
    // 17 (both GPUs, `scripts/gpu-sim-1gpu` with that session's binary, after the f32 outputs
    // were priced by reduction length): every step within 9%; every stage of at least 2% held
    // but one, H100 fine-grained dropless's forward gate (-56%), where the host stalled
    // 0.9-1.3 ms in two of the eight steps. Session 20 (both GPUs, 2026-11-25, the same
    // script with that session's binary): every step within 8%; every stage of at least 2%
    // held but one, H200 fine-grained dropless's backward combine (+26%).
    let (mut within, mut big) = (0, 0);
    let (mut within17, mut big17) = (0, 0);
    let (mut within20, mut big20) = (0, 0);
    for session in ["s8", "s9", "s10", "s11", "s12", "s14", "s14b", "s17", "s20"] {
        for gpu in ["h100", "h200"] {
            let dir = |d: &str| {
                let mut v: Vec<std::path::PathBuf> =
                    std::fs::read_dir(format!("{}/docs/device-runs/{d}", env!("CARGO_MANIFEST_DIR"))).unwrap().map(|e| e.unwrap().path()).collect();
                v.sort();
                v
            };
            let mut runs = dir(&format!("{gpu}-{session}/mixtral-ish-runs"));
            runs.extend(dir(&format!("{gpu}-{session}/bench-sim-runs")));
            // Sessions 10 and 12 add ScMoE, DGMoE and Tutel at mixtral-ish size.
            if session == "s10" || session == "s12" {
                runs.extend(dir(&format!("{gpu}-{session}/variants-runs")));
            }
            runs.extend(dir(&format!("{gpu}-s7/mixtral-ish-runs")).into_iter().filter(|p| p.to_string_lossy().ends_with("mixtral-topk-1gpu")));
            let n = match session {
                "s10" | "s12" | "s17" | "s20" => 12,
                "s14" => 14,
                _ => 9,
            };
            assert_eq!(runs.len(), n, "{gpu} {session}: {runs:?}");
            let doc = predict_json(&runs);
            assert_eq!(doc.len(), n);
            for r in &doc {
                assert_eq!(r["profile"], gpu, "{r}");
                let e = r["comparison"]["step_error"].as_f64().unwrap();
                assert!(e.is_finite() && e.abs() < 0.15, "{gpu} {session} {}: step error {e}", r["name"]);
                let name = r["name"].as_str().unwrap();
                let dropless = name.contains("dropless");
                assert_eq!(r["dropless_imbalance"].as_f64().is_some_and(|i| i > 1.0), dropless, "{r}");
                // The full mixtral-ish runs dropped most assignments (the router collapsed
                // after the first Adam step); the bench plans kept nearly all.
                let kept = r["kept_share"].as_f64();
                assert_eq!(kept.is_some(), !dropless, "{r}");
                if let Some(k) = kept {
                    assert!(if name.starts_with("mixtral") { k < 0.75 } else { k > 0.95 }, "{name}: kept {k}");
                }
                // H100 session 11: MPMoE's backward permute stays -43% (docs/benchmarks.md):
                // every chunk layout waited for its stream to drain and then built its row map
                // on the host; session 12's host copies end that (its stages are held).
                // (Not the f32 topk run of session 7 each session's list ends with.)
                if session == "s14b" && name != "mixtral-topk-1gpu" {
                    let route_bwd = r["comparison"]["stages"].as_array().unwrap().iter().find(|st| st["label"] == "topk_bwd").expect("a routing backward");
                    assert!(route_bwd["within"] == true, "{gpu} {name}: {route_bwd}");
                }
                // Count the run's stages >= 2% of the step into (within, big), but `excepted`.
                let tally = |excepted: &dyn Fn(&str) -> bool, within: &mut usize, big: &mut usize| {
                    for st in r["comparison"]["stages"].as_array().unwrap() {
                        if excepted(st["label"].as_str().unwrap()) {
                            continue;
                        }
                        if st["small"] == false && !st["predicted_ms"].is_null() && !st["measured_ms"].is_null() {
                            *big += 1;
                            *within += (st["within"] == true) as usize;
                        }
                    }
                };
                if session == "s17" {
                    // H100 fine-grained dropless: its forward gate stalled on the host in two
                    // of the eight steps (docs/benchmarks.md); the one stage not held.
                    tally(&|label| gpu == "h100" && name == "bench-sim-fine-grained-dropless" && label == "gate", &mut within17, &mut big17);
                }
                if session == "s20" {
                    tally(&|label| gpu == "h200" && name == "bench-sim-fine-grained-dropless" && label == "combine_bwd", &mut within20, &mut big20);
                }
                if ["s10", "s12", "s14", "s14b"].contains(&session) || (session == "s11" && gpu == "h200") {
                    tally(&|_| false, &mut within, &mut big);
                }
            }
        }
    }
    assert!(big >= 800 && within == big, "sessions 10 to 14: {within} of {big} stages >= 2% within 25%");
    // Session 17's tally counts the session-7 f32 topk run each list ends with too.
    assert!(big17 >= 190 && within17 == big17, "session 17: {within17} of {big17} stages >= 2% within 25%, the H100 gate's host stall apart");
    assert!(big20 >= 190 && within20 == big20, "session 20: {within20} of {big20} stages >= 2% within 25%, the H200 combine_bwd apart");
}

/// The stored 2x H200 run directories of `session` (`docs/device-runs/h200x2-<session>/`:
/// the mixtral-ish designs and the bench plans), sorted.
fn stored_2gpu_runs(session: &str) -> Vec<std::path::PathBuf> {
    let mut runs: Vec<std::path::PathBuf> = Vec::new();
    for d in ["mixtral-ish-2gpu-runs", "bench-sim-2gpu-runs"] {
        let dir = format!("{}/docs/device-runs/h200x2-{session}/{d}", env!("CARGO_MANIFEST_DIR"));
        runs.extend(std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()));
    }
    runs.sort();
    runs
}

/// `moelab predict --json` over `runs`: one object per run (the command must succeed).
fn predict_json(runs: &[std::path::PathBuf]) -> Vec<serde_json::Value> {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("p.json");
    let mut args: Vec<&str> = vec!["predict", "--json", json.to_str().unwrap()];
    args.extend(runs.iter().map(|p| p.to_str().unwrap()));
    let (code, out, err) = moelab(&args, &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    doc.as_array().expect("a JSON array").clone()
}

/// MPMoE's granularity out of sample (1x H200, 2026-11-24 14:57 UTC, mixtral-ish bf16 at 8,
/// 16, 32 and 64 chunks, `docs/device-runs/h200-s16/`): every step within the 15% target and
/// the ops the chunks multiply (the host-built chunk layouts of the permute stages) within
/// 25%, with the sweep's chunk-row GEMMs and host issue in the profile. The backward expert
/// GEMMs, whose f32 weight gradients every chunk after the first adds to, within 15% with the
/// f32 output priced by reduction length (80-640 rows per chunk; they were 15-18% short with
/// one share for every length). The steps grow 3.06x from 8 to 64 chunks. The same sweep on
/// 1x H100 (2026-11-24 16:22 UTC, `docs/device-runs/h100-s17/`, run after the model was fitted
/// from the calibrate sweep) holds the H100 profile to the same bounds.
#[test]
fn the_h200_and_h100_profiles_predict_mpmoe_from_8_to_64_chunks() {
    for (dir, profile) in [("docs/device-runs/h200-s16/mpmoe-chunks-runs", "h200"), ("docs/device-runs/h100-s17/mpmoe-chunks-runs", "h100")] {
        mpmoe_chunks_predicted(dir, profile);
    }
}

fn mpmoe_chunks_predicted(dir: &str, profile: &str) {
    let mut runs: Vec<std::path::PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    runs.sort();
    assert_eq!(runs.len(), 4, "{runs:?}");
    let mut steps = Vec::new();
    for r in &predict_json(&runs) {
        assert_eq!(r["profile"], profile, "{r}");
        let name = r["name"].as_str().unwrap();
        let c = &r["comparison"];
        let e = c["step_error"].as_f64().unwrap();
        assert!(e.is_finite() && e.abs() < 0.15, "{name}: step error {e}");
        for st in c["stages"].as_array().unwrap().iter().filter(|st| st["label"].as_str().unwrap().starts_with("permute")) {
            assert!(st["within"] == true, "{name} {}: {st}", st["label"]);
        }
        let expert_bwd: Vec<&serde_json::Value> = c["stages"].as_array().unwrap().iter().filter(|st| st["label"].as_str().unwrap().starts_with("expert_gemm") && st["label"].as_str().unwrap().ends_with("_bwd")).collect();
        assert_eq!(expert_bwd.len(), 2, "{name}");
        for st in expert_bwd {
            let e = st["error"].as_f64().unwrap();
            assert!(e.is_finite() && e.abs() < 0.15, "{name} {}: {st}", st["label"]);
        }
        steps.push((name.to_string(), c["measured_step_ms"].as_f64().unwrap()));
    }
    steps.sort_by(|a, b| a.1.total_cmp(&b.1));
    let names: Vec<&str> = steps.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(names, ["mixtral-mpmoe-1gpu-c8", "mixtral-mpmoe-1gpu-c16", "mixtral-mpmoe-1gpu-c32", "mixtral-mpmoe-1gpu-c64"], "finer chunks cost more");
}

/// The first 2-GPU runs of the current executor (2x H200, NVLink, 2026-11-24): the four
/// mixtral-ish designs at ep = 2 (topk, MPMoE, ScMoE, Tutel) and the six bench plans at
/// ep = 2 stay within the 15% step target with their all-to-alls, all-reduces and
/// all-gathers; every collective stage has its wait for the last member split out. Every
/// run is simulated at the rows each rank's experts took (from the return all-to-alls'
/// bytes): in dropless mixtral-ish the rank holding the fullest expert took 8% more than the
/// mean; in the capacity runs the rank whose experts took more rows has fewer zero rows.
#[test]
fn the_h200_profile_predicts_the_stored_2gpu_runs_within_15_percent() {
    let runs = stored_2gpu_runs("s10");
    assert_eq!(runs.len(), 10, "{runs:?}");
    for r in &predict_json(&runs) {
        assert_eq!(r["profile"], "h200", "{r}");
        let e = r["comparison"]["step_error"].as_f64().unwrap();
        assert!(e.is_finite() && e.abs() < 0.15, "{}: step error {e}", r["name"]);
        let collectives: Vec<&serde_json::Value> =
            r["comparison"]["stages"].as_array().unwrap().iter().filter(|st| st["label"].as_str().is_some_and(|n| n.starts_with("all_"))).collect();
        assert!(collectives.len() >= 3, "{}: {collectives:?}", r["name"]);
        assert!(collectives.iter().all(|st| st["measured_wait_ms"].as_f64().is_some_and(|w| w >= 0.0)), "{}: {collectives:?}", r["name"]);
        let name = r["name"].as_str().unwrap();
        // Every run is at ep = 2: simulated at the rows each rank's experts took.
        let l: Vec<f64> = r["rank_loads"].as_array().unwrap_or_else(|| panic!("{name}: no rank loads")).iter().map(|x| x.as_f64().unwrap()).collect();
        assert!(l.len() == 2 && (l[0] + l[1] - 2.0).abs() < 1e-9, "{name}: {l:?}");
        if name.contains("mixtral-ish-dropless") {
            assert!(l[0] > 1.06 && l[0] < 1.1, "{name}: {l:?}");
        }
        if name == "mixtral-topk-2gpu" {
            // The capacity kept rank 0's tokens first: rank 1's experts took 4 times as many.
            assert!(l[1] > 1.5, "{name}: {l:?}");
        }
    }
}

/// The 2-GPU runs of session 13 (2x H200, NV18, 2026-11-24, ranks' clocks aligned): seven
/// mixtral-ish designs at 2 GPUs (topk, MPMoE, ScMoE, Tutel, DGMoE at ep = 2; PPMoE and TED at
/// tp = 2) and the six bench plans at ep = 2. Every step within 15%. The expert GEMM stages
/// of every capacity run are within 25% (MPMoE's and Tutel's `expert_gemm2` were +29% before
/// the sim priced their zero padding rows). Each ep = 2 run is simulated at the rows each
/// rank's experts took: in mixtral-ish the capacity kept rank 0's tokens first and rank 1's
/// experts took 4 times rank 0's rows, so rank 0's expert GEMMs ran 6-7% faster over more
/// zero rows and rank 0 waited in topk's serial all-to-alls, now predicted (-39% before).
/// With the ranks' clocks aligned, each of the topk run's all-to-alls ends together on both
/// ranks.
#[test]
fn the_h200_profile_predicts_the_session_13_2gpu_runs_and_the_topk_ranks_skew() {
    let runs = stored_2gpu_runs("s13");
    assert_eq!(runs.len(), 13, "{runs:?}");
    let (mut within, mut big) = (0, 0);
    for r in &predict_json(&runs) {
        let name = r["name"].as_str().unwrap();
        assert_eq!(r["profile"], "h200", "{r}");
        let e = r["comparison"]["step_error"].as_f64().unwrap();
        assert!(e.is_finite() && e.abs() < 0.15, "{name}: step error {e}");
        assert_eq!(r["rank_loads"].is_array(), !name.contains("ppmoe") && !name.contains("ted"), "{name}: {}", r["rank_loads"]);
        // Exposed communication: the sim is optimistic on every run (by 2 to 35% here).
        let overlap = &r["comparison"]["overlap"];
        let (m, p) = (overlap["measured"]["exposed_ms"].as_f64().unwrap(), overlap["predicted"]["exposed_ms"].as_f64().unwrap());
        assert!(m > 0.0 && (p / m - 1.0).abs() < 0.4, "{name}: exposed comm {m} ms measured, {p} predicted");
        for st in r["comparison"]["stages"].as_array().unwrap() {
            if st["small"] == false && !st["predicted_ms"].is_null() && !st["measured_ms"].is_null() {
                big += 1;
                within += (st["within"] == true) as usize;
            }
            let label = st["label"].as_str().unwrap();
            let expert_gemm = !name.contains("dropless") && label.starts_with("expert_gemm") && st["small"] == false;
            let skew_wait = name == "mixtral-topk-2gpu" && label == "all_to_all_bwd";
            if expert_gemm || skew_wait {
                assert!(st["within"] == true, "{name} {label}: {st}");
            }
        }
    }
    assert!(big >= 130 && within >= 124, "{within} of {big} stages >= 2% within 25%");
    // Aligned clocks: each all-to-all of the topk run ends within 50 us on both ranks.
    let topk = runs.iter().find(|p| p.to_string_lossy().ends_with("mixtral-topk-2gpu")).unwrap();
    let trace: serde_json::Value = serde_json::from_str(&::moelab::run::run_file::read_run_file(topk, "trace.json").unwrap().0).unwrap();
    let mut ends: std::collections::HashMap<(u64, String), Vec<f64>> = std::collections::HashMap::new();
    for e in trace["traceEvents"].as_array().unwrap().iter().filter(|e| e["ph"] == "X" && e["cat"].as_str().is_some_and(|c| c.starts_with("all_to_all"))) {
        let key = (e["args"]["step"].as_u64().unwrap(), e["name"].as_str().unwrap().to_string());
        ends.entry(key).or_default().push(e["ts"].as_f64().unwrap() + e["dur"].as_f64().unwrap());
    }
    assert_eq!(ends.len(), 16, "{ends:?}");
    for (k, v) in &ends {
        assert!(v.len() == 2 && (v[0] - v[1]).abs() < 50.0, "{k:?}: {v:?}");
    }
}

/// The all-to-alls that run beside expert or dense GEMMs in session 13 (MPMoE's, Tutel's,
/// ScMoE's) within 25%: their kernels wait for the GEMM running beside them, which the sim
/// models (they were 62-88% short before). Checked at equal rank loads: that executor kept
/// the two ranks' compute streams in step at every chunk (each rank's next expert GEMM began
/// 95-180 us after the later rank entered the all-to-all: a buffer release on the compute
/// stream waited for all the comm stream had queued, fixed since; docs/benchmarks.md "Each
/// rank's kept rows"), so the faster rank waited outside the all-to-alls; at the measured
/// loads the sim puts that wait inside them (+27..+44% backward). A 2-GPU run of the current
/// executor will tell whether it does so now. Where the executor's own launch race went both
/// ways between the two steps (ScMoE's forward all-to-alls: 6.84 ms in step 0, where the
/// combine all-to-alls waited for the GEMM beside them, 2.13 ms in step 1, where they did
/// not), the sim, which decides each race one way, must land within 25% of the range the
/// steps span rather than of their mean.
#[test]
fn the_h200_profile_predicts_the_session_13_all_to_alls_beside_gemms_at_equal_rank_loads() {
    let runs: Vec<std::path::PathBuf> = stored_2gpu_runs("s13").into_iter().filter(|p| ["mpmoe", "tutel", "scmoe"].iter().any(|v| p.to_string_lossy().ends_with(&format!("mixtral-{v}-2gpu")))).collect();
    assert_eq!(runs.len(), 3, "{runs:?}");
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("p.json");
    let mut args: Vec<&str> = vec!["predict", "--set", "run.rank_loads=[1.0, 1.0]", "--json", json.to_str().unwrap()];
    args.extend(runs.iter().map(|p| p.to_str().unwrap()));
    let (code, out, err) = moelab(&args, &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let mut raced = 0;
    for (r, dir) in doc.as_array().unwrap().iter().zip(&runs) {
        let name = r["name"].as_str().unwrap();
        let a2a: Vec<&serde_json::Value> = r["comparison"]["stages"].as_array().unwrap().iter().filter(|st| st["label"].as_str().unwrap().starts_with("all_to_all")).collect();
        assert_eq!(a2a.len(), 2, "{name}: {a2a:?}");
        assert!(dir.to_string_lossy().ends_with(name), "{dir:?}: {name}");
        let steps = stage_ms_by_step(dir, 2);
        for st in a2a {
            let label = st["label"].as_str().unwrap();
            let per_step = &steps[label];
            let (lo, hi) = per_step.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            if hi > 2.0 * lo {
                raced += 1;
                let p = st["predicted_ms"].as_f64().unwrap();
                assert!(p >= 0.75 * lo && p <= 1.25 * hi, "{name} {label}: predicted {p} ms, steps {per_step:?}");
            } else {
                assert!(st["within"] == true, "{name} {label}: {st}");
            }
        }
    }
    assert_eq!(raced, 1, "only ScMoE's forward all-to-alls raced both ways");
}

/// Milliseconds per step of each stage of a stored run's trace, per step, averaged over its
/// `ranks` (what `moelab predict` compares, before the mean over steps).
fn stage_ms_by_step(dir: &Path, ranks: usize) -> std::collections::HashMap<String, Vec<f64>> {
    let trace: serde_json::Value = serde_json::from_str(&::moelab::run::run_file::read_run_file(dir, "trace.json").unwrap().0).unwrap();
    let mut by: std::collections::BTreeMap<(String, u64), f64> = std::collections::BTreeMap::new();
    for e in trace["traceEvents"].as_array().unwrap().iter().filter(|e| e["ph"] == "X") {
        let (Some(stage), Some(step)) = (e["cat"].as_str(), e["args"]["step"].as_u64()) else { continue };
        *by.entry((stage.to_string(), step)).or_default() += e["dur"].as_f64().unwrap() / 1e3 / ranks as f64;
    }
    let mut out: std::collections::HashMap<String, Vec<f64>> = std::collections::HashMap::new();
    for ((stage, _), ms) in by {
        out.entry(stage).or_default().push(ms);
    }
    out
}

#[test]
fn the_h200_profile_predicts_stored_h200_runs_within_15_percent() {
    let runs = [
        "docs/device-runs/mixtral-ish-1gpu/runs-s6/20261123-160203-mixtral-topk-1gpu",
        "docs/device-runs/mixtral-ish-1gpu/runs-s6/20261123-160103-mixtral-topk-1gpu-bf16",
        "docs/device-runs/bench-sim-cuda-s6/runs/20261123-155238-bench-sim-mixtral-ish-cf125",
        "docs/device-runs/bench-sim-cuda-s6/runs/20261123-155303-bench-sim-small-tokens-cf125",
    ];
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("p.json");
    let mut args = vec!["predict", "--json", json.to_str().unwrap()];
    args.extend(runs);
    let (code, out, err) = moelab(&args, &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc.as_array().unwrap().len(), runs.len());
    for r in doc.as_array().unwrap() {
        assert_eq!(r["profile"], "h200", "{r}");
        let e = r["comparison"]["step_error"].as_f64().unwrap();
        assert!(e.is_finite() && e.abs() < 0.15, "{}: step error {e}", r["name"]);
    }
}

#[test]
fn output_to_a_closed_pipe_is_dropped_and_the_run_still_completes() {
    // `moelab run ... | head -1`: the reader goes away; moelab neither panics nor stops.
    let tmp = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_moelab"))
        .args(["run", "experiments/quickstart.toml", "--set", "run.steps=1", "--runs-dir", tmp.path().to_str().unwrap()])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starts");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("waits");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("panicked"), "{:?}: {err}", out.status);
    let dir = std::fs::read_dir(tmp.path()).unwrap().flatten().next().expect("a run directory").path();
    let summary = std::fs::read_to_string(dir.join("summary.json")).unwrap();
    assert!(summary.contains("\"status\": \"completed\""), "{summary}");
}

#[test]
fn sigterm_cancels_a_run_and_keeps_its_directory() {
    // What `kill`, `timeout` and Slurm's scancel send: the run ends as cancelled, like Ctrl-C.
    let tmp = tempfile::tempdir().unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_moelab"))
        .args(["run", "-q", "experiments/quickstart.toml", "--set", "run.steps=100000", "--runs-dir", tmp.path().to_str().unwrap()])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starts");
    // Wait for a measured step in the log, then terminate.
    let t0 = std::time::Instant::now();
    let stepped = || {
        std::fs::read_dir(tmp.path()).ok().and_then(|mut d| d.next()).and_then(|e| e.ok()).and_then(|e| std::fs::read_to_string(e.path().join("run.log")).ok()).is_some_and(|l| l.contains("step 1:"))
    };
    while !stepped() {
        assert!(t0.elapsed().as_secs() < 120, "no step logged");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let killed = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill runs");
    assert!(killed.success());
    let out = child.wait_with_output().expect("waits");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(130) && !err.contains("panicked"), "a cancelled run exits 130: {:?}: {err}", out.status);
    let dir = std::fs::read_dir(tmp.path()).unwrap().flatten().next().expect("a run directory").path();
    let summary = std::fs::read_to_string(dir.join("summary.json")).expect("summary written");
    assert!(summary.contains("\"status\": \"cancelled\""), "{summary}");
    assert!(std::fs::read_to_string(dir.join("run.log")).unwrap().contains("cancelled"));
}

#[test]
fn predict_over_a_folder_skips_a_run_it_cannot_read_and_predicts_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let stored = std::path::Path::new("docs/device-runs/h200-s17/bench-sim-runs/20261124-163807-bench-sim-fine-grained-cf125");
    let good = runs.join("20261124-163807-bench-sim-fine-grained-cf125");
    std::fs::create_dir_all(&good).unwrap();
    for e in std::fs::read_dir(stored).unwrap().flatten() {
        std::fs::copy(e.path(), good.join(e.file_name())).unwrap();
    }
    // A run cancelled before it measured anything: its summary is there, its trace is not.
    let bad = runs.join("20261124-000000-cancelled");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("summary.json"), "{\"status\": \"cancelled\"}").unwrap();
    std::fs::write(bad.join("spec.toml"), std::fs::read_to_string("experiments/quickstart.toml").unwrap()).unwrap();
    let (code, out, err) = moelab(&["predict", runs.to_str().unwrap(), "--runs-dir", tmp.path().join("sim").to_str().unwrap()], &[]);
    // The rest is predicted; the exit status still says that one run was not.
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("skipped") && err.contains("cancelled") && err.contains("1 run(s) skipped"), "{err}");
    assert!(out.contains("bench-sim-fine-grained-cf125") && out.contains("target 15%"), "{out}");
    // Alone, the unreadable run is an error.
    let (code, _, err) = moelab(&["predict", bad.to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{err}");
    // A profile that does not exist is the option's error, said once, before any run is read.
    let (code, _, err) = moelab(&["predict", good.to_str().unwrap(), "--profile", "h900"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.starts_with("error: --profile h900:") && err.matches("neither a built-in profile").count() == 1, "{err}");
}

#[test]
fn a_diverged_loss_fails_the_run_and_names_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, _out, err) = moelab(&["run", "-q", "experiments/quickstart.toml", "--set", "run.lr=1e30", "--set", "run.steps=8", "--runs-dir", tmp.path().to_str().unwrap()], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("the loss is NaN") && err.contains("run.lr"), "{err}");
    let dir = only_run_dir(tmp.path());
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["status"], "failed");
    // It stops at the first diverged step and keeps what it measured up to it.
    let steps = summary["steps"].as_array().unwrap();
    assert!(steps.len() < 9 && steps.last().unwrap()["loss"].is_null(), "{steps:?}");
    assert!(dir.join("trace.json").is_file() && dir.join("stages.csv").is_file());
}

/// `moelab plan` of a spec with an automatic choice says which configuration it planned in
/// its place (the run resolves the choice first); a spec without one gets no note.
#[test]
fn plan_names_the_stand_in_of_an_automatic_choice() {
    let (code, out, err) = moelab(&["plan", "experiments/mpmoe-auto.toml"], &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("note: mpmoe auto: planned with chunks=2, reuse=none"), "{out}");
    let (code, out, err) = moelab(&["plan", "experiments/seeds/tutel.toml"], &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("note: tutel auto: planned with r=1, degree 2"), "{out}");
    let (_, out, _) = moelab(&["plan", "experiments/quickstart.toml"], &[]);
    assert!(!out.contains("note:"), "{out}");
}

/// Session 21 (1x H100, 2026-11-25 05:06-05:10 UTC, `scripts/gpu-sim-1gpu` with that
/// session's binary, after the sim's all-to-all, Adam and symmetry changes): the five
/// mixtral-ish designs and the six bench plans, every step within 3% and every stage of at
/// least 2% of the step within 25%.
#[test]
fn the_h100_profile_predicts_the_session_21_runs() {
    let mut runs: Vec<std::path::PathBuf> = Vec::new();
    for d in ["mixtral-ish-runs", "bench-sim-runs"] {
        let dir = format!("{}/docs/device-runs/h100-s21/{d}", env!("CARGO_MANIFEST_DIR"));
        runs.extend(std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()));
    }
    runs.sort();
    assert_eq!(runs.len(), 11, "{runs:?}");
    let mut big = 0;
    for r in &predict_json(&runs) {
        let name = r["name"].as_str().unwrap();
        assert_eq!(r["profile"], "h100", "{r}");
        let e = r["comparison"]["step_error"].as_f64().unwrap();
        assert!(e.is_finite() && e.abs() < 0.03, "{name}: step error {e}");
        for st in r["comparison"]["stages"].as_array().unwrap().iter().filter(|st| st["small"] == false && !st["predicted_ms"].is_null() && !st["measured_ms"].is_null()) {
            big += 1;
            assert!(st["within"] == true, "{name} {}: {st}", st["label"]);
        }
    }
    assert!(big >= 90, "{big} stages of at least 2%");
}
