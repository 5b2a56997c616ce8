//! `moelab predict` in the library: the comparison pinned on hand-made traces with known
//! stage totals (errors, the 25% and 2% marks, stages on one side only, the step source),
//! and whole run directories: a cpu run predicted on h200, the same run with every measured
//! time doubled (every error moves exactly), a cuda-like run whose worker records name the
//! GPU and carry step spans, and the run directories that cannot be predicted; per-rank
//! stream times and the overlap on hand-made multi-rank traces.

use moelab::analysis::prediction::{compare, StepSource};
use moelab::analysis::stages::stage_rows;
use moelab::run::predict::{self, MeasuredRun, PredictError, PredictOptions, ProfileSource};
use moelab::run::{self, RunHooks};
use moelab::taxonomy::{Pass, Stage, Stream};
use moelab::trace::{chrome, OpEvent, StepSpan, Trace};
use std::path::{Path, PathBuf};

fn close(a: f64, b: f64) {
    assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0), "{a} != {b}");
}

fn op(rank: u32, step: u32, stage: Stage, pass: Pass, start_ns: u64, end_ns: u64) -> OpEvent {
    OpEvent {
        rank, step, stream: Stream::Compute, stage, pass, name: format!("{stage}"), layer: None, chunk: None, start_ns, end_ns, flops: 0, bytes: 0, collective: None, host_ns: None, issue_ns: None, gemm_calls: None,
    }
}

/// One rank, two steps of 100 us each; per step: gate 60 us, topk 39 us, loss 1 us (1% of
/// the step: small) on the measured side.
fn measured() -> Trace {
    let mut ops = Vec::new();
    let mut steps = Vec::new();
    for s in 0..2u32 {
        let t = u64::from(s) * 100_000;
        ops.push(op(0, s, Stage::Gate, Pass::Forward, t, t + 60_000));
        ops.push(op(0, s, Stage::Topk, Pass::Forward, t + 60_000, t + 99_000));
        ops.push(op(0, s, Stage::Loss, Pass::Forward, t + 99_000, t + 100_000));
        steps.push(StepSpan { rank: 0, step: s, start_ns: t, end_ns: t + 100_000 });
    }
    Trace { backend: "cuda".into(), world: 1, ops, memory: vec![], steps, group_sizes: vec![] }
}

/// Two ranks, one step of 110 us each: gate 45 us (-25% exactly: within), topk 60 us
/// (+53.8%: outside), loss 2 us (+100%: small and outside), and an optimizer stage the
/// measured trace lacks.
fn predicted() -> Trace {
    let mut ops = Vec::new();
    let mut steps = Vec::new();
    for r in 0..2u32 {
        ops.push(op(r, 0, Stage::Gate, Pass::Forward, 0, 45_000));
        ops.push(op(r, 0, Stage::Topk, Pass::Forward, 45_000, 105_000));
        ops.push(op(r, 0, Stage::Loss, Pass::Forward, 105_000, 107_000));
        ops.push(op(r, 0, Stage::Optimizer, Pass::Update, 107_000, 110_000));
        steps.push(StepSpan { rank: r, step: 0, start_ns: 0, end_ns: 110_000 });
    }
    Trace { backend: "sim".into(), world: 2, ops, memory: vec![], steps, group_sizes: vec![] }
}

