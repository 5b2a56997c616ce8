//! PPMoE pipeline stages: with `layout.pp` stages, micro-batches and the GPipe or 1F1B
//! schedule, the loss, the model's outputs and every gradient of every rank equal the
//! single-rank top-k run on the same weights and batch; the trace shows the exchanges, the
//! bubble and 1F1B's lower activation peak.
//!
//! Every micro-batch is routed on its own (as GPipe does), so with a capacity factor its
//! drops would differ from the full-batch reference, and so would the load-balancing loss
//! (a mean over micro-batches is not the full batch's): the equivalence tests route dropless
//! with `aux_loss_coef = 0`.

mod common;
use common::*;
use moelab::backend::cpu::CpuRuntime;
use moelab::backend::StepReport;
use moelab::plan::Plan;
use moelab::spec::{from_toml_str, ExperimentSpec};
use moelab::taxonomy::{Pass, Stage, Stream};

const MODEL: &str = "tokens_per_rank = 32\nseq_len = 8\nn_layers = 2\ndropless = true\naux_loss_coef = 0.0\n";
const BACKBONE: &str = "[model.backbone]\nn_heads = 2\nd_mlp = 20\n";

/// A PPMoE spec (`d_model = 16`, `d_ffn = 24`, 4 experts, 4 sequences of 8 tokens per shard).
fn pp_spec(dp: usize, tp: usize, pp: usize, ppmoe: &str, extra_model: &str) -> ExperimentSpec {
    let text = format!(
        "name = \"t\"\nvariant = \"ppmoe\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 4\n{MODEL}{extra_model}{BACKBONE}[layout]\ndp = {dp}\ntp = {tp}\npp = {pp}\n[ppmoe]\n{ppmoe}\n[run]\nbackend = \"cpu\"\n"
    );
    from_toml_str(&text).unwrap_or_else(|e| panic!("test spec invalid: {e}\n{text}"))
}

fn reference(dp: usize) -> (CpuRuntime, StepReport) {
    let text = format!(
        "name = \"t\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 4\ntokens_per_rank = {}\nseq_len = 8\nn_layers = 2\ndropless = true\naux_loss_coef = 0.0\n{BACKBONE}[run]\nbackend = \"cpu\"\n",
        32 * dp
    );
    let s = from_toml_str(&text).unwrap();
    let mut rt = runtime(&s, &["L1.moe.out"], true);
    let r = rt.step(true, Some(0)).expect("reference step");
    (rt, r)
}

/// Runs the pipeline and checks it against the single-rank reference.
fn check(dp: usize, tp: usize, pp: usize, micro: usize, schedule: &str) -> (CpuRuntime, StepReport) {
    let what = format!("dp={dp} tp={tp} pp={pp} micro={micro} {schedule}");
    let s = pp_spec(dp, tp, pp, &format!("micro_batches = {micro}\nschedule = \"{schedule}\""), "");
    let prefix = |j: usize| if micro > 1 { format!("mb{j}.") } else { String::new() };
    let outs: Vec<String> = (0..micro).map(|j| format!("{}L1.moe.out", prefix(j))).collect();
    let retain: Vec<&str> = outs.iter().map(String::as_str).collect();
    let mut dist = runtime(&s, &retain, true);
    let a = dist.step(true, Some(0)).expect("pipeline step");
    let (single, b) = reference(dp);
    assert!(((a.loss - b.loss) / b.loss).abs() < 1e-5, "{what}: loss {} vs {}", a.loss, b.loss);
    assert_eq!(a.dropped, 0, "{what}: dropless");
    assert_eq!(a.routed, b.routed, "{what}: every assignment routed");
    // The output of the last block lives on the last stage: shards in order, micro-batches within.
    let per_stage = dp * tp;
    let last = (pp - 1) * per_stage;
    let mut got: Vec<f32> = Vec::new();
    for s in 0..dp {
        for o in &outs {
            got.extend(dist.read(last + s * tp, o).unwrap_or_else(|| panic!("{o} on rank {}", last + s * tp)));
        }
    }
    let err = rel_err(&got, &single.read(0, "L1.moe.out").unwrap());
    assert!(err < 1e-5, "{what}: output rel err {err}");
    // Every parameter of the reference, from the stage that holds it, on every shard's TP group.
    let mut checked = 0;
    for p in &single.plan().ranks[0].params {
        let pname = single.plan().ranks[0].buffer(p.value).name.clone();
        let want = single.read(0, &format!("{pname}.grad")).unwrap();
        let stage = (0..pp)
            .find(|st| dist.plan().ranks[st * per_stage].params.iter().any(|q| dist.plan().ranks[st * per_stage].buffer(q.value).name == pname))
            .unwrap_or_else(|| panic!("{what}: no stage holds {pname}"));
        for s in 0..dp {
            let group: Vec<usize> = (0..tp).map(|i| stage * per_stage + s * tp + i).collect();
            let err = rel_err(&assemble_grad(&dist, &group, &pname), &want);
            assert!(err < 1e-5, "{what}: {pname}.grad on stage {stage} shard {s}: rel err {err}");
            checked += 1;
        }
    }
    assert!(checked >= 2 * 14 * dp, "{what}: only {checked} gradients checked");
    (dist, a)
}

