//! MPMoE: the pipelined, memory-reusing MoE layer computes what the single-rank top-k run
//! computes for every chunk count and reuse strategy, drops the same tokens, issues chunk
//! g+1's dispatch all-to-all independently of and before chunk g's experts, and its reuse
//! strategies lower the predicted peak, which the cpu backend's tracked peak matches.

mod common;
use common::*;
use moelab::backend::StepReport;
use moelab::plan::memory::predict;
use moelab::plan::{OpId, Plan, RankPlan};
use moelab::spec::{from_toml_str, Degree, ExperimentSpec, Reuse};
use moelab::taxonomy::{Pass, Stage, Stream};

const MODEL: &str = "d_model = 16\nd_ffn = 24\nn_experts = 4";

/// An MPMoE spec with `chunks` and `reuse`, extra `[model]` lines and a layout.
fn mpmoe_spec(model: &str, layout: &str, chunks: usize, reuse: Reuse, run: &str) -> ExperimentSpec {
    let text = format!(
        "name = \"t\"\nvariant = \"mpmoe\"\n[model]\n{MODEL}\n{model}\n[layout]\n{layout}\n[run]\nbackend = \"cpu\"\n{run}\n[mpmoe]\nchunks = {chunks}\nreuse = \"{}\"\n",
        reuse.as_str()
    );
    from_toml_str(&text).unwrap_or_else(|e| panic!("test spec invalid: {e}\n{text}"))
}

/// Loss, aux loss, drops, the MoE output and every gradient match the single-rank top-k run.
fn check_against_topk(model: &str, dp: usize, ep: usize, chunks: usize, reuse: Reuse) {
    let (t, world) = (16, dp * ep);
    let out = "L1.moe.out";
    let layers = format!("tokens_per_rank = {t}\nseq_len = 8\nn_layers = 2\n{model}");
    let dist_spec = mpmoe_spec(&layers, &format!("dp = {dp}\nep = {ep}"), chunks, reuse, "");
    let ref_spec = spec(&format!("tokens_per_rank = {}\nseq_len = 8\nn_layers = 2\n{model}", t * world), "", "");
    let (dist, a) = step_retaining(&dist_spec, &[out]);
    let (single, b) = step_retaining(&ref_spec, &[out]);
    let what = format!("dp={dp} ep={ep} chunks={chunks} reuse={}", reuse.as_str());
    assert_matches_single_rank(&dist, &a, &single, &b, &[out], ep, &what);
}

#[test]
fn every_chunk_count_and_reuse_matches_single_rank_topk_on_ep2() {
    for chunks in 1..=4 {
        for reuse in Reuse::ALL {
            check_against_topk("capacity_factor = 1.0", 1, 2, chunks, reuse);
        }
    }
}

#[test]
fn every_chunk_count_and_reuse_matches_single_rank_topk_on_dp2_ep2() {
    for chunks in 1..=4 {
        for reuse in Reuse::ALL {
            check_against_topk("capacity_factor = 1.0", 2, 2, chunks, reuse);
        }
    }
}

#[test]
fn backbone_renormalize_and_dropless_match_single_rank_topk() {
    let backbone = "renormalize = true\n[model.backbone]\nn_heads = 2\nd_mlp = 20";
    check_against_topk(&format!("capacity_factor = 1.25\n{backbone}"), 1, 2, 3, Reuse::ReuseBuffers);
    check_against_topk("dropless = true", 1, 2, 3, Reuse::Recompute);
    check_against_topk("dropless = true\ntop_k = 1\nactivation = \"relu\"", 2, 2, 4, Reuse::ReuseBuffers);
}

#[test]
fn training_steps_stay_in_lockstep_with_topk() {
    // Weight gradients are summed over chunks; chunk 0 overwrites last step's, so Adam sees
    // the same gradients as top-k's at every step.
    let model = "tokens_per_rank = 16\nseq_len = 8\nn_layers = 1";
    let mut dist = runtime(&mpmoe_spec(model, "ep = 2", 3, Reuse::ReuseBuffers, "lr = 0.01"), &[], false);
    let mut single = runtime(&spec("tokens_per_rank = 32\nseq_len = 8\nn_layers = 1", "", "lr = 0.01"), &[], false);
    for s in 0..3 {
        let a = dist.step(true, Some(s)).unwrap();
        let b = single.step(true, Some(s)).unwrap();
        assert!(((a.loss - b.loss) / b.loss).abs() < 1e-4, "step {s}: {} vs {}", a.loss, b.loss);
    }
    let want: Vec<f32> = single.read(0, "L0.expert.w1").unwrap();
    let got: Vec<f32> = (0..2).flat_map(|r| dist.read(r, "L0.expert.w1").unwrap()).collect();
    assert!(rel_err(&got, &want) < 1e-4, "expert weights drifted apart");
}

