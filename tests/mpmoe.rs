//! MPMoE: the pipelined, memory-reusing MoE layer computes what the single-rank top-k run
//! computes for every chunk count and reuse strategy, drops the same tokens, issues chunk
//! g+1's dispatch all-to-all independently of and before chunk g's experts, and its reuse
//! strategies lower the predicted peak, which the cpu backend's tracked peak matches.

mod common;
use common::*;
use moelab::backend::StepReport;
use moelab::plan::memory::predict;
use moelab::plan::{OpId, Plan, RankPlan};
use moelab::spec::{from_toml_str, ExperimentSpec, Reuse};
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
    assert_eq!((opts.chunks, opts.reuse), (2, Reuse::None));
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
    assert_eq!(from_toml_str(&format!("{SPEC}[mpmoe]\nchunks = 16\n")).unwrap().mpmoe.unwrap().chunks, 16);
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