#[test]
fn a_collective_s_wait_is_split_off_its_transfer() {
    // Measured: two ranks, one all-to-all; rank 0 arrives at 0, rank 1 at 30 us, both end at
    // 50 us: 70 us in all, 30 us of it rank 0's wait, so 20 us of transfer per rank and step.
    // Predicted (symmetric, rank 0 only): 20 us, no wait known: transfer error 0.
    let a2a = |rank, start, end| OpEvent {
        stream: Stream::Comm,
        collective: Some(moelab::trace::CollectiveRef { group: 0, seq: 0 }),
        host_ns: None, issue_ns: None, gemm_calls: None,
        ..op(rank, 0, Stage::AllToAll, Pass::Forward, start, end)
    };
    let spans = |ranks: u32| (0..ranks).map(|r| StepSpan { rank: r, step: 0, start_ns: 0, end_ns: 100_000 }).collect();
    let measured = Trace { backend: "cuda".into(), world: 2, ops: vec![a2a(0, 0, 50_000), a2a(1, 30_000, 50_000)], memory: vec![], steps: spans(2), group_sizes: vec![2] };
    let predicted = Trace { backend: "sim".into(), world: 2, ops: vec![a2a(0, 0, 20_000)], memory: vec![], steps: spans(1), group_sizes: vec![2] };
    let c = compare(&measured, &predicted).expect("compares");
    let st = &c.stages[0];
    close(st.measured_ms.unwrap(), 0.035);
    close(st.measured_wait_ms.unwrap(), 0.015);
    close(st.error.unwrap(), 0.020 / 0.035 - 1.0);
    close(st.transfer_error.unwrap(), 0.020 / 0.020 - 1.0);
    assert_eq!(st.within, Some(false), "the whole is judged");
    // Without group sizes the members cannot be lined up: no split.
    let c = compare(&Trace { group_sizes: vec![], ..measured }, &predicted).expect("compares");
    assert_eq!((c.stages[0].measured_wait_ms, c.stages[0].transfer_error), (None, None));
}

#[test]
fn hand_made_traces_give_exact_errors_and_marks() {
    let c = compare(&measured(), &predicted()).expect("compares");
    assert_eq!(c.step_source, StepSource::Spans);
    close(c.measured_step_ms, 0.1);
    close(c.predicted_step_ms, 0.11);
    close(c.step_error, 0.1);
    assert!(c.step_within);
    let labels: Vec<&str> = c.stages.iter().map(|s| s.label.as_str()).collect();
    assert_eq!(labels, ["gate", "topk", "loss", "optimizer_upd"]);
    let [gate, topk, loss, opt] = &c.stages[..] else { panic!("four stages") };
    close(gate.measured_ms.unwrap(), 0.06);
    close(gate.predicted_ms.unwrap(), 0.045);
    close(gate.error.unwrap(), -0.25);
    assert_eq!((gate.small, gate.within), (false, Some(true)), "-25% is on the line: within");
    close(gate.share, 0.6);
    close(topk.error.unwrap(), 60.0 / 39.0 - 1.0);
    assert_eq!((topk.small, topk.within), (false, Some(false)));
    close(loss.share, 0.01);
    close(loss.error.unwrap(), 1.0);
    assert_eq!((loss.small, loss.within), (true, Some(false)));
    assert_eq!((opt.measured_ms, opt.error, opt.within), (None, None, None));
    close(opt.predicted_ms.unwrap(), 0.003);
    close(opt.share, 3.0 / 110.0);
    assert_eq!((c.big.within, c.big.compared), (1, 2));
    assert_eq!((c.small.within, c.small.compared), (0, 1));
    assert_eq!(c.worst_big().map(|s| s.label.as_str()), Some("topk"));
    assert_eq!(c.predicted_only().map(|s| s.label.as_str()).collect::<Vec<_>>(), ["optimizer_upd"]);
    assert_eq!(c.measured_only().count(), 0);
    assert_eq!(c.small_outside().map(|s| s.label.as_str()).collect::<Vec<_>>(), ["loss"]);
}

#[test]
fn without_spans_both_sides_use_op_envelopes_and_empty_traces_are_refused() {
    let mut m = measured();
    m.steps.clear();
    // The predicted step spans 110 us but its ops end at 110 us too; shift its spans to show
    // they are not used.
    let mut p = predicted();
    for s in &mut p.steps {
        s.end_ns = 1_000_000;
    }
    let c = compare(&m, &p).expect("compares");
    assert_eq!(c.step_source, StepSource::OpEnvelope);
    close(c.measured_step_ms, 0.1);
    close(c.predicted_step_ms, 0.11);
    let empty = Trace { backend: "cuda".into(), world: 1, ..Trace::default() };
    let e = compare(&empty, &p).unwrap_err().to_string();
    assert!(e.contains("measured") && e.contains("no measured ops"), "{e}");
}