#[test]
fn chunking_never_changes_which_tokens_drop() {
    // A tight capacity drops many assignments; every chunk count drops the same ones.
    let model = "tokens_per_rank = 16\nseq_len = 8\nn_layers = 2\ncapacity_factor = 0.5";
    let runs: Vec<(StepReport, Vec<f32>)> = (1..=4)
        .map(|n| {
            let (rt, r) = step_retaining(&mpmoe_spec(model, "dp = 2\nep = 2", n, Reuse::ReuseBuffers, ""), &["L1.moe.out"]);
            (r, gather(&rt, "L1.moe.out"))
        })
        .collect();
    assert!(runs[0].0.dropped > 0, "the capacity must drop tokens for this test to mean anything");
    for (n, (r, out)) in runs.iter().enumerate().skip(1) {
        assert_eq!(r.dropped, runs[0].0.dropped, "chunks={} drops differently", n + 1);
        let err = rel_err(out, &runs[0].1);
        assert!(err < 1e-6, "chunks={}: output differs from chunks=1 by {err}", n + 1);
    }
}

/// Whether `to` depends on `from` through any chain of dependencies.
fn reaches(rp: &RankPlan, from: OpId, to: OpId) -> bool {
    rp.depends_on(to, from)
}

fn op_id(rp: &RankPlan, name: &str) -> OpId {
    rp.op_named(name).unwrap_or_else(|| panic!("no op {name}")).id
}

#[test]
fn next_chunks_all_to_all_is_independent_of_and_issued_before_this_chunks_experts() {
    for reuse in Reuse::ALL {
        let s = mpmoe_spec("tokens_per_rank = 16\nn_layers = 2", "ep = 2", 4, reuse, "");
        let plan = Plan::build(&s).unwrap();
        for rp in &plan.ranks {
            for l in 0..2 {
                for g in 0..3 {
                    // Forward: chunk g+1's dispatch all-to-all vs chunk g's fc1.
                    let a2a = op_id(rp, &format!("L{l}.c{}.dispatch_a2a", g + 1));
                    let gemm = op_id(rp, &format!("L{l}.c{g}.expert_gemm1"));
                    let op = &rp.ops[a2a.0 as usize];
                    assert_eq!((op.stage, op.stream, op.chunk, op.pass), (Stage::AllToAll, Stream::Comm, Some(g as u32 + 1), Pass::Forward));
                    assert_eq!(rp.ops[gemm.0 as usize].chunk, Some(g as u32));
                    assert!(a2a < gemm, "L{l}: chunk {}'s all-to-all is issued after chunk {g}'s fc1", g + 1);
                    assert!(!reaches(rp, gemm, a2a), "L{l}: chunk {}'s all-to-all waits for chunk {g}'s fc1", g + 1);
                    // Backward: chunk g+1's output-gradient all-to-all vs chunk g's expert backward.
                    let a2a = op_id(rp, &format!("L{l}.c{}.combine_a2a_bwd", g + 1));
                    let gemm = op_id(rp, &format!("L{l}.c{g}.expert_gemm2_bwd"));
                    assert!(a2a < gemm && !reaches(rp, gemm, a2a), "L{l} backward: chunk {} vs chunk {g}", g + 1);
                    if reuse.recomm() {
                        let re = op_id(rp, &format!("L{l}.c{}.dispatch_a2a_recomm", g + 1));
                        assert!(re < gemm && !reaches(rp, gemm, re), "L{l} re-communication: chunk {} vs chunk {g}", g + 1);
                    }
                }
            }
            // Every chunk op carries its chunk; the chunk's fc1 ops are exactly n per layer.
            let fc1 = rp.ops.iter().filter(|o| o.stage == Stage::ExpertGemm1 && o.pass == Pass::Forward).count();
            assert_eq!(fc1, 2 * 4);
            assert!(rp.ops.iter().filter(|o| o.stage == Stage::AllToAll).all(|o| o.chunk.is_some()));
        }
    }
}

/// Run two steps and check the tracked peak of every rank against the plan's prediction.
fn tracked_equals_predicted(s: &ExperimentSpec) -> u64 {
    let mut rt = runtime(s, &[], false);
    for i in 0..2 {
        rt.step(i > 0, None).expect("step");
    }
    let preds: Vec<_> = rt.plan().ranks.iter().map(predict).collect();
    for (rank, (p, (peak, at_peak))) in preds.iter().zip(rt.tracked_peaks()).enumerate() {
        assert!(!p.upper_bound, "static capacity plans have exact sizes");
        assert_eq!(peak, p.peak_total, "rank {rank}: tracked peak vs plan ({:?})", s.mpmoe);
        assert_eq!(at_peak, p.at_peak, "rank {rank}: categories at peak ({:?})", s.mpmoe);
    }
    preds[0].peak_total
}

