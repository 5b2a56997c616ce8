//! DeepSpeed-TED: every `dp x ep x tp` layout, with and without duplicate-token dropping,
//! computes the single-rank top-k run's losses, outputs and gradients on the same global
//! batch; dropping divides the all-to-all bytes by exactly tp; the spec rules hold.

mod common;
use common::*;
use moelab::backend::cpu::CpuRuntime;
use moelab::backend::StepReport;
use moelab::plan::Plan;
use moelab::spec::{from_toml_str, ExperimentSpec};
use moelab::taxonomy::Stage;

const BACKBONE: &str = "[model.backbone]\nn_heads = 2\nd_mlp = 20";

/// A TED spec (`d_model = 16`, `d_ffn = 24`, 4 experts) with extra `[model]` lines.
fn ted_spec(model: &str, dp: usize, ep: usize, tp: usize, dropping: bool, run: &str) -> ExperimentSpec {
    ted_spec_ckpt(model, dp, ep, tp, dropping, "none", run)
}

/// [`ted_spec`] with `[ted] checkpoint = "{checkpoint}"`.
fn ted_spec_ckpt(model: &str, dp: usize, ep: usize, tp: usize, dropping: bool, checkpoint: &str, run: &str) -> ExperimentSpec {
    let text = format!(
        "name = \"t\"\nvariant = \"ted\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 4\n{model}\n[layout]\ndp = {dp}\nep = {ep}\ntp = {tp}\n[run]\nbackend = \"cpu\"\n{run}\n[ted]\nduplicate_dropping = {dropping}\ncheckpoint = \"{checkpoint}\"\n"
    );
    from_toml_str(&text).unwrap_or_else(|e| panic!("test spec invalid: {e}\n{text}"))
}

fn step(s: &ExperimentSpec, retain: &[&str]) -> (CpuRuntime, StepReport) {
    let mut rt = runtime(s, retain, true);
    let r = rt.step(false, Some(0)).expect("step");
    (rt, r)
}

/// Expert tensor of the single-rank run, rebuilt from the TP slices of the ranks of shard
/// group d = 0 (rank = (expert-parallel index) * tp + tp index).
fn global_expert(rt: &CpuRuntime, name: &str, ep: usize, tp: usize, n_experts: usize) -> Vec<f32> {
    let el = n_experts / ep;
    let mut out = Vec::new();
    for p in 0..ep {
        // Per TP rank: (its values, its slice geometry), when it holds the tensor.
        let held: Vec<(Vec<f32>, Option<moelab::plan::ParamSlice>)> = (0..tp)
            .filter_map(|i| {
                let r = p * tp + i;
                let rp = &rt.plan().ranks[r];
                let id = rp.buffer_id(name)?;
                let grad_of = rp.params.iter().find(|q| q.grad == Some(id)).expect("a param grad");
                Some((rt.read(r, name).unwrap(), grad_of.slice))
            })
            .collect();
        assert!(!held.is_empty(), "{name}: no rank of ep index {p} holds it");
        if held[0].1.is_none() {
            assert_eq!(held.len(), 1, "{name}: an unsliced expert tensor lives on one TP rank");
            out.extend_from_slice(&held[0].0);
            continue;
        }
        for l in 0..el {
            let s0 = held[0].1.unwrap();
            let mut full = vec![f32::NAN; s0.rows * s0.cols];
            for (vals, s) in &held {
                let s = s.unwrap();
                let w = s.keep.1 - s.keep.0;
                let mine = &vals[l * s.rows * w..(l + 1) * s.rows * w];
                for r in 0..s.rows {
                    full[r * s.cols + s.keep.0..r * s.cols + s.keep.1].copy_from_slice(&mine[r * w..(r + 1) * w]);
                }
            }
            assert!(full.iter().all(|x| !x.is_nan()), "{name}: the TP slices tile the tensor");
            out.extend(full);
        }
    }
    out
}

/// Loss, aux loss, drops, the MoE output and every gradient match the single-rank top-k run.
fn check(model: &str, dp: usize, ep: usize, tp: usize, dropping: bool) {
    check_ckpt(model, dp, ep, tp, dropping, "none");
}