/// A cpu run of the 1-GPU topk experiment (1 warmup + 3 measured steps) under `root`.
fn cpu_run(root: &Path) -> PathBuf {
    let spec = moelab::spec::load_file_with(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/gpu/topk-1gpu.toml"),
        &[moelab::spec::overrides::Override::parse("run.backend=cpu").unwrap()],
    )
    .expect("spec loads");
    run::run(&spec, root, &RunHooks::default()).expect("cpu run completes").dir
}

fn h200() -> PredictOptions {
    PredictOptions { profile: Some("h200".into()), ..Default::default() }
}

#[test]
fn a_cpu_run_is_predicted_on_h200_stage_by_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = cpu_run(tmp.path());
    let run = MeasuredRun::load(&dir).expect("loads");
    assert_eq!((run.backend.as_str(), run.device.as_deref()), ("cpu", None));
    let p = predict::predict(&run, &h200()).expect("predicts");
    assert_eq!((p.profile.as_str(), &p.profile_source, &p.sim_dir), ("h200", &ProfileSource::Given, &None));
    let c = &p.comparison;
    assert_eq!((c.measured_backend.as_str(), c.predicted_backend.as_str()), ("cpu", "sim"));
    assert_eq!(c.step_source, StepSource::Spans, "trace.json carries the cpu run's step spans");
    assert!(c.measured_step_ms > 0.0 && c.predicted_step_ms > 0.0);
    close(c.step_error, c.predicted_step_ms / c.measured_step_ms - 1.0);
    let want: Vec<String> = stage_rows(&run.trace).into_iter().map(|r| r.label).collect();
    let got: Vec<String> = c.stages.iter().map(|s| s.label.clone()).collect();
    assert_eq!(got, want);
    for s in &c.stages {
        let (m, q) = (s.measured_ms.expect("measured"), s.predicted_ms.expect("predicted"));
        assert!(m > 0.0 && q > 0.0, "{}", s.label);
        close(s.error.unwrap(), q / m - 1.0);
        close(s.share, m / c.measured_step_ms);
    }
    assert_eq!(c.big.compared + c.small.compared, c.stages.len());
    // The measured run directory is only read; no temporary runs directory is left.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

#[test]
fn doubling_every_measured_time_halves_every_ratio() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = cpu_run(tmp.path());
    let before = predict::predict(&MeasuredRun::load(&dir).unwrap(), &h200()).unwrap().comparison;
    let mut t = MeasuredRun::load(&dir).unwrap().trace;
    for o in &mut t.ops {
        (o.start_ns, o.end_ns) = (2 * o.start_ns, 2 * o.end_ns);
    }
    for s in &mut t.steps {
        (s.start_ns, s.end_ns) = (2 * s.start_ns, 2 * s.end_ns);
    }
    chrome::write_chrome_trace(&t, &dir.join("trace.json")).unwrap();
    let after = predict::predict(&MeasuredRun::load(&dir).unwrap(), &h200()).unwrap().comparison;
    close(after.measured_step_ms, 2.0 * before.measured_step_ms);
    close(after.predicted_step_ms, before.predicted_step_ms);
    close(1.0 + after.step_error, (1.0 + before.step_error) / 2.0);
    assert_eq!(after.stages.len(), before.stages.len());
    for (a, b) in after.stages.iter().zip(&before.stages) {
        assert_eq!(a.label, b.label);
        close(a.measured_ms.unwrap(), 2.0 * b.measured_ms.unwrap());
        close(1.0 + a.error.unwrap(), (1.0 + b.error.unwrap()) / 2.0);
        close(a.share, b.share);
    }
}