#[test]
fn reuse_lowers_the_peak_and_the_cpu_backend_tracks_it_exactly() {
    let model = "tokens_per_rank = 64\nn_layers = 2\ncapacity_factor = 1.0";
    let peak = |reuse| tracked_equals_predicted(&mpmoe_spec(model, "ep = 2", 4, reuse, ""));
    let none = peak(Reuse::None);
    for reuse in [Reuse::Recompute, Reuse::Recomm, Reuse::ReuseBuffers] {
        let p = peak(reuse);
        assert!(p < none, "reuse {} peak {p} is not below none's {none}", reuse.as_str());
    }
    assert!(peak(Reuse::ReuseBuffers) < peak(Reuse::Recompute).min(peak(Reuse::Recomm)), "reusing both saves most");
    // dp x ep, and inference (nothing is saved for backward, so every strategy is the same plan).
    let dp_ep = |reuse| tracked_equals_predicted(&mpmoe_spec(model, "dp = 2\nep = 2", 4, reuse, ""));
    assert!(dp_ep(Reuse::ReuseBuffers) < dp_ep(Reuse::None));
    let inf = |reuse| tracked_equals_predicted(&mpmoe_spec(model, "ep = 2", 4, reuse, "mode = \"inference\""));
    assert_eq!(inf(Reuse::ReuseBuffers), inf(Reuse::None));
}

// ---------------------------------------------------------------------------------------------
// Spec rules
// ---------------------------------------------------------------------------------------------

const SPEC: &str = "name = \"t\"\nvariant = \"mpmoe\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 4\ntokens_per_rank = 16\n";

/// The problems of a rejected spec, with its message.
fn problems(text: &str) -> (Vec<moelab::spec::Problem>, String) {
    let e = from_toml_str(text).err().unwrap_or_else(|| panic!("expected a rejection:\n{text}"));
    (e.problems().to_vec(), e.to_string())
}

#[test]
fn mpmoe_defaults_fill_in_and_round_trip() {
    let s = from_toml_str(SPEC).unwrap();
    let opts = s.mpmoe.expect("variant mpmoe gets its [mpmoe] defaults");
    assert_eq!((opts.chunks, opts.reuse, opts.memory_budget_mib), (Degree::Fixed(2), Reuse::None, None));
    for reuse in Reuse::ALL {
        let s = from_toml_str(&format!("{SPEC}[mpmoe]\nchunks = 3\nreuse = \"{}\"\n", reuse.as_str())).unwrap();
        assert_eq!(s.mpmoe.unwrap().reuse, reuse);
        assert_eq!(from_toml_str(&s.to_toml()).unwrap(), s, "round trip");
    }
}

#[test]
fn zero_and_too_many_chunks_are_rejected_with_a_fix() {
    for (chunks, says) in [(0, "chunks=0 must be at least 1"), (65, "exceeds the limit of 64"), (17, "exceeds tokens_per_rank=16")] {
        let (p, shown) = problems(&format!("{SPEC}[mpmoe]\nchunks = {chunks}\n"));
        assert_eq!(p.len(), 1, "{shown}");
        assert_eq!(p[0].field, "mpmoe.chunks");
        assert!(p[0].message.contains(says), "{shown}");
        assert!(p[0].fix.contains("between 1 and 16"), "{shown}");
    }
    assert_eq!(from_toml_str(&format!("{SPEC}[mpmoe]\nchunks = 16\n")).unwrap().mpmoe.unwrap().chunks, Degree::Fixed(16));
}

#[test]
fn unknown_reuse_strategy_is_a_parse_error_naming_the_choices() {
    let e = from_toml_str(&format!("{SPEC}[mpmoe]\nreuse = \"offload\"\n")).unwrap_err();
    let shown = e.to_string();
    // Like every enum value in a spec: the position, the offending value and every valid spelling.
    assert!(e.problems().is_empty(), "a serde error, not a rule: {shown}");
    for needle in ["unknown variant `offload`", "none", "recompute", "recomm", "reuse_buffers", "line 9"] {
        assert!(shown.contains(needle), "expected {needle:?} in: {shown}");
    }
    let e = from_toml_str(&format!("{SPEC}[mpmoe]\nchunk = 2\n")).unwrap_err();
    assert!(e.to_string().contains("unknown field `chunk`"), "{e}");
}

#[test]
fn mpmoe_table_with_another_variant_is_rejected() {
    let text = format!("{SPEC}[mpmoe]\nchunks = 2\n").replace("variant = \"mpmoe\"", "variant = \"topk\"");
    let (p, shown) = problems(&text);
    assert_eq!(p.len(), 1, "{shown}");
    assert_eq!(p[0].field, "mpmoe");
    assert!(p[0].message.contains("\"topk\"") && p[0].fix.contains("variant = \"mpmoe\""), "{shown}");
}

