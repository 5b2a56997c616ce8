//! PPMoE: experts spread over the tensor-parallel group with index slicing and one
//! all-reduce per layer (and a tensor-parallel backbone) compute the single-rank top-k run's
//! losses, outputs and gradients on the same global batch, with no all-to-all; the spec rules
//! hold. Pipeline stages: tests/pipeline.rs.

mod common;
use common::*;
use moelab::backend::cpu::CpuRuntime;
use moelab::backend::StepReport;
use moelab::spec::{from_toml_str, ExperimentSpec};
use moelab::taxonomy::{Pass, Stage};

const BACKBONE: &str = "[model.backbone]\nn_heads = 2\nd_mlp = 20";

/// A PPMoE spec (`d_model = 16`, `d_ffn = 24`, 4 experts) with extra `[model]` lines.
fn pp_spec(model: &str, dp: usize, tp: usize, run: &str) -> ExperimentSpec {
    let text = format!(
        "name = \"t\"\nvariant = \"ppmoe\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 4\n{model}\n[layout]\ndp = {dp}\ntp = {tp}\n[run]\nbackend = \"cpu\"\n{run}\n"
    );
    from_toml_str(&text).unwrap_or_else(|e| panic!("test spec invalid: {e}\n{text}"))
}

fn step(s: &ExperimentSpec, retain: &[&str]) -> (CpuRuntime, StepReport) {
    let mut rt = runtime(s, retain, true);
    let r = rt.step(true, Some(0)).expect("step");
    (rt, r)
}

fn check(model: &str, dp: usize, tp: usize) {
    let t = 16;
    let out = "L1.moe.out";
    let layers = format!("tokens_per_rank = {t}\nseq_len = 8\nn_layers = 2\n{model}");
    let (dist, a) = step(&pp_spec(&layers, dp, tp, ""), &[out]);
    let ref_spec = spec(&format!("tokens_per_rank = {}\nseq_len = 8\nn_layers = 2\n{model}", t * dp), "", "");
    let (single, b) = step(&ref_spec, &[out]);
    let what = format!("dp={dp} tp={tp}");
    assert!(((a.loss - b.loss) / b.loss).abs() < 1e-5, "{what}: loss {} vs {}", a.loss, b.loss);
    assert!((a.aux_loss - b.aux_loss).abs() < 1e-5, "{what}: aux {} vs {}", a.aux_loss, b.aux_loss);
    assert_eq!(a.dropped, b.dropped, "{what}: same tokens dropped");
    let got: Vec<f32> = (0..dp).flat_map(|s| dist.read(s * tp, out).unwrap()).collect();
    let err = rel_err(&got, &single.read(0, out).unwrap());
    assert!(err < 1e-5, "{what}: output rel err {err}");
    for r in 0..dp * tp {
        let e = rel_err(&dist.read(r, out).unwrap(), &dist.read(r / tp * tp, out).unwrap());
        assert!(e < 1e-6, "{what}: rank {r}'s output differs from its TP group's ({e})");
    }
    for rp in &dist.plan().ranks[0].params {
        let pname = dist.plan().ranks[0].buffer(rp.value).name.clone();
        let want = single.read(0, &format!("{pname}.grad")).unwrap();
        // Each TP group holds the whole model: experts and backbone slices split over it.
        for s in 0..dp {
            let group: Vec<usize> = (s * tp..(s + 1) * tp).collect();
            let err = rel_err(&assemble_grad(&dist, &group, &pname), &want);
            assert!(err < 1e-5, "{what}: {pname}.grad on shard {s}: rel err {err}");
        }
    }
    // No all-to-all; one all-reduce of the output per MoE layer forward on every rank.
    let trace = dist.trace();
    assert!(trace.ops.iter().all(|o| o.stage != Stage::AllToAll), "{what}: ppmoe has no all-to-all");
    if tp > 1 {
        let fwd: Vec<&str> = trace.ops.iter().filter(|o| o.rank == 0 && o.stage == Stage::AllReduce && o.pass == Pass::Forward)
            .map(|o| o.name.as_str()).collect();
        let moe = fwd.iter().filter(|n| n.ends_with("moe_allreduce")).count();
        assert_eq!(moe, 2, "{what}: one forward all-reduce per MoE layer: {fwd:?}");
        // Plus one per tensor-parallel backbone sublayer (the row-parallel projection's).
        let backbone = usize::from(model.contains("n_heads")) + usize::from(model.contains("d_mlp"));
        assert_eq!(fwd.len(), 2 * (1 + backbone), "{what}: forward all-reduces {fwd:?}");
    }
}

#[test]
fn tp2_matches_single_rank_topk() {
    check("capacity_factor = 1.0", 1, 2);
}

#[test]
fn tp4_dropless_and_tight_capacity_match_single_rank_topk() {
    check("dropless = true", 1, 4);
    check("capacity_factor = 0.5", 1, 4);
}

#[test]
fn dp2_tp2_with_backbone_matches_single_rank_topk() {
    check(&format!("capacity_factor = 1.25\nrenormalize = true\n{BACKBONE}"), 2, 2);
}

#[test]
fn training_steps_stay_in_lockstep_with_topk() {
    let dist_spec = pp_spec("tokens_per_rank = 16\nseq_len = 8\nn_layers = 1", 2, 2, "lr = 0.01");
    let ref_spec = spec("tokens_per_rank = 32\nseq_len = 8\nn_layers = 1", "", "lr = 0.01");
    let mut dist = runtime(&dist_spec, &[], false);
    let mut single = runtime(&ref_spec, &[], false);
    for s in 0..3 {
        let a = dist.step(true, Some(s)).unwrap();
        let b = single.step(true, Some(s)).unwrap();
        assert!(((a.loss - b.loss) / b.loss).abs() < 1e-4, "step {s}: {} vs {}", a.loss, b.loss);
    }
    let err = rel_err(&dist.read(3, "L0.gate.w").unwrap(), &single.read(0, "L0.gate.w").unwrap());
    assert!(err < 1e-4, "gate drifted apart: {err}");
    let w1: Vec<f32> = (2..4).flat_map(|r| dist.read(r, "L0.expert.w1").unwrap()).collect();
    let err = rel_err(&w1, &single.read(0, "L0.expert.w1").unwrap());
    assert!(err < 1e-4, "experts drifted apart: {err}");
}

#[test]
fn validation_rejects_bad_ppmoe_layouts() {
    let base = "name = \"t\"\nvariant = \"ppmoe\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 4\ntokens_per_rank = 16\n";
    let fields = |text: String| -> Vec<String> {
        match from_toml_str(&text) {
            Ok(_) => panic!("should be rejected:\n{text}"),
            Err(e) => e.problems().iter().map(|p| p.field.clone()).collect(),
        }
    };
    assert!(fields(format!("{base}[layout]\nep = 2\ntp = 2\n")).contains(&"layout.ep".to_string()));
    assert!(fields(format!("{base}[layout]\ntp = 3\n")).contains(&"layout.tp".to_string()));
    // Two stages cannot split the one block (n_layers defaults to 1).
    assert!(fields(format!("{base}[layout]\ntp = 2\npp = 2\n")).contains(&"layout.pp".to_string()));
}