#[test]
fn worker_records_name_the_gpu_and_give_step_spans() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = cpu_run(tmp.path());
    let t = MeasuredRun::load(&dir).unwrap().trace;
    // What a cuda worker leaves: rank-0.json with the GPU and its step spans (here each
    // step's span is its op envelope plus 1 ms).
    let mut env = std::collections::BTreeMap::<u32, (u64, u64)>::new();
    for o in &t.ops {
        let e = env.entry(o.step).or_insert((o.start_ns, o.end_ns));
        (e.0, e.1) = (e.0.min(o.start_ns), e.1.max(o.end_ns));
    }
    let steps: Vec<StepSpan> = env.iter().map(|(s, (a, b))| StepSpan { rank: 0, step: *s, start_ns: *a, end_ns: b + 1_000_000 }).collect();
    let record = serde_json::json!({ "rank": 0, "device": "NVIDIA H200", "ops": [], "memory": [], "steps": steps, "tracked_peak": [0, [0, 0, 0, 0, 0, 0, 0]] });
    std::fs::write(dir.join("rank-0.json"), record.to_string()).unwrap();
    let run = MeasuredRun::load(&dir).unwrap();
    assert_eq!(run.device.as_deref(), Some("NVIDIA H200"));
    let p = predict::predict(&run, &PredictOptions::default()).expect("profile from the GPU");
    assert_eq!((p.profile.as_str(), p.profile_source), ("h200", ProfileSource::Device));
    assert_eq!(p.comparison.step_source, StepSource::Spans);
    let envelope = env.values().map(|(a, b)| (b - a) as f64).sum::<f64>() / env.len() as f64 / 1e6;
    close(p.comparison.measured_step_ms, envelope + 1.0);

    // Without the record, the launcher's `rank 0: NVIDIA ...` log line names the GPU.
    std::fs::remove_file(dir.join("rank-0.json")).unwrap();
    let log = dir.join("run.log");
    let text = std::fs::read_to_string(&log).unwrap() + "2026-11-23 03:16:23.990 rank 0: NVIDIA H100 80GB HBM3\n";
    std::fs::write(&log, text).unwrap();
    let run = MeasuredRun::load(&dir).unwrap();
    assert_eq!(predict::choose_profile(&run, None).unwrap(), ("h100".to_string(), ProfileSource::Device));
    assert_eq!(predict::choose_profile(&run, Some("h200")).unwrap(), ("h200".to_string(), ProfileSource::Given));
}

#[test]
fn a_sim_run_is_predicted_on_its_own_profile_unless_one_is_given() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = moelab::spec::load_file_with(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/gpu/topk-1gpu.toml"),
        &[moelab::spec::overrides::Override::parse("run.backend=sim").unwrap(), moelab::spec::overrides::Override::parse("run.profile=h200").unwrap()],
    )
    .expect("spec loads");
    let dir = run::run(&spec, tmp.path(), &RunHooks::default()).expect("sim run completes").dir;
    let run = MeasuredRun::load(&dir).unwrap();
    assert_eq!(predict::choose_profile(&run, None).unwrap(), ("h200".to_string(), ProfileSource::Spec));
    assert_eq!(predict::choose_profile(&run, Some("h100")).unwrap(), ("h100".to_string(), ProfileSource::Given));
    // The sim predicts itself: the same step time.
    let p = predict::predict(&run, &PredictOptions::default()).expect("predicts");
    let c = &p.comparison;
    assert!((c.predicted_step_ms / c.measured_step_ms - 1.0).abs() < 1e-3, "{} vs {}", c.predicted_step_ms, c.measured_step_ms);
}