#[test]
fn mpmoe_has_no_tensor_or_pipeline_stages() {
    let (p, shown) = problems(&format!("{SPEC}[layout]\ntp = 2\npp = 2\n"));
    let fields: Vec<&str> = p.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(fields, ["layout.tp", "layout.pp"], "{shown}");
    assert!(p[1].fix.contains("mpmoe.chunks"), "{shown}");
}

// ---------------------------------------------------------------------------------------------
// Performance model: `chunks = "auto"` / `reuse = "auto"`
// ---------------------------------------------------------------------------------------------

use moelab::run::mpmoe_auto::model::{ChunkStages, CostModel, OpClass, Sample, StageCost, Work};
use moelab::run::mpmoe_auto::{choose, Candidate, CHUNK_CANDIDATES};

fn class(stage: Stage, stream: Stream, work: Work) -> OpClass {
    OpClass { stage, stream, work }
}

#[test]
fn fit_recovers_known_cost_laws_from_synthetic_stage_times() {
    // Three classes with known per-op overhead and throughput, seen at several sizes with a
    // deterministic +-1% perturbation; one class at a single size; one whose free fit would
    // have a negative intercept.
    let laws = [
        (class(Stage::AllToAll, Stream::Comm, Work::Bytes), 40e-6, 2e-9),
        (class(Stage::ExpertGemm1, Stream::Compute, Work::Flops), 5e-6, 1e-10),
        (class(Stage::Permute, Stream::Compute, Work::Bytes), 2e-6, 5e-10),
    ];
    let mut samples = Vec::new();
    for (i, (c, a, b)) in laws.iter().enumerate() {
        for (j, w) in [1e4, 3e4, 1e5, 2.5e5, 1e6].iter().enumerate() {
            for rep in 0..3 {
                let noise = 1.0 + 0.01 * (((i * 7 + j * 3 + rep) % 5) as f64 - 2.0) / 2.0;
                samples.push(Sample { class: *c, work: *w, seconds: (a + b * w) * noise });
            }
        }
    }
    let single = class(Stage::Optimizer, Stream::Compute, Work::Flops);
    samples.extend((0..4).map(|_| Sample { class: single, work: 1e6, seconds: 3e-3 }));
    let negative = class(Stage::Combine, Stream::Compute, Work::Bytes);
    samples.extend([(1e3, 0.0), (2e3, 1e-6), (4e3, 3e-6)].map(|(w, t)| Sample { class: negative, work: w, seconds: t }));

    let m = CostModel::fit(&samples);
    assert_eq!(m.costs.len(), 5);
    for (c, a, b) in laws {
        let l = m.law(c).unwrap();
        assert_eq!((l.samples, l.sizes), (15, 5));
        assert!((l.fixed_s - a).abs() / a < 0.05, "{c:?}: fixed {} vs {a}", l.fixed_s);
        assert!((l.per_unit_s - b).abs() / b < 0.02, "{c:?}: per unit {} vs {b}", l.per_unit_s);
    }
    let l = m.law(single).unwrap();
    assert_eq!(l.sizes, 1);
    assert!((l.seconds(1e6) - 3e-3).abs() < 1e-12, "one size: the whole time is reproduced");
    let l = m.law(negative).unwrap();
    assert!(l.fixed_s >= 0.0 && l.per_unit_s > 0.0, "coefficients stay non-negative: {l:?}");
}

/// A model that costs only all-to-alls (`a2a_s` each) and expert GEMMs (`gemm_s` each).
fn hand_model(a2a_s: f64, gemm_s: f64) -> CostModel {
    let law = |c, fixed_s| StageCost { class: c, fixed_s, per_unit_s: 0.0, samples: 1, sizes: 1 };
    CostModel {
        costs: vec![
            law(class(Stage::AllToAll, Stream::Comm, Work::Bytes), a2a_s),
            law(class(Stage::ExpertGemm1, Stream::Compute, Work::Flops), gemm_s),
            law(class(Stage::ExpertGemm2, Stream::Compute, Work::Flops), gemm_s),
        ],
        step_overhead_s: 0.0,
    }
}