#[test]
fn tp2_backbone_matches_single_rank() {
    check(1, 2, 1, 1, "1f1b");
}

#[test]
fn pp2_gpipe_matches_single_rank() {
    check(1, 1, 2, 4, "gpipe");
}

#[test]
fn pp2_1f1b_matches_single_rank() {
    check(1, 1, 2, 4, "1f1b");
}

#[test]
fn pp2_tp2_matches_single_rank() {
    let (rt, _) = check(1, 2, 2, 2, "1f1b");
    let plan = rt.plan();
    // No all-to-all; per stage, per micro-batch: one all-reduce per MoE layer plus one per
    // backbone sublayer forward, and the mirrored ones of the input gradients backward.
    assert!(plan.ranks.iter().flat_map(|r| &r.ops).all(|o| o.stage != Stage::AllToAll));
    let fwd: Vec<&str> = plan.ranks[0].ops.iter().filter(|o| o.stage == Stage::AllReduce && o.pass == Pass::Forward).map(|o| o.name.as_str()).collect();
    assert_eq!(fwd.iter().filter(|n| n.ends_with("moe_allreduce")).count(), 2, "one per MoE layer and micro-batch: {fwd:?}");
    assert_eq!(fwd.len(), 2 * 3, "plus attention's and the MLP's: {fwd:?}");
    let bwd = plan.ranks[0].ops.iter().filter(|o| o.stage == Stage::AllReduce && o.pass == Pass::Backward).count();
    // dweights + dx of the MoE layer, the attention's and the MLP's input gradients.
    assert_eq!(bwd, 2 * 4);
}

#[test]
fn pp2_dp2_matches_single_rank() {
    check(2, 1, 2, 2, "gpipe");
    check(2, 1, 2, 4, "1f1b");
}

#[test]
fn three_stages_and_training_steps_stay_in_lockstep() {
    // pp = 3 over 3 layers, 1F1B with 3 micro-batches, several Adam steps.
    let text = "name = \"t\"\nvariant = \"ppmoe\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 4\ntokens_per_rank = 24\nseq_len = 8\nn_layers = 3\ndropless = true\naux_loss_coef = 0.0\n[layout]\npp = 3\n[ppmoe]\nmicro_batches = 3\n[run]\nbackend = \"cpu\"\nlr = 0.01\n";
    let reft = "name = \"t\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 4\ntokens_per_rank = 24\nseq_len = 8\nn_layers = 3\ndropless = true\naux_loss_coef = 0.0\n[run]\nbackend = \"cpu\"\nlr = 0.01\n";
    let mut dist = runtime(&from_toml_str(text).unwrap(), &[], false);
    let mut single = runtime(&from_toml_str(reft).unwrap(), &[], false);
    for s in 0..3 {
        let a = dist.step(true, Some(s)).unwrap();
        let b = single.step(true, Some(s)).unwrap();
        assert!(((a.loss - b.loss) / b.loss).abs() < 1e-4, "step {s}: {} vs {}", a.loss, b.loss);
    }
    for (rank, name) in [(0, "L0.gate.w"), (1, "L1.expert.w1"), (2, "L2.ln_moe.gamma")] {
        let err = rel_err(&dist.read(rank, name).unwrap(), &single.read(0, name).unwrap());
        assert!(err < 1e-4, "{name} drifted apart: {err}");
    }
}
