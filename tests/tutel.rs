//! Tutel: every pipelining degree and both all-to-all algorithms compute what the
//! single-rank top-k run computes and drop the same tokens; the 2D hierarchical all-to-all
//! delivers exactly the flat one's rows; chunk i+1's all-to-all is independent of and issued
//! before chunk i's experts; `degree = "auto"` times the candidates and records its choice;
//! bad `[tutel]` tables are rejected with field names and fixes.

mod common;
use common::*;
use moelab::backend::StepReport;
use moelab::plan::{OpId, OpKind, Plan, RankPlan};
use moelab::spec::{from_toml_str, A2aKind, Degree, ExperimentSpec};
use moelab::taxonomy::{Pass, Stage, Stream};

const MODEL: &str = "d_model = 16\nd_ffn = 24\nn_experts = 8";

/// A Tutel spec: extra `[model]` lines, a layout and the `[tutel]` table's lines.
fn tutel_spec(model: &str, layout: &str, tutel: &str, run: &str) -> ExperimentSpec {
    let text = format!(
        "name = \"t\"\nvariant = \"tutel\"\n[model]\n{MODEL}\n{model}\n[layout]\n{layout}\n[run]\nbackend = \"cpu\"\n{run}\n[tutel]\n{tutel}\n"
    );
    from_toml_str(&text).unwrap_or_else(|e| panic!("test spec invalid: {e}\n{text}"))
}

/// The single-rank top-k reference with the same 8 experts.
fn topk_spec(model: &str, run: &str) -> ExperimentSpec {
    let text = format!("name = \"t\"\n[model]\n{MODEL}\n{model}\n[run]\nbackend = \"cpu\"\n{run}\n");
    from_toml_str(&text).unwrap_or_else(|e| panic!("test spec invalid: {e}\n{text}"))
}

/// The `[tutel]` lines for a degree and an all-to-all algorithm.
fn table(degree: usize, a2a: A2aKind, gpn: usize) -> String {
    format!("degree = {degree}\na2a = \"{}\"\ngpus_per_node = {gpn}", a2a.as_str())
}

/// Loss, aux loss, drops, the MoE output and every gradient match the single-rank top-k run.
fn check_against_topk(model: &str, dp: usize, ep: usize, tutel: &str) {
    let (t, world) = (16, dp * ep);
    let out = "L1.moe.out";
    let layers = format!("tokens_per_rank = {t}\nseq_len = 8\nn_layers = 2\n{model}");
    let dist_spec = tutel_spec(&layers, &format!("dp = {dp}\nep = {ep}"), tutel, "");
    let ref_spec = topk_spec(&format!("tokens_per_rank = {}\nseq_len = 8\nn_layers = 2\n{model}", t * world), "");
    let (dist, a) = step_retaining(&dist_spec, &[out]);
    let (single, b) = step_retaining(&ref_spec, &[out]);
    let what = format!("dp={dp} ep={ep} [{}]", tutel.replace('\n', " "));
    assert_matches_single_rank(&dist, &a, &single, &b, &[out], ep, &what);
}

#[test]
fn every_degree_matches_single_rank_topk_on_ep2_and_dp2_ep2() {
    for degree in 1..=4 {
        for (dp, ep) in [(1, 2), (2, 2)] {
            check_against_topk("capacity_factor = 1.0", dp, ep, &table(degree, A2aKind::Flat, 8));
            // A one-rank-per-node 2D all-to-all falls back to the flat one, as in Tutel.
            check_against_topk("capacity_factor = 1.0", dp, ep, &table(degree, A2aKind::TwoD, 1));
        }
    }
}

#[test]
fn every_degree_and_both_all_to_alls_match_single_rank_topk_on_ep4() {
    for degree in 1..=4 {
        check_against_topk("capacity_factor = 1.0", 1, 4, &table(degree, A2aKind::Flat, 8));
        check_against_topk("capacity_factor = 1.0", 1, 4, &table(degree, A2aKind::TwoD, 2));
    }
}

#[test]
fn two_d_all_to_all_with_data_parallel_replicas_and_dropless_matches_topk() {
    check_against_topk("capacity_factor = 1.25\n[model.backbone]\nn_heads = 2\nd_mlp = 20", 2, 4, &table(3, A2aKind::TwoD, 2));
    check_against_topk("dropless = true\ntop_k = 1", 1, 4, &table(2, A2aKind::TwoD, 2));
}

#[test]
fn two_d_all_to_all_gives_exactly_the_flat_outputs_and_gradients() {
    let model = "tokens_per_rank = 16\nseq_len = 8\nn_layers = 2\ncapacity_factor = 1.0";
    for degree in [1, 3] {
        let out = "L1.moe.out";
        let (flat, a) = step_retaining(&tutel_spec(model, "ep = 4", &table(degree, A2aKind::Flat, 2), ""), &[out]);
        let (two_d, b) = step_retaining(&tutel_spec(model, "ep = 4", &table(degree, A2aKind::TwoD, 2), ""), &[out]);
        assert_eq!(a.loss, b.loss, "degree {degree}: loss");
        assert_eq!(gather(&flat, out), gather(&two_d, out), "degree {degree}: outputs");
        let rp = &flat.plan().ranks[0];
        for p in &rp.params {
            let gname = format!("{}.grad", rp.buffer(p.value).name);
            assert_eq!(gather(&flat, &gname), gather(&two_d, &gname), "degree {degree}: {gname}");
        }
        // The 2D plan's chunk all-to-alls are all 2D ops over a node group and a rail group.
        let p2 = two_d.plan();
        for rp in &p2.ranks {
            let a2as: Vec<_> = rp.ops.iter().filter(|o| o.stage == Stage::AllToAll).collect();
            assert_eq!(a2as.len(), 2 * 4 * degree, "two layers, four all-to-alls per chunk");
            for o in a2as {
                let OpKind::AllToAllV2d { intra, inter, gpus_per_node, .. } = &o.kind else { panic!("{} is flat", o.name) };
                assert_eq!(*gpus_per_node, 2);
                let (gi, ge) = (&p2.groups[intra.0 as usize], &p2.groups[inter.0 as usize]);
                assert!(gi.ranks.contains(&rp.rank) && ge.ranks.contains(&rp.rank));
                assert_eq!((gi.ranks.len(), ge.ranks.len()), (2, 2));
                let r = rp.rank;
                assert_eq!(gi.ranks, [r / 2 * 2, r / 2 * 2 + 1], "node group of rank {r}");
                assert_eq!(ge.ranks, [r % 2, r % 2 + 2], "same-local-index group of rank {r}");
                let whole = o.kind.collective_group().expect("a collective");
                assert_eq!(p2.groups[whole.0 as usize].ranks, [0, 1, 2, 3], "the 2D all-to-all spans the expert-parallel group");
            }
        }
        // Its waits line up across the four ranks like a flat all-to-all's.
        let mut traced = runtime(&tutel_spec(model, "ep = 4", &table(degree, A2aKind::TwoD, 2), ""), &[], false);
        traced.step(true, Some(0)).expect("traced step");
        let waits = moelab::analysis::analyze(&traced.trace()).waits;
        let a2a: Vec<_> = waits.iter().filter(|w| w.stage == Stage::AllToAll).collect();
        assert_eq!(a2a.len(), 2, "forward and backward rows: {waits:?}");
        for w in a2a {
            assert_eq!((w.count, w.unmatched), (4 * 2 * 2 * degree as u64, 0), "{w:?}");
        }
    }
}