#[test]
fn simulated_schedule_is_the_pipeline_fill_steady_state_and_drain() {
    for n in [1usize, 2, 4, 8] {
        let s = mpmoe_spec("tokens_per_rank = 16\nn_layers = 1", "ep = 2", n, Reuse::None, "mode = \"inference\"");
        let plan = Plan::build(&s).unwrap();
        // Compute-bound: t_S = t_R = 1 ms, t_C = 6 ms: fill t_S, n slots of t_C, drain t_R.
        let m = hand_model(1e-3, 3e-3);
        let sched = m.simulate(&plan.ranks[0]);
        assert!((sched.makespan_s - (1e-3 + n as f64 * 6e-3 + 1e-3)).abs() < 1e-12, "n={n}: {sched:?}");
        assert!((sched.comm_s - 2.0 * n as f64 * 1e-3).abs() < 1e-12 && (sched.compute_s - 2.0 * n as f64 * 3e-3).abs() < 1e-12);
        let st: ChunkStages = m.chunk_stages(&plan.ranks[0]).unwrap();
        assert_eq!(st.chunks, n);
        assert!((st.dispatch_s - 1e-3).abs() < 1e-12 && (st.expert_s - 6e-3).abs() < 1e-12 && (st.combine_s - 1e-3).abs() < 1e-12);
        assert!((st.closed_form_s() - sched.makespan_s).abs() < 1e-12, "compute-bound: the closed form is exact");
        // Comm-bound: t_S = t_R = 5 ms, t_C = 2 ms: the comm stream is busy end to end, so the
        // step is 2 n t_S (the last chunk's experts hide behind the previous combine), which
        // the closed form bounds from above.
        let m = hand_model(5e-3, 1e-3);
        let sched = m.simulate(&plan.ranks[0]);
        let want = if n == 1 { 12e-3 } else { 2.0 * n as f64 * 5e-3 };
        assert!((sched.makespan_s - want).abs() < 1e-12, "n={n}: {} vs {want}", sched.makespan_s);
        assert!(sched.makespan_s <= m.chunk_stages(&plan.ranks[0]).unwrap().closed_form_s() + 1e-12);
    }
}

/// Every (chunks, reuse) candidate of a small training spec, predicted with `model`.
fn predicted_candidates(model: &CostModel, budget_mib: Option<f64>) -> Vec<Candidate> {
    let mut out = Vec::new();
    for reuse in Reuse::ALL {
        for n in CHUNK_CANDIDATES {
            let s = mpmoe_spec("tokens_per_rank = 256\nseq_len = 8\nn_layers = 2\ncapacity_factor = 1.0", "ep = 2", n, reuse, "");
            let plan = Plan::build(&s).unwrap();
            let peak_bytes = plan.ranks.iter().map(|rp| predict(rp).peak_total).max().unwrap();
            let fits_budget = budget_mib.is_none_or(|b| peak_bytes as f64 / 1048576.0 <= b);
            out.push(Candidate { chunks: n, reuse, peak_bytes, fits_budget, predicted_s: model.predict_step(&plan), measured_s: None, profiled: false });
        }
    }
    out
}

/// A model where every op class costs `fixed_s` per op and `per_unit_s` per FLOP or byte,
/// all-to-alls `comm_factor` times more per byte.
fn uniform_model(fixed_s: f64, per_unit_s: f64, comm_factor: f64) -> CostModel {
    let mut costs = Vec::new();
    for stage in Stage::ALL {
        for stream in [Stream::Compute, Stream::Comm] {
            for work in [Work::Flops, Work::Bytes] {
                let f = if stage == Stage::AllToAll { comm_factor } else { 1.0 };
                costs.push(StageCost { class: class(stage, stream, work), fixed_s, per_unit_s: per_unit_s * f, samples: 1, sizes: 2 });
            }
        }
    }
    CostModel { costs, step_overhead_s: 0.0 }
}

#[test]
fn the_choice_follows_the_model_and_the_budget() {
    // Expensive all-to-alls, no per-op overhead: chunks hide the experts behind the
    // all-to-alls, so every pipelined candidate beats n = 1 and the choice is pipelined (not
    // necessarily the largest n: the plan's per-chunk buffers are upper bounds that grow the
    // all-to-all bytes slightly with n).
    let c = predicted_candidates(&uniform_model(0.0, 1e-9, 50.0), None);
    let best = &c[choose(&c).unwrap()];
    assert!(best.chunks > 1, "{best:?}");
    assert!(c.iter().all(|x| x.predicted_s >= best.predicted_s));
    for reuse in Reuse::ALL {
        let t: Vec<f64> = c.iter().filter(|x| x.reuse == reuse).map(|x| x.predicted_s).collect();
        assert!(t[1..].iter().all(|x| *x < t[0] * 0.9), "{}: pipelining saves time: {t:?}", reuse.as_str());
    }
    // Compute-bound: recomputing fc1 adds to the critical path, so it is predicted slower.
    let c = predicted_candidates(&uniform_model(0.0, 1e-9, 1.0), None);
    for x in c.iter().filter(|x| x.reuse.recompute()) {
        let none = c.iter().find(|y| y.chunks == x.chunks && y.reuse == Reuse::None).unwrap();
        assert!(x.predicted_s > none.predicted_s, "restoring costs time: {x:?} vs {none:?}");
    }
    assert_eq!(c[choose(&c).unwrap()].reuse, Reuse::None);
    // A large per-op overhead and cheap work: chunking only adds ops, n = 1 wins.
    let c = predicted_candidates(&uniform_model(1e-3, 1e-12, 1.0), None);
    assert_eq!(c[choose(&c).unwrap()].chunks, 1);
    // A budget below the no-reuse peak: the choice fits it, and no candidate that fits is faster.
    let model = uniform_model(0.0, 1e-9, 50.0);
    let all = predicted_candidates(&model, None);
    let none_peak = all.iter().filter(|x| x.reuse == Reuse::None).map(|x| x.peak_bytes).min().unwrap();
    let lowest = all.iter().map(|x| x.peak_bytes).min().unwrap();
    assert!(lowest < none_peak, "reuse lowers the peak");
    let budget = (lowest + none_peak) as f64 / 2.0 / 1048576.0;
    let c = predicted_candidates(&model, Some(budget));
    let best = &c[choose(&c).unwrap()];
    assert!(best.fits_budget && best.reuse != Reuse::None, "{best:?}");
    assert!(c.iter().filter(|x| x.fits_budget).all(|x| x.predicted_s >= best.predicted_s));
    assert!(c.iter().any(|x| !x.fits_budget && x.predicted_s < best.predicted_s), "the budget changed the choice");
    let none_fit: Vec<Candidate> = c.iter().cloned().map(|mut x| { x.fits_budget = false; x }).collect();
    assert_eq!(choose(&none_fit), None);
}