/// [`check`] with activation checkpointing mode `checkpoint`.
fn check_ckpt(model: &str, dp: usize, ep: usize, tp: usize, dropping: bool, checkpoint: &str) {
    let (t, shards) = (16, dp * ep);
    let out = "L1.moe.out";
    let layers = format!("tokens_per_rank = {t}\nseq_len = 8\nn_layers = 2\n{model}");
    let dist_spec = ted_spec_ckpt(&layers, dp, ep, tp, dropping, checkpoint, "");
    let ref_spec = spec(&format!("tokens_per_rank = {}\nseq_len = 8\nn_layers = 2\n{model}", t * shards), "", "");
    let (dist, a) = step(&dist_spec, &[out]);
    let (single, b) = step(&ref_spec, &[out]);
    let what = format!("dp={dp} ep={ep} tp={tp} dropping={dropping} checkpoint={checkpoint}");
    assert!(((a.loss - b.loss) / b.loss).abs() < 1e-5, "{what}: loss {} vs {}", a.loss, b.loss);
    assert!((a.aux_loss - b.aux_loss).abs() < 1e-5, "{what}: aux {} vs {}", a.aux_loss, b.aux_loss);
    assert_eq!(a.dropped, b.dropped, "{what}: same tokens dropped");
    // Output: shard s lives on ranks s*tp .. s*tp+tp, identical on all of them.
    let got: Vec<f32> = (0..shards).flat_map(|s| dist.read(s * tp, out).unwrap()).collect();
    let err = rel_err(&got, &single.read(0, out).unwrap());
    assert!(err < 1e-5, "{what}: output rel err {err}");
    for r in 0..dp * ep * tp {
        let e = rel_err(&dist.read(r, out).unwrap(), &dist.read(r / tp * tp, out).unwrap());
        assert!(e < 1e-6, "{what}: rank {r}'s output differs from its TP group's ({e})");
    }
    let n_experts = 4;
    for rp in &dist.plan().ranks[0].params {
        let gname = format!("{}.grad", dist.plan().ranks[0].buffer(rp.value).name);
        let want = single.read(0, &gname).unwrap();
        if rp.expert {
            let got = global_expert(&dist, &gname, ep, tp, n_experts);
            let err = rel_err(&got, &want);
            assert!(err < 1e-5, "{what}: {gname} rel err {err}");
        } else {
            // Dense grads: reduced over the distinct shards, equal on every rank.
            for r in 0..dp * ep * tp {
                let err = rel_err(&dist.read(r, &gname).unwrap(), &want);
                assert!(err < 1e-5, "{what}: {gname} on rank {r}: rel err {err}");
            }
        }
    }
}

#[test]
fn tp2_ep2_matches_single_rank_topk_with_and_without_dropping() {
    for dropping in [true, false] {
        check("capacity_factor = 1.0", 1, 2, 2, dropping);
    }
}

#[test]
fn dp2_tp2_matches_single_rank_topk_with_and_without_dropping() {
    for dropping in [true, false] {
        check("capacity_factor = 1.0", 2, 1, 2, dropping);
    }
}

#[test]
fn dp2_ep2_tp2_with_backbone_matches_single_rank_topk() {
    for dropping in [true, false] {
        check(&format!("capacity_factor = 1.25\nrenormalize = true\n{BACKBONE}"), 2, 2, 2, dropping);
    }
}

#[test]
fn tp3_uneven_slices_and_dropless_match_single_rank_topk() {
    // tp = 3 splits blocks of any length unevenly; dropless sizes buffers at run time.
    check("capacity_factor = 0.5", 1, 2, 3, true);
    check("dropless = true", 1, 2, 3, true);
    check("dropless = true", 1, 4, 2, false);
}

#[test]
fn tp1_is_topk() {
    check("capacity_factor = 1.0", 2, 2, 1, true);
}

#[test]
fn training_steps_stay_in_lockstep_with_topk() {
    let dist_spec = ted_spec("tokens_per_rank = 16\nseq_len = 8\nn_layers = 1", 1, 2, 2, true, "lr = 0.01");
    let ref_spec = spec("tokens_per_rank = 32\nseq_len = 8\nn_layers = 1", "", "lr = 0.01");
    let mut dist = runtime(&dist_spec, &[], false);
    let mut single = runtime(&ref_spec, &[], false);
    for s in 0..3 {
        let a = dist.step(true, Some(s)).unwrap();
        let b = single.step(true, Some(s)).unwrap();
        assert!(((a.loss - b.loss) / b.loss).abs() < 1e-4, "step {s}: {} vs {}", a.loss, b.loss);
    }
    for name in ["L0.gate.w", "L0.expert.w1", "L0.expert.w2", "L0.expert.b1", "L0.expert.b2"] {
        let want = single.read(0, name).unwrap();
        let got = if name.contains("expert") { global_expert_values(&dist, name, 2, 2) } else { dist.read(3, name).unwrap() };
        let err = rel_err(&got, &want);
        assert!(err < 1e-4, "{name}: params drifted apart: {err}");
    }
}