#[test]
fn run_directories_that_cannot_be_predicted_say_why() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let e = MeasuredRun::load(&missing).unwrap_err();
    assert!(matches!(e, PredictError::Missing { .. }) && e.to_string().contains("nope"), "{e}");

    let dir = cpu_run(tmp.path());
    let e = predict::predict(&MeasuredRun::load(&dir).unwrap(), &PredictOptions::default()).unwrap_err();
    assert!(matches!(e, PredictError::NoDevice { .. }) && e.to_string().contains("--profile"), "{e}");

    // A spec the sim refuses: an unknown profile.
    let e = predict::predict(&MeasuredRun::load(&dir).unwrap(), &PredictOptions { profile: Some("a100-nope".into()), ..Default::default() }).unwrap_err();
    assert!(matches!(e, PredictError::Spec { .. }) && e.to_string().contains("cannot be simulated"), "{e}");

    let summary = dir.join("summary.json");
    let text = std::fs::read_to_string(&summary).unwrap().replace("\"completed\"", "\"failed\"");
    std::fs::write(&summary, text).unwrap();
    let e = MeasuredRun::load(&dir).unwrap_err();
    assert!(matches!(e, PredictError::Incomplete { .. }) && e.to_string().contains("status failed"), "{e}");

    std::fs::remove_file(&summary).unwrap();
    let e = MeasuredRun::load(&dir).unwrap_err().to_string();
    assert!(e.contains("summary.json"), "{e}");
}

/// Replace `dir`'s spec with `experiment`'s and add `extra` to its summary, as a run of that
/// experiment would have written them.
fn fake_run_of(dir: &Path, experiment: &str, extra: serde_json::Value) {
    let spec = moelab::spec::load_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join(experiment)).expect("spec loads");
    std::fs::write(dir.join("spec.toml"), spec.to_toml()).unwrap();
    let path = dir.join("summary.json");
    let mut summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (k, v) in extra.as_object().unwrap() {
        summary[k] = v.clone();
    }
    std::fs::write(&path, summary.to_string()).unwrap();
}

#[test]
fn automatic_choices_of_the_measured_run_are_pinned_in_the_sim_spec() {
    use moelab::spec::{Degree, ParallelismChoice, Reuse, TutelLayer};
    let tmp = tempfile::tempdir().unwrap();
    let dir = cpu_run(tmp.path());
    fake_run_of(&dir, "experiments/mpmoe-auto.toml", serde_json::json!({ "mpmoe_auto": { "chosen_chunks": 2, "chosen_reuse": "recompute" } }));
    let s = MeasuredRun::load(&dir).unwrap().sim_spec("h200", &[]).expect("sim spec");
    assert_eq!((s.run.backend, s.run.profile.as_deref()), (moelab::spec::BackendKind::Sim, Some("h200")));
    let m = s.mpmoe.expect("mpmoe options");
    assert_eq!((m.chunks, m.reuse), (Degree::Fixed(2), Reuse::Recompute));

    let layers = serde_json::json!([{ "r": 0, "degree": 1 }, { "r": 1, "degree": 2 }]);
    fake_run_of(&dir, "experiments/tutel.toml", serde_json::json!({ "tutel_auto_degree": { "chosen": 2, "chosen_r": 1, "per_layer": layers }, "mpmoe_auto": null }));
    let t = MeasuredRun::load(&dir).unwrap().sim_spec("h200", &[]).expect("sim spec").tutel.expect("tutel options");
    assert_eq!((t.degree, t.r, t.parallelism), (Degree::Fixed(2), 1, ParallelismChoice::Fixed));
    assert_eq!(t.layers, [TutelLayer { r: 0, degree: 1 }, TutelLayer { r: 1, degree: 2 }]);
}