fn auto_spec(table: &str) -> ExperimentSpec {
    let text = format!(
        "name = \"t\"\nvariant = \"mpmoe\"\n[model]\n{MODEL}\ntokens_per_rank = 32\nseq_len = 8\nn_layers = 2\ncapacity_factor = 1.0\n[layout]\nep = 2\n[run]\nbackend = \"cpu\"\nsteps = 2\nwarmup = 0\n[mpmoe]\n{table}\n"
    );
    from_toml_str(&text).unwrap_or_else(|e| panic!("test spec invalid: {e}\n{text}"))
}

#[test]
fn auto_run_profiles_predicts_chooses_and_reports_prediction_next_to_measurement() {
    let root = tempfile::tempdir().unwrap();
    let s = auto_spec("chunks = \"auto\"\nreuse = \"auto\"\nmemory_budget_mib = 100000");
    let out = moelab::run::run(&s, root.path(), &Default::default()).expect("run");
    let a = out.mpmoe_auto.clone().expect("auto resolved");
    // spec.toml records the choice and runs again unchanged (the budget went with "auto").
    let ran = moelab::spec::load_file(&out.dir.join("spec.toml")).expect("the resolved spec.toml is valid");
    let o = ran.mpmoe.expect("mpmoe table");
    assert_eq!((o.chunks, o.reuse, o.memory_budget_mib), (Degree::Fixed(a.chosen_chunks), a.chosen_reuse, None));
    // Every (n, strategy) candidate was predicted; two were profiled (and measured).
    assert_eq!(a.candidates.len(), CHUNK_CANDIDATES.len() * Reuse::ALL.len());
    assert!(a.candidates.iter().all(|c| c.predicted_s.is_finite() && c.predicted_s > 0.0 && c.fits_budget));
    let profiled: Vec<(usize, Reuse)> = a.candidates.iter().filter(|c| c.profiled).map(|c| (c.chunks, c.reuse)).collect();
    assert_eq!(profiled, [(1, Reuse::None), (8, Reuse::ReuseBuffers)]);
    assert!(a.candidates.iter().filter(|c| c.profiled).all(|c| c.measured_s.is_some_and(|m| m > 0.0)));
    // The choice is the model's fastest, and its measurement sits next to its prediction.
    let best = &a.candidates[choose(&a.candidates).unwrap()];
    assert_eq!((a.chosen_chunks, a.chosen_reuse), (best.chunks, best.reuse));
    assert_eq!(a.chosen_predicted_s, best.predicted_s);
    let measured = a.chosen_measured_s.expect("chosen measured");
    let mean = out.steps.iter().map(|s| s.wall_s).sum::<f64>() / out.steps.len() as f64;
    assert!((measured - mean).abs() < 1e-12 && best.measured_s == Some(measured));
    // The fitted laws cover the all-to-alls and expert GEMMs, each seen at two chunk sizes.
    for stage in [Stage::AllToAll, Stage::ExpertGemm1, Stage::ExpertGemm2] {
        assert!(a.costs.iter().any(|l| l.class.stage == stage && l.sizes >= 2), "{stage:?}: {:?}", a.costs);
    }
    assert!(a.chosen_stages.is_some_and(|st| st.chunks == a.chosen_chunks));
    // The measured steps ran the chosen plan.
    let first = out.trace.ops.iter().map(|o| o.step).min().expect("traced ops");
    let fc1 = out.trace.ops.iter().filter(|o| o.stage == Stage::ExpertGemm1 && o.rank == 0 && o.pass == Pass::Forward && o.step == first).count();
    assert_eq!(fc1, 2 * a.chosen_chunks);
    let recompute = out.trace.ops.iter().any(|o| o.name.ends_with("expert_gemm1_recompute"));
    assert_eq!(recompute, a.chosen_reuse.recompute());
    // Recorded in summary.json and run.log.
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.dir.join("summary.json")).unwrap()).unwrap();
    let j = &summary["mpmoe_auto"];
    assert_eq!(j["chosen_chunks"], a.chosen_chunks);
    assert_eq!(j["chosen_reuse"], a.chosen_reuse.as_str());
    assert!(j["chosen_measured_s"].as_f64().is_some() && j["chosen_predicted_s"].as_f64().is_some(), "{j}");
    assert_eq!(j["candidates"].as_array().unwrap().len(), 16);
    let log = std::fs::read_to_string(out.dir.join("run.log")).unwrap();
    assert!(log.contains("<- chosen") && log.contains("predicted") && log.contains("measured"), "{log}");
    assert!(log.contains(&format!("chunks={} reuse={}: predicted", a.chosen_chunks, a.chosen_reuse.as_str())), "{log}");
    // Same function as every fixed configuration: the single-rank top-k loss.
    let single = runtime(&spec("tokens_per_rank = 64\nseq_len = 8\nn_layers = 2\ncapacity_factor = 1.0", "", ""), &[], false).step(false, Some(0)).unwrap();
    assert!(((out.steps[0].loss - single.loss) / single.loss).abs() < 1e-5);
}