/// [`global_expert`] for parameter values (the slice geometry is looked up by value buffer).
fn global_expert_values(rt: &CpuRuntime, name: &str, ep: usize, tp: usize) -> Vec<f32> {
    let el = 4 / ep;
    let mut out = Vec::new();
    for p in 0..ep {
        let held: Vec<(Vec<f32>, Option<moelab::plan::ParamSlice>)> = (0..tp)
            .filter_map(|i| {
                let r = p * tp + i;
                let rp = &rt.plan().ranks[r];
                let id = rp.buffer_id(name)?;
                let q = rp.params.iter().find(|q| q.value == id).expect("a param");
                Some((rt.read(r, name).unwrap(), q.slice))
            })
            .collect();
        match held[0].1 {
            None => out.extend_from_slice(&held[0].0),
            Some(s0) => {
                for l in 0..el {
                    let mut full = vec![0.0; s0.rows * s0.cols];
                    for (vals, s) in &held {
                        let s = s.unwrap();
                        let w = s.keep.1 - s.keep.0;
                        for r in 0..s.rows {
                            full[r * s.cols + s.keep.0..r * s.cols + s.keep.1]
                                .copy_from_slice(&vals[(l * s.rows + r) * w..(l * s.rows + r + 1) * w]);
                        }
                    }
                    out.extend(full);
                }
            }
        }
    }
    out
}

/// Total bytes the measured step's all-to-alls sent, over all ranks.
fn a2a_bytes(s: &ExperimentSpec) -> u64 {
    let mut rt = runtime(s, &[], true);
    rt.step(true, Some(0)).expect("step");
    rt.trace().ops.iter().filter(|o| o.stage == Stage::AllToAll).map(|o| o.bytes).sum()
}

#[test]
fn duplicate_dropping_divides_all_to_all_bytes_by_tp() {
    for (dp, ep, tp, model) in [(1, 2, 2, "capacity_factor = 1.0"), (2, 2, 2, "capacity_factor = 1.25"), (1, 2, 3, "dropless = true")] {
        let model = format!("tokens_per_rank = 16\nseq_len = 8\nn_layers = 2\n{model}");
        let on = a2a_bytes(&ted_spec(&model, dp, ep, tp, true, "seed = 7"));
        let off = a2a_bytes(&ted_spec(&model, dp, ep, tp, false, "seed = 7"));
        assert!(on > 0, "dropping still communicates");
        assert_eq!(on * tp as u64, off, "dp={dp} ep={ep} tp={tp}: all-to-all bytes {on} with dropping, {off} without");
        // The plan's bytes (what the sim prices) shrink the same way, up to rounding per op.
        let planned = |dropping: bool| {
            let plan = Plan::build(&ted_spec(&model, dp, ep, tp, dropping, "seed = 7")).expect("plans");
            let ops: Vec<u64> = plan.ranks.iter().flat_map(|r| &r.ops).filter(|o| o.stage == Stage::AllToAll).map(|o| o.bytes).collect();
            (ops.iter().sum::<u64>(), ops.len() as u64)
        };
        let ((on, n), (off, _)) = (planned(true), planned(false));
        assert!((on * tp as u64).abs_diff(off) <= n * tp as u64, "dp={dp} ep={ep} tp={tp}: planned all-to-all bytes {on} with dropping, {off} without");
    }
}