#[test]
fn degree_never_changes_which_tokens_drop() {
    let model = "tokens_per_rank = 16\nseq_len = 8\nn_layers = 2\ncapacity_factor = 0.5";
    for (layout, a2a, gpn) in [("dp = 2\nep = 2", A2aKind::Flat, 8), ("ep = 4", A2aKind::TwoD, 2)] {
        let runs: Vec<(StepReport, Vec<f32>)> = (1..=4)
            .map(|d| {
                let (rt, r) = step_retaining(&tutel_spec(model, layout, &table(d, a2a, gpn), ""), &["L1.moe.out"]);
                (r, gather(&rt, "L1.moe.out"))
            })
            .collect();
        assert!(runs[0].0.dropped > 0, "the capacity must drop tokens for this test to mean anything");
        for (i, (r, out)) in runs.iter().enumerate().skip(1) {
            assert_eq!(r.dropped, runs[0].0.dropped, "degree={} drops differently", i + 1);
            let err = rel_err(out, &runs[0].1);
            assert!(err < 1e-6, "degree={}: output differs from degree=1 by {err}", i + 1);
        }
    }
}

#[test]
fn training_steps_stay_in_lockstep_with_topk() {
    let model = "tokens_per_rank = 16\nseq_len = 8\nn_layers = 1";
    let mut dist = runtime(&tutel_spec(model, "ep = 4", &table(3, A2aKind::TwoD, 2), "lr = 0.01"), &[], false);
    let mut single = runtime(&topk_spec("tokens_per_rank = 64\nseq_len = 8\nn_layers = 1", "lr = 0.01"), &[], false);
    for s in 0..3 {
        let a = dist.step(true, Some(s)).unwrap();
        let b = single.step(true, Some(s)).unwrap();
        assert!(((a.loss - b.loss) / b.loss).abs() < 1e-4, "step {s}: {} vs {}", a.loss, b.loss);
    }
    let want: Vec<f32> = single.read(0, "L0.expert.w1").unwrap();
    let got: Vec<f32> = (0..4).flat_map(|r| dist.read(r, "L0.expert.w1").unwrap()).collect();
    assert!(rel_err(&got, &want) < 1e-4, "expert weights drifted apart");
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
    for (a2a, gpn) in [(A2aKind::Flat, 8), (A2aKind::TwoD, 2)] {
        let s = tutel_spec("tokens_per_rank = 16\nn_layers = 2", "ep = 4", &table(4, a2a, gpn), "");
        let plan = Plan::build(&s).unwrap();
        for rp in &plan.ranks {
            for l in 0..2 {
                for g in 0..3 {
                    let a2a_op = op_id(rp, &format!("L{l}.c{}.dispatch_a2a", g + 1));
                    let gemm = op_id(rp, &format!("L{l}.c{g}.expert_gemm1"));
                    let op = &rp.ops[a2a_op.0 as usize];
                    assert_eq!((op.stage, op.stream, op.chunk, op.pass), (Stage::AllToAll, Stream::Comm, Some(g as u32 + 1), Pass::Forward));
                    assert!(a2a_op < gemm, "L{l}: chunk {}'s all-to-all is issued after chunk {g}'s fc1", g + 1);
                    assert!(!reaches(rp, gemm, a2a_op), "L{l}: chunk {}'s all-to-all waits for chunk {g}'s fc1", g + 1);
                    // Backward, reversed roles: chunk g+1's output-gradient all-to-all vs chunk g's expert backward.
                    let a2a_op = op_id(rp, &format!("L{l}.c{}.combine_a2a_bwd", g + 1));
                    let gemm = op_id(rp, &format!("L{l}.c{g}.expert_gemm2_bwd"));
                    assert!(a2a_op < gemm && !reaches(rp, gemm, a2a_op), "L{l} backward: chunk {} vs chunk {g}", g + 1);
                }
            }
            // No memory reuse: no re-communication or recomputation ops.
            assert!(rp.ops.iter().all(|o| !o.name.contains("recomm") && !o.name.contains("recompute")));
        }
    }
}

#[test]
fn auto_degree_times_the_candidates_and_records_its_choice() {
    let root = tempfile::tempdir().unwrap();
    let s = tutel_spec("batch = 2\nseq_len = 8\nn_layers = 1", "ep = 2", "degree = \"auto\"", "steps = 1\nwarmup = 0");
    let out = moelab::run::run(&s, root.path(), &Default::default()).expect("run");
    let auto = out.auto_degree.expect("auto degree resolved");
    let tried: Vec<(usize, usize)> = auto.candidates.iter().map(|c| (c.r, c.degree)).collect();
    assert_eq!(tried, [(1, 1), (1, 2), (1, 4)], "r fixed at 1: only the degree varies");
    let best = auto.candidates.iter().min_by(|a, b| a.mean_s.total_cmp(&b.mean_s)).unwrap();
    assert_eq!((auto.chosen_r, auto.chosen), (1, best.degree), "keeps the fastest");
    let summary = std::fs::read_to_string(out.dir.join("summary.json")).unwrap();
    assert!(summary.contains("tutel_auto_degree") && summary.contains("\"chosen\"") && summary.contains("\"reason\""), "{summary}");
    let log = std::fs::read_to_string(out.dir.join("run.log")).unwrap();
    assert!(log.contains(&format!("chose r=1 degree {}", auto.chosen)), "{log}");
    // The measured steps ran the chosen plan: as many forward fc1 ops per layer as the degree.
    let fc1 = out.trace.ops.iter().filter(|o| o.stage == Stage::ExpertGemm1 && o.rank == 0 && o.pass == Pass::Forward).count();
    assert_eq!(fc1, auto.chosen);
    // spec.toml is the spec the measured steps ran (what cuda workers read); the request is
    // kept beside it.
    let ran = moelab::spec::load_file(&out.dir.join("spec.toml")).expect("spec.toml loads");
    assert_eq!(ran.tutel.expect("tutel").degree, moelab::spec::Degree::Fixed(auto.chosen));
    let asked = moelab::spec::load_file(&out.dir.join("spec.requested.toml")).expect("spec.requested.toml loads");
    assert_eq!(asked.tutel.expect("tutel").degree, moelab::spec::Degree::Auto);
}