#[test]
fn a_failed_profile_keeps_what_it_timed_in_the_summary() {
    // The second profiled configuration (8 chunks, reuse buffers) fails at an op the first
    // (1 chunk) does not have: the run fails, and summary.json keeps the first's timing.
    let s = auto_spec("chunks = \"auto\"\nreuse = \"auto\"");
    let names = |n: usize, r: Reuse| -> std::collections::HashSet<String> {
        let mut t = s.clone();
        t.mpmoe = Some(moelab::spec::MpmoeSpec { chunks: Degree::Fixed(n), reuse: r, memory_budget_mib: None });
        Plan::build(&t).unwrap().ranks[0].ops.iter().map(|o| o.name.clone()).collect()
    };
    let first = names(1, Reuse::None);
    let only_second = names(8, Reuse::ReuseBuffers).into_iter().find(|n| !first.contains(n)).expect("an op of 8 chunks only");
    let (_root, _dir, summary) = failed_run_summary(&s, only_second);
    assert!(summary.get("mpmoe_auto").is_none(), "no choice was made: {summary}");
    let timed = summary["auto_timed"].as_array().expect("auto_timed kept");
    assert_eq!(timed.len(), 1, "{summary}");
    assert_eq!(timed[0]["config"], "mpmoe chunks=1 reuse=none");
    assert!(timed[0]["step_ms"].as_f64().is_some_and(|m| m > 0.0), "{summary}");
}

#[test]
fn auto_chunks_with_a_fixed_strategy_and_a_budget_that_nothing_fits() {
    // Fixed strategy: only n is chosen, among the strategy's candidates.
    let root = tempfile::tempdir().unwrap();
    let out = moelab::run::run(&auto_spec("chunks = \"auto\"\nreuse = \"recompute\""), root.path(), &Default::default()).expect("run");
    let a = out.mpmoe_auto.unwrap();
    assert_eq!(a.candidates.len(), CHUNK_CANDIDATES.len());
    assert!(a.candidates.iter().all(|c| c.reuse == Reuse::Recompute) && a.chosen_reuse == Reuse::Recompute);
    // A budget no candidate fits is refused before anything is written, naming the field.
    let root = tempfile::tempdir().unwrap();
    let e = moelab::run::run(&auto_spec("reuse = \"auto\"\nmemory_budget_mib = 0.01"), root.path(), &Default::default()).unwrap_err();
    match &e {
        moelab::run::RunError::Choice { field, fix, .. } => {
            assert_eq!(field, "mpmoe.memory_budget_mib");
            assert!(fix.contains("raise memory_budget_mib to at least") && fix.contains("chunks = \"auto\""), "{e}");
        }
        other => panic!("expected a choice error, got {other}"),
    }
    assert_eq!(std::fs::read_dir(root.path()).map(|d| d.count()).unwrap_or(0), 0, "no run directory");
    // The model profiles in-process: a cuda run is refused, naming the automatic field.
    let mut s = auto_spec("chunks = \"auto\"");
    s.run.backend = moelab::spec::BackendKind::Cuda;
    match moelab::run::mpmoe_auto::Setup::new(&s) {
        Err(moelab::run::RunError::Choice { field, fix, .. }) => assert!(field == "mpmoe.chunks" && fix.contains("backend = \"cpu\""), "{fix}"),
        Err(other) => panic!("expected a choice error, got {other}"),
        Ok(_) => panic!("expected a choice error"),
    }
}