#[test]
fn the_tp_all_gathers_plan_the_part_each_rank_holds() {
    // With dropping, each TP rank all-gathers the 1/tp part it received (or returns): an
    // all-gather's bytes are one member's piece, so the plan counts 1/tp of the full set, as
    // the cpu backend measures it: 2/3 of it here, the received parts being planned at the
    // capacity blocks' size (capacity factor 2: half filled), the returned ones whole; tp
    // times less when the plan counted the full set.
    for (ep, tp) in [(2, 2), (2, 3)] {
        let s = ted_spec("tokens_per_rank = 16\nseq_len = 8\nn_layers = 2\ncapacity_factor = 2.0", 1, ep, tp, true, "seed = 7");
        let mut rt = runtime(&s, &[], true);
        rt.step(true, Some(0)).expect("step");
        let measured: u64 = rt.trace().ops.iter().filter(|o| o.stage == Stage::AllGather).map(|o| o.bytes).sum();
        let plan = Plan::build(&s).expect("plans");
        let planned: u64 = plan.ranks.iter().flat_map(|r| &r.ops).filter(|o| o.stage == Stage::AllGather).map(|o| o.bytes).sum();
        let ratio = measured as f64 / planned as f64;
        assert!(measured > 0 && ratio > 0.6 && ratio <= 1.0 + 1e-9, "ep={ep} tp={tp}: all-gathers measured {measured} bytes, planned {planned}");
    }
}

fn problems(text: &str) -> Vec<(String, String)> {
    match from_toml_str(text) {
        Ok(_) => panic!("spec should be rejected:\n{text}"),
        Err(e) => e.problems().iter().map(|p| (p.field.clone(), format!("{} {}", p.message, p.fix))).collect(),
    }
}

const BASE: &str = "name = \"t\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 4\ntokens_per_rank = 16\n";

#[test]
fn validation_rejects_bad_ted_specs() {
    // tp must divide d_ffn.
    let p = problems(&format!("variant = \"ted\"\n{BASE}[layout]\ntp = 5\n"));
    assert!(p.iter().any(|(f, m)| f == "layout.tp" && m.contains("d_ffn=24")), "{p:?}");
    // [ted] belongs to variant ted.
    let p = problems(&format!("{BASE}[ted]\nduplicate_dropping = false\n"));
    assert!(p.iter().any(|(f, m)| f == "ted" && m.contains("variant = \"ted\"")), "{p:?}");
    // tp > 1 with topk points to ted.
    let p = problems(&format!("{BASE}[layout]\ntp = 2\n"));
    assert!(p.iter().any(|(f, m)| f == "layout.tp" && m.contains("\"ted\"")), "{p:?}");
    // pp is not supported.
    let p = problems(&format!("variant = \"ted\"\n{BASE}[layout]\ntp = 2\npp = 2\n"));
    assert!(p.iter().any(|(f, _)| f == "layout.pp"), "{p:?}");
}

#[test]
fn ted_table_defaults_to_dropping() {
    let s = from_toml_str(&format!("variant = \"ted\"\n{BASE}[layout]\ntp = 2\nep = 2\n")).expect("valid");
    assert_eq!(s.ted.map(|t| t.duplicate_dropping), Some(true));
    assert_eq!(s.world(), 4);
    let again = from_toml_str(&s.to_toml()).expect("round trip");
    assert_eq!(again, s);
}

#[test]
fn tracked_peak_stays_within_the_planned_bound() {
    use moelab::plan::memory::predict;
    for dropping in [true, false] {
        let s = ted_spec(&format!("tokens_per_rank = 32\nseq_len = 8\nn_layers = 2\n{BACKBONE}"), 1, 2, 2, dropping, "");
        let mut rt = runtime(&s, &[], false);
        for i in 0..2 {
            rt.step(i > 0, None).expect("step");
        }
        for (rank, (p, (peak, at_peak))) in rt.plan().ranks.iter().map(predict).zip(rt.tracked_peaks()).enumerate() {
            if p.upper_bound {
                assert!(peak <= p.peak_total && peak > 0, "rank {rank}: tracked {peak} over the bound {}", p.peak_total);
            } else {
                assert_eq!((peak, at_peak), (p.peak_total, p.at_peak), "rank {rank}: tracked peak vs plan");
            }
        }
    }
}