#[test]
fn a_cancelled_or_failed_auto_degree_keeps_what_it_timed_in_the_summary() {
    // The third candidate (degree 4) fails at an op the first two do not have: the run
    // fails before any measured step, and summary.json keeps the two timings it had.
    let s = tutel_spec("batch = 2\nseq_len = 8\nn_layers = 1", "ep = 2", "degree = \"auto\"", "steps = 1\nwarmup = 0");
    let names = |d: usize| -> std::collections::HashSet<String> {
        let mut t = s.clone();
        t.tutel.as_mut().unwrap().degree = Degree::Fixed(d);
        Plan::build(&t).unwrap().ranks[0].ops.iter().map(|o| o.name.clone()).collect()
    };
    let (d1, d2) = (names(1), names(2));
    let only_4 = names(4).into_iter().find(|n| !d1.contains(n) && !d2.contains(n)).expect("an op of degree 4 only");
    let (_root, dir, summary) = failed_run_summary(&s, only_4);
    assert!(summary.get("tutel_auto_degree").is_none(), "no choice was made: {summary}");
    let timed: Vec<&str> = summary["auto_timed"].as_array().expect("auto_timed kept").iter().map(|t| t["config"].as_str().unwrap()).collect();
    assert_eq!(timed, ["tutel r=1 degree 1", "tutel r=1 degree 2"], "{summary}");
    assert!(summary["auto_timed"].as_array().unwrap().iter().all(|t| t["step_ms"].as_f64().is_some_and(|m| m > 0.0)));
    let log = std::fs::read_to_string(dir.join("run.log")).unwrap();
    assert!(log.contains("tutel auto degree: timing failed") && log.contains("status: failed"), "{log}");
}

#[test]
fn auto_parallelism_times_both_layouts_of_one_parameter_layout_and_says_why() {
    let root = tempfile::tempdir().unwrap();
    let model = "tokens_per_rank = 16\nseq_len = 8\nn_layers = 2\ncapacity_factor = 1.0";
    let s = tutel_spec(model, "ep = 2", "degree = \"auto\"\nparallelism = \"auto\"", "steps = 1\nwarmup = 0");
    let out = moelab::run::run(&s, root.path(), &Default::default()).expect("run");
    let auto = out.auto_degree.clone().expect("auto resolved");
    let tried: Vec<(usize, usize)> = auto.candidates.iter().map(|c| (c.r, c.degree)).collect();
    assert_eq!(tried, [(1, 1), (1, 2), (1, 4), (0, 1)], "r = 1 at every degree, r = 0 unpipelined");
    let best = auto.candidates.iter().min_by(|a, b| a.mean_s.total_cmp(&b.mean_s)).unwrap();
    assert_eq!((auto.chosen_r, auto.chosen), (best.r, best.degree));
    // Why: the times, the runner-up and what each layout moves.
    let r0 = auto.candidates.iter().find(|c| c.r == 0).unwrap();
    let r1 = auto.candidates.iter().find(|c| c.r == 1 && c.degree == 1).unwrap();
    assert!(r0.comm_bytes > 0 && r1.comm_bytes > 0 && r0.comm_bytes != r1.comm_bytes);
    assert!(auto.reason.contains("fastest of 4") && auto.reason.contains("runner-up") && auto.reason.contains("KB"), "{}", auto.reason);
    let log = std::fs::read_to_string(out.dir.join("run.log")).unwrap();
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["tutel_auto_degree"]["chosen_r"], auto.chosen_r);
    // Every candidate's per-layer MoE times come from its trace.
    assert!(auto.candidates.iter().all(|c| c.layer_s.len() == 2 && c.layer_s.iter().all(|t| *t > 0.0)));
    // Per layer, the fastest candidate for that layer's MoE sublayer; one choice when they agree.
    let fastest: Vec<(usize, usize)> = (0..2)
        .map(|l| auto.candidates.iter().min_by(|a, b| a.layer_s[l].total_cmp(&b.layer_s[l])).map(|c| (c.r, c.degree)).unwrap())
        .collect();
    // The measured step ran each layer's choice: all-to-alls for r = 1, weight all-gathers for r = 0.
    // When the layers' votes differ, the mix itself is timed and kept only if faster.
    let mix_won = fastest[0] != fastest[1] && auto.mixed_s.expect("the mix was timed") < best.mean_s;
    assert_eq!(auto.mixed_s.is_some(), fastest[0] != fastest[1]);
    let chosen: Vec<(usize, usize)> = if mix_won {
        assert_eq!(auto.per_layer.iter().map(|c| (c.r, c.degree)).collect::<Vec<_>>(), fastest);
        assert!(log.contains("chose per layer") && auto.reason.contains("L0: r="), "{log}");
        fastest
    } else {
        assert!(auto.per_layer.is_empty());
        assert!(fastest[0] == fastest[1] || auto.reason.contains("not faster"), "{}", auto.reason);
        assert!(log.contains(&format!("chose r={} degree {}", auto.chosen_r, auto.chosen)), "{log}");
        vec![(auto.chosen_r, auto.chosen); 2]
    };
    // run.log names what the measured steps ran: the mix, or the uniform choice.
    let ran = if mix_won { format!("per layer (L0: r={} degree {}, L1: r={} degree {})", chosen[0].0, chosen[0].1, chosen[1].0, chosen[1].1) } else { format!("r={} degree {}", auto.chosen_r, auto.chosen) };
    assert_eq!(auto.describe(), ran);
    assert!(log.contains(&format!("measured steps use {ran}:")), "{log}");
    let mix = moelab::run::AutoDegree {
        per_layer: vec![moelab::spec::TutelLayer { r: 1, degree: 4 }, moelab::spec::TutelLayer { r: 1, degree: 1 }],
        ..auto.clone()
    };
    assert_eq!(mix.describe(), "per layer (L0: r=1 degree 4, L1: r=1 degree 1)");
    for (l, (r, _)) in chosen.iter().enumerate() {
        let of = |st: Stage| out.trace.ops.iter().filter(|o| o.stage == st && o.layer == Some(l as u32)).count();
        assert_eq!((of(Stage::AllToAll) > 0, of(Stage::ReduceScatter) > 0), (*r == 1, *r == 0), "layer {l}");
    }
    // Whichever it chose, it computes the single-rank top-k function.
    let single = runtime(&topk_spec("tokens_per_rank = 32\nseq_len = 8\nn_layers = 2\ncapacity_factor = 1.0", ""), &[], false)
        .step(false, Some(0))
        .unwrap();
    assert!(((out.steps[0].loss - single.loss) / single.loss).abs() < 1e-5, "{} vs {}", out.steps[0].loss, single.loss);
    // Parallelism alone: r = 1 at the fixed degree and r = 0.
    let s = tutel_spec(model, "ep = 2", "degree = 2\nparallelism = \"auto\"", "steps = 1\nwarmup = 0");
    let auto = moelab::run::run(&s, root.path(), &Default::default()).expect("run").auto_degree.unwrap();
    assert_eq!(auto.candidates.iter().map(|c| (c.r, c.degree)).collect::<Vec<_>>(), [(1, 2), (0, 1)]);
}