#[test]
fn auto_values_round_trip_and_a_budget_needs_an_automatic_choice() {
    let s = from_toml_str(&format!("{SPEC}[mpmoe]\nchunks = \"auto\"\nreuse = \"auto\"\nmemory_budget_mib = 64\n")).unwrap();
    let o = s.mpmoe.unwrap();
    assert_eq!((o.chunks, o.reuse, o.memory_budget_mib), (Degree::Auto, Reuse::Auto, Some(64.0)));
    assert_eq!(from_toml_str(&s.to_toml()).unwrap(), s, "round trip");
    // A plan built outside `run` from an auto spec still builds (2 chunks, nothing reused).
    let plan = Plan::build(&s).unwrap();
    assert_eq!(plan.ranks[0].ops.iter().filter(|o| o.stage == Stage::ExpertGemm1 && o.pass == Pass::Forward).count(), 2);
    for (table, says) in [
        ("chunks = 2\nmemory_budget_mib = 64", "only limits an automatic choice"),
        ("chunks = \"auto\"\nmemory_budget_mib = -1", "must be a positive number"),
    ] {
        let (p, shown) = problems(&format!("{SPEC}[mpmoe]\n{table}\n"));
        assert_eq!(p.len(), 1, "{shown}");
        assert_eq!(p[0].field, "mpmoe.memory_budget_mib");
        assert!(p[0].message.contains(says), "{shown}");
    }
    let e = from_toml_str(&format!("{SPEC}[mpmoe]\nchunks = \"many\"\n")).unwrap_err();
    assert!(e.to_string().contains("\"auto\""), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Overlap in the measured trace, with a causal contrast
// ---------------------------------------------------------------------------------------------

/// Over every rank, layer and pass of the measured steps: the time all-to-alls spend inside
/// the same layer and pass's expert compute (fc1, activation, fc2), and how many times chunk
/// g+1's forward dispatch all-to-all started before chunk g's fc2 ended.
fn a2a_inside_expert_compute(trace: &moelab::trace::Trace) -> (u64, usize) {
    use moelab::trace::OpEvent;
    let expert = |e: &&OpEvent| matches!(e.stage, Stage::ExpertGemm1 | Stage::Act | Stage::ExpertGemm2);
    let mut overlap = 0;
    for a in trace.ops.iter().filter(|e| e.stage == Stage::AllToAll) {
        for c in trace.ops.iter().filter(expert).filter(|c| (c.rank, c.step, c.layer, c.pass) == (a.rank, a.step, a.layer, a.pass)) {
            overlap += a.end_ns.min(c.end_ns).saturating_sub(a.start_ns.max(c.start_ns));
        }
    }
    let early = trace
        .ops
        .iter()
        .filter(|a| a.stage == Stage::AllToAll && a.pass == Pass::Forward && a.name.ends_with("dispatch_a2a") && a.chunk.is_some_and(|g| g > 0))
        .filter(|a| {
            let g = a.chunk.unwrap() - 1;
            trace.ops.iter().any(|c| {
                c.stage == Stage::ExpertGemm2 && c.pass == Pass::Forward && c.chunk == Some(g) && (c.rank, c.step, c.layer) == (a.rank, a.step, a.layer)
                    && a.start_ns < c.end_ns
            })
        })
        .count();
    (overlap, early)
}

#[test]
fn chunked_all_to_alls_run_inside_the_previous_chunks_expert_compute_and_unchunked_ones_cannot() {
    // Slow experts (d_ffn 1024). With n = 1 every all-to-all of a layer is a dependency of,
    // or depends on, that layer's expert compute, so the overlap is exactly 0 on any executor.
    // With n = 4 nothing of chunk g+1's dispatch waits for chunk g's experts (plan test
    // above), so on concurrent streams some of it runs inside them; a serial executor would
    // give 0 here too.
    let model = "d_model = 16\nd_ffn = 1024\nn_experts = 4\ntokens_per_rank = 128\nseq_len = 16\nn_layers = 1\ncapacity_factor = 1.0";
    let run = |chunks: usize| {
        let text = format!(
            "name = \"t\"\nvariant = \"mpmoe\"\n[model]\n{model}\n[layout]\nep = 2\n[run]\nbackend = \"cpu\"\n[mpmoe]\nchunks = {chunks}\n"
        );
        let mut rt = runtime(&from_toml_str(&text).unwrap(), &[], false);
        for i in 0..3 {
            rt.step(i > 0, None).expect("step");
        }
        a2a_inside_expert_compute(&rt.trace())
    };
    let (overlap, early) = run(1);
    assert_eq!((overlap, early), (0, 0), "n = 1: the dependencies serialize all-to-alls and experts");
    let (overlap, early) = run(4);
    assert!(overlap > 0, "n = 4: all-to-alls should run inside the expert compute");
    assert!(early > 0, "n = 4: some chunk g+1 dispatch should start before chunk g's fc2 ends");
}