#[test]
fn groups_follow_deepspeed_layout() {
    use moelab::plan::builders::TensorExpertDataGroups;
    // dp 2 x ep 2 x tp 2: rank = (d * ep + p) * tp + i.
    let g = TensorExpertDataGroups::new(2, 2, 2);
    let ranks = |rank: usize, f: fn(&TensorExpertDataGroups, usize) -> moelab::plan::GroupId| g.ranks(f(&g, rank)).to_vec();
    assert_eq!(ranks(5, TensorExpertDataGroups::tp_group), [4, 5], "TP groups are consecutive ranks");
    assert_eq!(ranks(5, TensorExpertDataGroups::data_group), [1, 3, 5, 7], "data parallel is strided by tp");
    assert_eq!(ranks(5, TensorExpertDataGroups::ep_group), [5, 7], "EP groups are cut from the data-parallel ranks");
    assert_eq!(ranks(5, TensorExpertDataGroups::edp_group), [1, 5], "same expert slices: same tp and ep index");
    assert_eq!((g.shards(), g.shard(5), g.tp_index(5)), (4, 2, 1));
    assert_eq!(g.ranks(g.world()).len(), 8);
    // The plan carries exactly these groups.
    let s = ted_spec("tokens_per_rank = 16\nseq_len = 8", 2, 2, 2, true, "");
    let plan = moelab::plan::Plan::build(&s).unwrap();
    assert_eq!(plan.groups, g.groups);
}

const MODES: [&str; 2] = ["full", "comm_aware"];

#[test]
fn checkpointing_matches_single_rank_topk_in_every_mode() {
    for mode in MODES {
        for dropping in [true, false] {
            check_ckpt("capacity_factor = 1.0", 1, 2, 2, dropping, mode);
            check_ckpt(&format!("capacity_factor = 1.25\nrenormalize = true\n{BACKBONE}"), 2, 2, 2, dropping, mode);
        }
        check_ckpt("dropless = true", 1, 2, 3, true, mode);
        check_ckpt("capacity_factor = 1.0", 2, 2, 1, true, mode);
    }
}

/// Every gradient of every rank after one step (no optimizer), by param name.
fn all_grads(rt: &CpuRuntime) -> Vec<(usize, String, Vec<f32>)> {
    let mut out = Vec::new();
    for (r, rp) in rt.plan().ranks.iter().enumerate() {
        for p in &rp.params {
            let g = format!("{}.grad", rp.buffer(p.value).name);
            out.push((r, g.clone(), rt.read(r, &g).unwrap()));
        }
    }
    out
}

#[test]
fn checkpointing_leaves_loss_and_every_gradient_unchanged() {
    let model = format!("tokens_per_rank = 16\nseq_len = 8\nn_layers = 3\ncapacity_factor = 1.0\n{BACKBONE}");
    for dropping in [true, false] {
        let (base_rt, base) = step(&ted_spec_ckpt(&model, 1, 2, 2, dropping, "none", "seed = 3"), &[]);
        let want = all_grads(&base_rt);
        for mode in MODES {
            let (rt, r) = step(&ted_spec_ckpt(&model, 1, 2, 2, dropping, mode, "seed = 3"), &[]);
            assert!(((r.loss - base.loss) / base.loss).abs() < 1e-6, "{mode}: loss {} vs {}", r.loss, base.loss);
            assert!((r.aux_loss - base.aux_loss).abs() < 1e-7, "{mode}: aux loss {} vs {}", r.aux_loss, base.aux_loss);
            assert_eq!(r.dropped, base.dropped, "{mode}: recomputed routing is not counted twice");
            for ((rank, name, g), (_, _, w)) in all_grads(&rt).iter().zip(&want) {
                let err = rel_err(g, w);
                assert!(err < 1e-5, "{mode} dropping={dropping}: {name} on rank {rank}: rel err {err}");
            }
        }
    }
}

/// Over all ranks of one measured training step: (backward all-to-all bytes, backward
/// all-gather bytes, backward expert fc1 ops).
fn backward_comm(s: &ExperimentSpec) -> (u64, u64, usize) {
    use moelab::taxonomy::Pass;
    let mut rt = runtime(s, &[], true);
    rt.step(true, Some(0)).expect("step");
    let trace = rt.trace();
    let bwd = || trace.ops.iter().filter(|o| o.pass == Pass::Backward);
    let bytes = |stage| bwd().filter(|o| o.stage == stage).map(|o| o.bytes).sum::<u64>();
    (bytes(Stage::AllToAll), bytes(Stage::AllGather), bwd().filter(|o| o.stage == Stage::ExpertGemm1).count())
}