#[test]
fn parallelism_values_round_trip_and_unknown_ones_name_the_choices() {
    use moelab::spec::ParallelismChoice;
    let s = from_toml_str(SPEC).unwrap();
    assert_eq!(s.tutel.unwrap().parallelism, ParallelismChoice::Fixed);
    let s = from_toml_str(&format!("{SPEC}[tutel]\nparallelism = \"auto\"\n")).unwrap();
    assert_eq!(s.tutel.as_ref().unwrap().parallelism, ParallelismChoice::Auto);
    assert_eq!(from_toml_str(&s.to_toml()).unwrap(), s, "round trip");
    let e = from_toml_str(&format!("{SPEC}[tutel]\nparallelism = \"best\"\n")).unwrap_err().to_string();
    assert!(e.contains("fixed") && e.contains("auto"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Spec rules
// ---------------------------------------------------------------------------------------------

const SPEC: &str = "name = \"t\"\nvariant = \"tutel\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 8\ntokens_per_rank = 16\n[layout]\nep = 4\n";

fn problems(text: &str) -> (Vec<moelab::spec::Problem>, String) {
    let e = from_toml_str(text).err().unwrap_or_else(|| panic!("expected a rejection:\n{text}"));
    (e.problems().to_vec(), e.to_string())
}

#[test]
fn tutel_defaults_fill_in_and_round_trip() {
    let s = from_toml_str(SPEC).unwrap();
    let o = s.tutel.expect("variant tutel gets its [tutel] defaults");
    assert_eq!((o.degree, o.a2a, o.gpus_per_node), (Degree::Fixed(1), A2aKind::Flat, 8));
    for t in ["degree = \"auto\"\na2a = \"2d\"\ngpus_per_node = 2", "degree = 3"] {
        let s = from_toml_str(&format!("{SPEC}[tutel]\n{t}\n")).unwrap();
        assert_eq!(from_toml_str(&s.to_toml()).unwrap(), s, "round trip");
    }
    assert_eq!(from_toml_str(&format!("{SPEC}[tutel]\ndegree = \"auto\"\n")).unwrap().tutel.unwrap().degree, Degree::Auto);
}

#[test]
fn tutel_table_with_another_variant_is_rejected() {
    let text = format!("{SPEC}[tutel]\ndegree = 2\n").replace("variant = \"tutel\"", "variant = \"topk\"");
    let (p, shown) = problems(&text);
    assert_eq!(p.len(), 1, "{shown}");
    assert_eq!(p[0].field, "tutel");
    assert!(p[0].message.contains("\"topk\"") && p[0].fix.contains("variant = \"tutel\""), "{shown}");
}

#[test]
fn degree_zero_and_too_large_are_rejected_with_a_fix() {
    for (degree, says) in [(0, "degree=0 must be at least 1"), (65, "exceeds the limit of 64"), (17, "exceeds tokens_per_rank=16")] {
        let (p, shown) = problems(&format!("{SPEC}[tutel]\ndegree = {degree}\n"));
        assert_eq!(p.len(), 1, "{shown}");
        assert_eq!(p[0].field, "tutel.degree");
        assert!(p[0].message.contains(says), "{shown}");
        assert!(p[0].fix.contains("between 1 and 16"), "{shown}");
    }
    let e = from_toml_str(&format!("{SPEC}[tutel]\ndegree = \"fast\"\n")).unwrap_err().to_string();
    assert!(e.contains("auto") && e.contains("tutel.degree"), "{e}");
}

#[test]
fn gpus_per_node_must_divide_ep_for_2d() {
    let (p, shown) = problems(&format!("{SPEC}[tutel]\na2a = \"2d\"\ngpus_per_node = 3\n"));
    assert_eq!(p.len(), 1, "{shown}");
    assert_eq!(p[0].field, "tutel.gpus_per_node");
    assert!(p[0].message.contains("gpus_per_node=3 does not divide layout.ep=4"), "{shown}");
    assert!(p[0].fix.contains("1, 2, 4") && p[0].fix.contains("\"flat\""), "{shown}");
    // The default (8) does not divide ep = 4 either; flat ignores gpus_per_node.
    assert_eq!(problems(&format!("{SPEC}[tutel]\na2a = \"2d\"\n")).0[0].field, "tutel.gpus_per_node");
    assert!(from_toml_str(&format!("{SPEC}[tutel]\na2a = \"flat\"\ngpus_per_node = 3\n")).is_ok());
    let (p, _) = problems(&format!("{SPEC}[tutel]\na2a = \"2d\"\ngpus_per_node = 0\n"));
    assert!(p[0].message.contains("gpus_per_node=0"));
}

#[test]
fn predicted_peak_equals_the_tracked_peak_with_both_all_to_alls() {
    // Receive buffers are reserved by the op that issues their all-to-all (flat or 2D), so
    // the plan's replay matches the cpu backend however the comm stream interleaves.
    let model = "tokens_per_rank = 64\nn_layers = 2\ncapacity_factor = 1.0";
    for (a2a, gpn) in [(A2aKind::Flat, 8), (A2aKind::TwoD, 2)] {
        let s = tutel_spec(model, "ep = 4", &table(4, a2a, gpn), "");
        let mut rt = runtime(&s, &[], false);
        for i in 0..2 {
            rt.step(i > 0, None).expect("step");
        }
        let preds: Vec<_> = rt.plan().ranks.iter().map(moelab::plan::memory::predict).collect();
        for (rank, (p, (peak, _))) in preds.iter().zip(rt.tracked_peaks()).enumerate() {
            assert_eq!(peak, p.peak_total, "rank {rank} ({}): tracked peak vs plan", a2a.as_str());
        }
    }
}

#[test]
fn data_parallel_r0_over_the_same_layout_matches_single_rank_topk() {
    // r = 0: same parameters as r = 1 (expert slices per rank), executed data-parallel.
    check_against_topk("capacity_factor = 1.0", 1, 2, "r = 0");
    check_against_topk("capacity_factor = 1.0", 1, 4, "r = 0");
    check_against_topk("capacity_factor = 0.5", 2, 2, "r = 0");
    check_against_topk("dropless = true\nrenormalize = true\n[model.backbone]\nn_heads = 2\nd_mlp = 20", 1, 4, "r = 0");
    let s = tutel_spec("tokens_per_rank = 16\nn_layers = 2", "dp = 2\nep = 2", "r = 0", "");
    let plan = Plan::build(&s).unwrap();
    for rp in &plan.ranks {
        assert!(rp.ops.iter().all(|o| o.stage != Stage::AllToAll), "r = 0 has no all-to-all");
        let rs = rp.ops.iter().filter(|o| matches!(o.kind, OpKind::ReduceScatter { .. })).count();
        assert_eq!(rs, 2 * 4, "one reduce-scatter per expert tensor and layer");
        // Same parameter layout as r = 1.
        let ep = Plan::build(&tutel_spec("tokens_per_rank = 16\nn_layers = 2", "dp = 2\nep = 2", "r = 1", "")).unwrap();
        let names = |r: &RankPlan| r.params.iter().map(|p| (r.buffer(p.value).name.clone(), p.init.clone())).collect::<Vec<_>>();
        assert_eq!(names(rp), names(&ep.ranks[rp.rank as usize]));
    }
}

#[test]
fn r_other_than_0_and_1_and_pipelining_with_r0_are_rejected() {
    let (p, shown) = problems(&format!("{SPEC}[tutel]\nr = 2\n"));
    assert_eq!((p.len(), p[0].field.as_str()), (1, "tutel.r"), "{shown}");
    assert!(p[0].fix.contains("r = 0") && p[0].fix.contains("r = 1"), "{shown}");
    let (p, shown) = problems(&format!("{SPEC}[tutel]\nr = 0\ndegree = 2\n"));
    assert_eq!((p.len(), p[0].field.as_str()), (1, "tutel.degree"), "{shown}");
}

#[test]
fn data_parallel_r0_training_stays_in_lockstep_with_topk() {
    // Reduce-scattered expert gradients land in the owners' slices, so Adam updates the same
    // weights as top-k's.
    let model = "tokens_per_rank = 16\nseq_len = 8\nn_layers = 1";
    let mut dist = runtime(&tutel_spec(model, "dp = 2\nep = 2", "r = 0", "lr = 0.01"), &[], false);
    let mut single = runtime(&topk_spec("tokens_per_rank = 64\nseq_len = 8\nn_layers = 1", "lr = 0.01"), &[], false);
    for s in 0..3 {
        let a = dist.step(true, Some(s)).unwrap();
        let b = single.step(true, Some(s)).unwrap();
        assert!(((a.loss - b.loss) / b.loss).abs() < 1e-4, "step {s}: {} vs {}", a.loss, b.loss);
    }
    let want: Vec<f32> = single.read(0, "L0.expert.w1").unwrap();
    for d in 0..2 {
        let got: Vec<f32> = (0..2).flat_map(|r| dist.read(d * 2 + r, "L0.expert.w1").unwrap()).collect();
        assert!(rel_err(&got, &want) < 1e-4, "replica {d}: expert weights drifted apart");
    }
}

/// Over every rank, layer and pass of the measured steps: the time all-to-alls spend inside
/// the same layer and pass's expert compute (fc1, activation, fc2).
fn a2a_inside_expert_compute(trace: &moelab::trace::Trace) -> u64 {
    let mut overlap = 0;
    for a in trace.ops.iter().filter(|e| e.stage == Stage::AllToAll) {
        for c in trace.ops.iter().filter(|c| matches!(c.stage, Stage::ExpertGemm1 | Stage::Act | Stage::ExpertGemm2)) {
            if (c.rank, c.step, c.layer, c.pass) == (a.rank, a.step, a.layer, a.pass) {
                overlap += a.end_ns.min(c.end_ns).saturating_sub(a.start_ns.max(c.start_ns));
            }
        }
    }
    overlap
}

#[test]
fn pipelined_all_to_alls_run_inside_expert_compute_and_unpipelined_ones_cannot() {
    // Slow experts; degree 1: every all-to-all of a layer is a dependency of, or depends on,
    // its expert compute (exactly 0 overlap on any executor). Degree 4 (flat and 2D): chunk
    // i+1's all-to-all does not wait for chunk i's experts, so concurrent streams overlap them.
    let model = "tokens_per_rank = 128\nseq_len = 16\nn_layers = 1\ncapacity_factor = 1.0";
    let run = |t: String| {
        let mut s = tutel_spec(model, "ep = 4", &t, "");
        s.model.d_ffn = 512;
        let mut rt = runtime(&s, &[], false);
        for i in 0..3 {
            rt.step(i > 0, None).expect("step");
        }
        a2a_inside_expert_compute(&rt.trace())
    };
    assert_eq!(run(table(1, A2aKind::Flat, 8)), 0, "degree 1: dependencies serialize all-to-alls and experts");
    assert!(run(table(4, A2aKind::Flat, 8)) > 0, "degree 4, flat: no overlap measured");
    assert!(run(table(4, A2aKind::TwoD, 2)) > 0, "degree 4, 2d: no overlap measured");
}

/// A Tutel spec with `n_experts` experts on `ep` ranks (ep > n_experts splits each expert over
/// s = ep / n_experts ranks) and `r`; `d_ffn = 24` (divisible by s = 2, 4).
fn sharded_spec(n_experts: usize, model: &str, dp: usize, ep: usize, tutel: &str) -> ExperimentSpec {
    let text = format!(
        "name = \"t\"\nvariant = \"tutel\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = {n_experts}\n{model}\n[layout]\ndp = {dp}\nep = {ep}\n[run]\nbackend = \"cpu\"\n[tutel]\n{tutel}\n"
    );
    from_toml_str(&text).unwrap_or_else(|e| panic!("test spec invalid: {e}\n{text}"))
}

/// The single-rank expert tensor `name` (a grad or value) rebuilt from the hidden slices that
/// ranks `e * s + j` of the first expert-parallel group hold (b2: every slice holder has the
/// whole vector, checked equal).
fn unsliced_expert(rt: &moelab::backend::cpu::CpuRuntime, name: &str, n_experts: usize, s: usize) -> Vec<f32> {
    let mut out = Vec::new();
    for e in 0..n_experts {
        let held: Vec<(Vec<f32>, Option<moelab::plan::ParamSlice>)> = (0..s)
            .map(|j| {
                let r = e * s + j;
                let rp = &rt.plan().ranks[r];
                let id = rp.buffer_id(name).unwrap_or_else(|| panic!("{name} on rank {r}"));
                let p = rp.params.iter().find(|p| p.value == id || p.grad == Some(id)).expect("a param");
                (rt.read(r, name).unwrap(), p.slice)
            })
            .collect();
        match held[0].1 {
            None => {
                for (v, _) in &held[1..] {
                    assert!(rel_err(v, &held[0].0) < 1e-6, "{name}: replicas of expert {e} differ");
                }
                out.extend_from_slice(&held[0].0);
            }
            Some(s0) => {
                let mut full = vec![f32::NAN; s0.full_len()];
                for (v, sl) in &held {
                    let sl = sl.unwrap();
                    let w = sl.keep.1 - sl.keep.0;
                    for row in 0..sl.rows {
                        full[row * sl.cols + sl.keep.0..row * sl.cols + sl.keep.1].copy_from_slice(&v[row * w..(row + 1) * w]);
                    }
                }
                assert!(full.iter().all(|x| !x.is_nan()), "{name}: the slices tile the tensor");
                out.extend(full);
            }
        }
    }
    out
}

/// Every r on ep = s * E ranks equals the single-rank top-k run on the same weights and batch:
/// loss, aux loss, drops, outputs and every gradient (expert ones rebuilt from the slices).
fn check_sharded(n_experts: usize, model: &str, dp: usize, ep: usize, r: usize) {
    let (t, world, s) = (16, dp * ep, ep / n_experts);
    let out = "L1.moe.out";
    let layers = format!("tokens_per_rank = {t}\nseq_len = 8\nn_layers = 2\n{model}");
    let dist_spec = sharded_spec(n_experts, &layers, dp, ep, &format!("r = {r}"));
    let ref_text = format!(
        "name = \"t\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = {n_experts}\ntokens_per_rank = {}\nseq_len = 8\nn_layers = 2\n{model}\n[run]\nbackend = \"cpu\"\n",
        t * world
    );
    let ref_spec = from_toml_str(&ref_text).expect("reference spec");
    let (dist, a) = step_retaining(&dist_spec, &[out]);
    let (single, b) = step_retaining(&ref_spec, &[out]);
    let what = format!("E={n_experts} dp={dp} ep={ep} r={r} [{}]", model.replace('\n', " "));
    assert!(((a.loss - b.loss) / b.loss).abs() < 1e-5, "{what}: loss {} vs {}", a.loss, b.loss);
    assert!((a.aux_loss - b.aux_loss).abs() < 1e-5, "{what}: aux {} vs {}", a.aux_loss, b.aux_loss);
    assert_eq!((a.dropped, &a.capacity), (b.dropped, &b.capacity), "{what}: same drops and capacities");
    let err = rel_err(&gather(&dist, out), &single.read(0, out).unwrap());
    assert!(err < 1e-5, "{what}: output rel err {err}");
    let rp = &dist.plan().ranks[0];
    for p in &rp.params {
        let gname = format!("{}.grad", rp.buffer(p.value).name);
        let want = single.read(0, &gname).unwrap();
        if p.expert {
            let err = rel_err(&unsliced_expert(&dist, &gname, n_experts, s), &want);
            assert!(err < 1e-5, "{what}: {gname} rel err {err}");
        } else {
            for rank in 0..world {
                let err = rel_err(&dist.read(rank, &gname).unwrap(), &want);
                assert!(err < 1e-5, "{what}: {gname} on rank {rank}: rel err {err}");
            }
        }
    }
}

#[test]
fn every_r_on_twice_the_experts_matches_single_rank_topk() {
    // E = 2 on 4 ranks: s = 2, r in {0, 1, 2}.
    for r in [0, 1, 2] {
        check_sharded(2, "top_k = 1\ncapacity_factor = 1.0", 1, 4, r);
        check_sharded(2, "top_k = 2\ncapacity_factor = 0.5\nrenormalize = true", 1, 4, r);
        check_sharded(2, "top_k = 1\ndropless = true\n[model.backbone]\nn_heads = 2\nd_mlp = 20", 1, 4, r);
    }
}

#[test]
fn every_r_on_four_times_the_experts_matches_single_rank_topk() {
    // E = 2 on 8 ranks: s = 4, r in {0, 1, 2, 4}; and with data-parallel replicas.
    for r in [0, 1, 2, 4] {
        check_sharded(2, "top_k = 1\ncapacity_factor = 1.25", 1, 8, r);
        check_sharded(2, "top_k = 2\ndropless = true", 1, 8, r);
        check_sharded(2, "top_k = 2\ncapacity_factor = -0.75", 1, 8, r);
    }
    check_sharded(2, "top_k = 1\ncapacity_factor = 1.0", 2, 4, 2);
    check_sharded(2, "top_k = 1\ncapacity_factor = 1.0", 2, 4, 0);
}

#[test]
fn the_parameter_layout_is_the_same_for_every_r() {
    let layout = |r: usize| {
        let plan = Plan::build(&sharded_spec(2, "tokens_per_rank = 16\nseq_len = 8\nn_layers = 2\ntop_k = 1", 1, 8, &format!("r = {r}")))
            .expect("plan");
        plan.ranks
            .iter()
            .map(|rp| rp.params.iter().map(|p| (rp.buffer(p.value).name.clone(), rp.buffer(p.value).elems, p.init.clone(), p.slice)).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    };
    let one = layout(1);
    assert!(one[0].iter().any(|(n, e, _, s)| n == "L0.expert.w1" && *e == 16 * 24 / 4 && s.is_some()), "w1 is a quarter of the hidden units");
    for r in [0, 2, 4] {
        assert_eq!(layout(r), one, "r={r} holds exactly r=1's parameter buffers");
    }
}

#[test]
fn r_copies_travel_through_the_all_to_all() {
    // Forward all-to-all bytes grow exactly r-fold (each kept row goes to r ranks and r
    // partial results come back); each rank's gathered weights cover H/r hidden units, and
    // at r = s nothing is gathered.
    let run = |r: usize| {
        let s = sharded_spec(2, "tokens_per_rank = 16\nseq_len = 8\nn_layers = 1\ntop_k = 1\ndropless = true", 1, 8, &format!("r = {r}"));
        let mut rt = runtime(&s, &[], true);
        rt.step(true, Some(0)).expect("step");
        let tr = rt.trace();
        let a2a = tr.ops.iter().filter(|o| o.stage == Stage::AllToAll && o.pass == Pass::Forward).map(|o| o.bytes).sum::<u64>();
        let rp = &rt.plan().ranks[0];
        let wide = rp.buffer_id("L0.expert.w1_wide").map(|id| rp.buffer(id).elems);
        let gathers = rp.ops.iter().filter(|o| o.name.contains("expert_allgather")).count();
        (a2a, wide, gathers)
    };
    let (one, two, four) = (run(1), run(2), run(4));
    assert!(one.0 > 0 && two.0 == 2 * one.0 && four.0 == 4 * one.0, "all-to-all bytes r-fold: {one:?} {two:?} {four:?}");
    assert_eq!((one.1, two.1, four.1), (Some(16 * 24), Some(16 * 12), None), "fc1 over H/r on each rank");
    assert_eq!((one.2, two.2, four.2), (3, 3, 0), "w1, b1, w2 gathered unless r = s");
}

#[test]
fn sharded_rules_name_the_fix() {
    let base = "tokens_per_rank = 16\nseq_len = 8";
    let text = |ep: usize, tutel: &str| {
        format!("name = \"t\"\nvariant = \"tutel\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 2\n{base}\n[layout]\nep = {ep}\n[run]\nbackend = \"cpu\"\n[tutel]\n{tutel}\n")
    };
    let (p, shown) = problems(&text(8, "r = 3"));
    assert!(p.iter().any(|p| p.field == "tutel.r" && p.message.contains("tutel.r=3 does not divide s = W/E = 8/2 = 4")), "{shown}");
    assert!(shown.contains("{0, 1, 2, 4}"), "{shown}");
    let (p, shown) = problems(&text(6, "r = 1").replace("n_experts = 2", "n_experts = 4"));
    assert!(p.iter().any(|p| p.field == "layout.ep" && p.message.contains("not a multiple")), "{shown}");
    assert!(from_toml_str(&text(8, "r = 0")).is_ok(), "r = 0 (data parallel) exists for split experts too");
    let (p, shown) = problems(&text(8, "r = 2\ndegree = 2"));
    assert!(p.iter().any(|p| p.field == "tutel.degree"), "{shown}");
    let (p, shown) = problems(&text(4, "r = 2").replace("d_ffn = 24", "d_ffn = 25"));
    assert!(p.iter().any(|p| p.field == "model.d_ffn"), "{shown}");
    // r > 1 without enough ranks points to the sharded layout.
    let (p, shown) = problems(&text(2, "r = 2"));
    assert!(p.iter().any(|p| p.field == "tutel.r" && p.fix.contains("ep = s * n_experts")), "{shown}");
}

#[test]
fn sharded_training_stays_in_lockstep_with_topk_for_every_r() {
    // Reduce-scattered slice gradients and the all-reduced b2 keep every slice and every b2
    // replica on top-k's trajectory under Adam.
    let model = "tokens_per_rank = 16\nseq_len = 8\nn_layers = 1\ntop_k = 1\ncapacity_factor = 1.0";
    // r = 0, 1, 2 on ep = 4 (s = 2); r = 0, 4 on ep = 8 (s = 4).
    for (r, ep) in [(0, 4), (1, 4), (2, 4), (0, 8), (4, 8)] {
        let s = ep / 2;
        let text = format!(
            "name = \"t\"\nvariant = \"tutel\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 2\n{model}\n[layout]\nep = {ep}\n[run]\nbackend = \"cpu\"\nlr = 0.01\n[tutel]\nr = {r}\n"
        );
        let mut dist = runtime(&from_toml_str(&text).unwrap(), &[], false);
        let reference = format!(
            "name = \"t\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 2\ntokens_per_rank = {}\nseq_len = 8\nn_layers = 1\ntop_k = 1\ncapacity_factor = 1.0\n[run]\nbackend = \"cpu\"\nlr = 0.01\n",
            16 * ep
        );
        let mut single = runtime(&from_toml_str(&reference).unwrap(), &[], false);
        for step in 0..3 {
            let a = dist.step(true, Some(step)).unwrap();
            let b = single.step(true, Some(step)).unwrap();
            assert!(((a.loss - b.loss) / b.loss).abs() < 1e-4, "r={r} step {step}: {} vs {}", a.loss, b.loss);
        }
        for name in ["L0.expert.w1", "L0.expert.b1", "L0.expert.w2", "L0.expert.b2"] {
            let err = rel_err(&unsliced_expert(&dist, name, 2, s), &single.read(0, name).unwrap());
            assert!(err < 1e-4, "r={r}: {name} drifted from top-k's: {err}");
        }
    }
}

#[test]
fn auto_parallelism_with_split_experts_times_every_divisor_of_s() {
    let root = tempfile::tempdir().unwrap();
    let s = sharded_spec(2, "tokens_per_rank = 16\nseq_len = 8\nn_layers = 1\ntop_k = 1", 1, 8, "parallelism = \"auto\"");
    let s = ExperimentSpec { run: moelab::spec::RunSpec { steps: 1, warmup: 0, ..s.run.clone() }, ..s };
    let out = moelab::run::run(&s, root.path(), &Default::default()).expect("run");
    let auto = out.auto_degree.clone().expect("auto resolved");
    let tried: Vec<(usize, usize)> = auto.candidates.iter().map(|c| (c.r, c.degree)).collect();
    assert_eq!(tried, [(1, 1), (2, 1), (4, 1), (0, 1)], "every divisor of s = 4 and r = 0, unpipelined");
    let best = auto.candidates.iter().min_by(|a, b| a.mean_s.total_cmp(&b.mean_s)).unwrap();
    assert_eq!(auto.chosen_r, best.r);
    // Whichever r it chose, the step computes the single-rank top-k loss.
    let reference = "name = \"t\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 2\ntokens_per_rank = 128\nseq_len = 8\nn_layers = 1\ntop_k = 1\n[run]\nbackend = \"cpu\"\n";
    let single = runtime(&from_toml_str(reference).unwrap(), &[], false).step(false, Some(0)).unwrap();
    assert!(((out.steps[0].loss - single.loss) / single.loss).abs() < 1e-5, "{} vs {}", out.steps[0].loss, single.loss);
}

#[test]
fn split_experts_run_on_the_sim_and_are_refused_on_cuda() {
    // The sim times the new layout ops from their bytes and the all-to-alls on the links.
    let text = |backend: &str, r: usize| {
        format!("name = \"t\"\nvariant = \"tutel\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 2\ntokens_per_rank = 16\nseq_len = 8\ntop_k = 1\n[layout]\nep = 8\n[run]\nbackend = \"{backend}\"\n[tutel]\nr = {r}\n")
    };
    for (r, names) in [(2, &["shard_dispatch", "shard_combine", "expert_w1_columns", "dispatch_a2a", "combine_a2a"][..]),
        (0, &["expert_w1_columns", "expert_b2_replica", "expert_b2_replica_bwd", "expert_allreduce_b2"][..])] {
        let plan = Plan::build(&from_toml_str(&text("sim", r)).expect("valid")).expect("plans");
        let mut rt = moelab::backend::runtime(plan, Default::default());
        let report = rt.step(true, Some(0)).expect("simulated step");
        assert!(report.wall_s > 0.0);
        let trace = rt.trace();
        for name in names {
            assert!(trace.ops.iter().any(|o| o.name.ends_with(name) && o.end_ns > o.start_ns), "r={r}: {name} simulated");
        }
    }
    let e = from_toml_str(&text("cuda", 2)).expect_err("cuda refuses split experts");
    assert!(e.problems().iter().any(|p| p.field == "layout.ep" && p.message.contains("cpu and sim backends only")), "{e}");
}

#[test]
fn per_layer_choices_match_single_rank_topk_and_show_in_the_trace() {
    let mixed = "layers = [{ r = 0, degree = 1 }, { r = 1, degree = 2 }]";
    let other = "layers = [{ r = 1, degree = 4 }, { r = 0, degree = 1 }]";
    for (dp, ep) in [(1, 2), (2, 2), (1, 4)] {
        check_against_topk("capacity_factor = 1.0", dp, ep, mixed);
        check_against_topk("dropless = true", dp, ep, other);
    }
    // Layer 0 gathers weights (no all-to-all), layer 1 sends tokens in 2 chunks.
    let s = tutel_spec("tokens_per_rank = 16\nseq_len = 8\nn_layers = 2\ncapacity_factor = 1.0", "ep = 2", mixed, "");
    let plan = Plan::build(&s).unwrap();
    let ops = &plan.ranks[0].ops;
    let count = |l: u32, st: Stage| ops.iter().filter(|o| o.layer == Some(l) && o.stage == st).count();
    assert_eq!((count(0, Stage::AllToAll), count(0, Stage::ReduceScatter) > 0), (0, true));
    assert_eq!((count(1, Stage::AllToAll), count(1, Stage::ReduceScatter)), (8, 0), "2 chunks x (dispatch + combine) x (fwd + bwd)");
    // One parameter layout: the same parameters as a uniform plan.
    let uniform = Plan::build(&tutel_spec("tokens_per_rank = 16\nseq_len = 8\nn_layers = 2\ncapacity_factor = 1.0", "ep = 2", "degree = 1", "")).unwrap();
    let params = |p: &Plan| p.ranks[0].params.iter().map(|q| (p.ranks[0].buffer(q.value).name.clone(), p.ranks[0].buffer(q.value).elems)).collect::<Vec<_>>();
    assert_eq!(params(&plan), params(&uniform));
    // Round trip through TOML keeps the choices.
    assert_eq!(from_toml_str(&s.to_toml()).unwrap(), s);
}

#[test]
fn bad_per_layer_choices_name_the_field() {
    let base = "name = \"t\"\nvariant = \"tutel\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 8\ntokens_per_rank = 16\nn_layers = 2\n[layout]\nep = 2\n[tutel]\n";
    let cases = [
        ("layers = [{ r = 1, degree = 2 }]", "tutel.layers", "n_layers=2"),
        ("layers = [{ r = 2, degree = 1 }, { r = 1, degree = 1 }]", "tutel.layers[0].r", "only 0 and 1"),
        ("layers = [{ r = 0, degree = 2 }, { r = 1, degree = 1 }]", "tutel.layers[0].degree", "no all-to-all to pipeline"),
        ("layers = [{ r = 1, degree = 0 }, { r = 1, degree = 1 }]", "tutel.layers[0].degree", "outside"),
        ("parallelism = \"auto\"\nlayers = [{ r = 1, degree = 1 }, { r = 0, degree = 1 }]", "tutel.layers", "exclude each other"),
    ];
    for (table, field, needle) in cases {
        let (ps, text) = problems(&format!("{base}{table}\n"));
        assert!(ps.iter().any(|p| p.field == field && text.contains(needle)), "{table}: {text}");
    }
}