#[test]
fn each_rank_s_stream_time_is_compared_when_the_measured_trace_has_several_ranks() {
    // Measured: rank 0 computes 40 us and waits 60 us in its all-to-all; rank 1 computes
    // 90 us, then 10 us of all-to-all. Predicted: one rank traced (a symmetric simulation of
    // a larger world would trace its representative only), 60 us + 40 us.
    let ops = |rank: u32, compute: u64, comm: u64| {
        vec![
            op(rank, 0, Stage::ExpertGemm1, Pass::Forward, 0, compute),
            OpEvent { stream: Stream::Comm, ..op(rank, 0, Stage::AllToAll, Pass::Forward, compute, compute + comm) },
        ]
    };
    let spans = |ranks: u32| (0..ranks).map(|r| StepSpan { rank: r, step: 0, start_ns: 0, end_ns: 100_000 }).collect::<Vec<_>>();
    let two = Trace { backend: "cuda".into(), world: 2, ops: [ops(0, 40_000, 60_000), ops(1, 90_000, 10_000)].concat(), memory: vec![], steps: spans(2), group_sizes: vec![] };
    let one = Trace { backend: "sim".into(), world: 2, ops: ops(0, 60_000, 40_000), memory: vec![], steps: spans(1), group_sizes: vec![] };
    let c = compare(&two, &one).expect("compares");
    assert_eq!(c.ranks.len(), 2);
    let (r0, r1) = (c.ranks[0], c.ranks[1]);
    assert_eq!((r0.rank, r1.rank), (0, 1));
    close(r0.measured_compute_ms, 0.040);
    close(r0.measured_comm_ms, 0.060);
    close(r1.measured_compute_ms, 0.090);
    close(r1.measured_comm_ms, 0.010);
    close(r0.predicted_compute_ms.unwrap(), 0.060);
    close(r0.predicted_comm_ms.unwrap(), 0.040);
    assert_eq!((r1.predicted_compute_ms, r1.predicted_comm_ms), (None, None), "rank 1 was not traced");
    // A one-rank measured trace has no per-rank rows.
    assert!(compare(&measured(), &predicted()).expect("compares").ranks.is_empty());
}

#[test]
fn overlap_is_compared_as_comm_hidden_under_compute_and_exposed() {
    // Measured, per rank and step: compute 0-100 us; an all-to-all 60-130 us (40 us hidden,
    // 30 exposed) and an all-reduce 150-160 us (exposed). Two steps on rank 0, one on rank 1
    // with the same times: the figures are per step and averaged over ranks. Predicted: the
    // all-to-all 90-110 (10 hidden, 10 exposed), no all-reduce.
    let step = |rank: u32, step: u32, a2a: (u64, u64), ar: Option<(u64, u64)>| {
        let base = 1_000_000 * step as u64;
        let mut ops = vec![
            op(rank, step, Stage::ExpertGemm1, Pass::Forward, base, base + 100_000),
            OpEvent { stream: Stream::Comm, ..op(rank, step, Stage::AllToAll, Pass::Forward, base + a2a.0, base + a2a.1) },
        ];
        if let Some((s, e)) = ar {
            ops.push(OpEvent { stream: Stream::Comm, ..op(rank, step, Stage::AllReduce, Pass::Update, base + s, base + e) });
        }
        (ops, StepSpan { rank, step, start_ns: base, end_ns: base + 200_000 })
    };
    let trace = |backend: &str, parts: Vec<(Vec<OpEvent>, StepSpan)>| Trace {
        backend: backend.into(),
        world: 2,
        ops: parts.iter().flat_map(|p| p.0.clone()).collect(),
        memory: vec![],
        steps: parts.iter().map(|p| p.1.clone()).collect(),
        group_sizes: vec![],
    };
    let m = (60_000, 130_000);
    let cuda = trace("cuda", vec![step(0, 0, m, Some((150_000, 160_000))), step(0, 1, m, Some((150_000, 160_000))), step(1, 0, m, Some((150_000, 160_000)))]);
    let sim = trace("sim", vec![step(0, 0, (90_000, 110_000), None), step(1, 0, (90_000, 110_000), None)]);
    let o = compare(&cuda, &sim).expect("compares").overlap.expect("the measured trace communicated");
    close(o.measured.comm_ms, 0.080);
    close(o.measured.hidden_ms, 0.040);
    close(o.measured.exposed_ms, 0.040);
    close(o.measured.a2a_ms, 0.070);
    close(o.measured.a2a_hidden_ms, 0.040);
    close(o.measured.hidden_share(), 0.5);
    close(o.predicted.comm_ms, 0.020);
    close(o.predicted.exposed_ms, 0.010);
    close(o.predicted.a2a_hidden_share(), 0.5);
    close(o.exposed_error().expect("measured exposure"), -0.75);
    // Without communication (one GPU) there is nothing to compare.
    assert!(compare(&measured(), &predicted()).expect("compares").overlap.is_none());
}