#[test]
fn full_checkpointing_repeats_the_communication_and_comm_aware_does_not() {
    for (dp, ep, tp, dropping, model) in [(1, 2, 2, true, "capacity_factor = 1.0"), (2, 2, 2, false, "capacity_factor = 1.25"),
        (1, 2, 3, true, "dropless = true")] {
        let model = format!("tokens_per_rank = 16\nseq_len = 8\nn_layers = 2\n{model}");
        let run = |mode| backward_comm(&ted_spec_ckpt(&model, dp, ep, tp, dropping, mode, "seed = 7"));
        let (none, full, aware) = (run("none"), run("full"), run("comm_aware"));
        let what = format!("dp={dp} ep={ep} tp={tp} dropping={dropping}");
        assert!(none.0 > 0, "{what}: backward has all-to-alls");
        // Full recomputation re-runs both forward all-to-alls: the backward's bytes double.
        assert_eq!(full.0, 2 * none.0, "{what}: full {full:?} vs none {none:?}");
        assert!(full.1 > none.1, "{what}: full re-runs the all-gathers: {full:?} vs {none:?}");
        assert_eq!((aware.0, aware.1), (none.0, none.1), "{what}: comm_aware adds no communication");
        // Both recompute fc1 (one extra expert_gemm1 per layer and rank).
        assert!(full.2 > none.2 && aware.2 > none.2, "{what}: recomputed fc1: {none:?} {full:?} {aware:?}");
    }
}

#[test]
fn checkpointing_lowers_the_predicted_and_tracked_activation_peak() {
    use moelab::analysis::analyze;
    use moelab::plan::memory::predict;
    use moelab::taxonomy::MemCategory;
    let act = MemCategory::Activations.index();
    for dropping in [true, false] {
        let model = format!("tokens_per_rank = 32\nseq_len = 8\nn_layers = 4\n{BACKBONE}");
        let peaks = |mode| {
            let s = ted_spec_ckpt(&model, 1, 2, 2, dropping, mode, "");
            let mut rt = runtime(&s, &[], false);
            rt.step(true, None).expect("step");
            let predicted: Vec<u64> = rt.plan().ranks.iter().map(|rp| predict(rp).max_per_category[act]).collect();
            let tracked: Vec<u64> = analyze(&rt.trace()).memory.ranks.iter().map(|r| r.max_per_category[act]).collect();
            (predicted, tracked)
        };
        let none = peaks("none");
        let full = peaks("full");
        let aware = peaks("comm_aware");
        for r in 0..4 {
            for (mode, got) in [("full", &full), ("comm_aware", &aware)] {
                assert!(got.0[r] < none.0[r], "dropping={dropping} rank {r} {mode}: predicted {} vs none {}", got.0[r], none.0[r]);
                assert!(got.1[r] < none.1[r], "dropping={dropping} rank {r} {mode}: tracked {} vs none {}", got.1[r], none.1[r]);
            }
            // Full keeps less than comm_aware (which also keeps the communication outputs).
            assert!(full.0[r] <= aware.0[r], "rank {r}: full {} vs comm_aware {}", full.0[r], aware.0[r]);
        }
    }
}

#[test]
fn checkpointed_tracked_peak_stays_within_the_planned_bound() {
    use moelab::plan::memory::predict;
    for mode in MODES {
        let s = ted_spec_ckpt(&format!("tokens_per_rank = 32\nseq_len = 8\nn_layers = 2\n{BACKBONE}"), 1, 2, 2, true, mode, "");
        let mut rt = runtime(&s, &[], false);
        for i in 0..2 {
            rt.step(i > 0, None).expect("step");
        }
        for (rank, (p, (peak, _))) in rt.plan().ranks.iter().map(predict).zip(rt.tracked_peaks()).enumerate() {
            assert!(peak <= p.peak_total && peak > 0, "{mode} rank {rank}: tracked {peak} over the bound {}", p.peak_total);
        }
    }
}

#[test]
fn validation_names_a_bad_checkpoint_mode() {
    let text = format!("variant = \"ted\"\n{BASE}[layout]\ntp = 2\nep = 2\n[ted]\ncheckpoint = \"partial\"\n");
    let err = from_toml_str(&text).expect_err("unknown checkpoint mode").to_string();
    assert!(err.contains("checkpoint") && err.contains("comm_aware"), "{err}");
    let s = from_toml_str(&format!("variant = \"ted\"\n{BASE}[layout]\ntp = 2\nep = 2\n[ted]\ncheckpoint = \"comm_aware\"\n")).expect("valid");
    assert_eq!(s.ted.map(|t| t.checkpoint), Some(moelab::spec::Checkpoint::CommAware));
    assert_eq!(from_toml_str(&s.to_toml()).expect("round trip"), s);
}
