//! Every distributed layout of the top-k plan computes the same outputs, losses and
//! gradients as the single-rank run over the same global batch, weights and seed; so do
//! pure data parallelism (experts replicated) for every variant and four-way expert
//! parallelism for MPMoE and DGMoE.

mod common;
use common::*;

const BACKBONE: &str = "[model.backbone]\nn_heads = 2\nd_mlp = 20";

fn check_layout(model: &str, dp: usize, ep: usize, tokens_per_rank: usize) {
    let world = dp * ep;
    let layout = format!("dp = {dp}\nep = {ep}");
    let dist_spec = spec(&format!("tokens_per_rank = {tokens_per_rank}\nseq_len = 8\nn_layers = 2\n{model}"), &layout, "");
    let ref_spec = spec(&format!("tokens_per_rank = {}\nseq_len = 8\nn_layers = 2\n{model}", tokens_per_rank * world), "", "");
    let (dist, a) = step_retaining(&dist_spec, &["L1.moe.out"]);
    let (single, b) = step_retaining(&ref_spec, &["L1.moe.out"]);
    let what = format!("dp={dp} ep={ep}");
    assert_matches_single_rank(&dist, &a, &single, &b, &["L1.moe.out"], ep, &what);
    // Dense grads are all-reduced: identical on every rank.
    for rp in &dist.plan().ranks[0].params {
        if !rp.expert {
            let gname = format!("{}.grad", dist.plan().ranks[0].buffer(rp.value).name);
            let got = dist.read(0, &gname).unwrap();
            for r in 1..world {
                assert_eq!(dist.read(r, &gname).unwrap(), got, "{gname} differs on rank {r}");
            }
        }
    }
}

#[test]
fn ep4_matches_single_rank() {
    check_layout("capacity_factor = 1.0", 1, 4, 16);
}

#[test]
fn dp2_ep2_matches_single_rank() {
    check_layout("capacity_factor = 1.0", 2, 2, 16);
}

#[test]
fn ep2_with_backbone_matches_single_rank() {
    check_layout(&format!("capacity_factor = 1.25\nrenormalize = true\n{BACKBONE}"), 1, 2, 16);
}

#[test]
fn dropless_ep4_matches_single_rank() {
    check_layout("dropless = true", 1, 4, 16);
}

#[test]
fn tight_capacity_drops_the_same_tokens_everywhere() {
    check_layout("capacity_factor = 0.5", 2, 2, 16);
}

#[test]
fn training_steps_stay_in_lockstep() {
    let dist_spec = spec("tokens_per_rank = 16\nseq_len = 8\nn_layers = 1", "ep = 2", "lr = 0.01");
    let ref_spec = spec("tokens_per_rank = 32\nseq_len = 8\nn_layers = 1", "", "lr = 0.01");
    let mut dist = runtime(&dist_spec, &[], false);
    let mut single = runtime(&ref_spec, &[], false);
    for s in 0..3 {
        let a = dist.step(true, Some(s)).unwrap();
        let b = single.step(true, Some(s)).unwrap();
        assert!(((a.loss - b.loss) / b.loss).abs() < 1e-4, "step {s}: {} vs {}", a.loss, b.loss);
    }
    let want = single.read(0, "L0.gate.w").unwrap();
    let err = rel_err(&dist.read(1, "L0.gate.w").unwrap(), &want);
    assert!(err < 1e-4, "params drifted apart: {err}");
}

/// `variant` (with its options table `table`) at `dp` x `ep` against the same variant on one
/// rank over the whole batch: loss, aux loss, drops and every gradient.
fn check_variant(variant: &str, table: &str, model: &str, dp: usize, ep: usize) {
    let world = dp * ep;
    let text = |tokens: usize, layout: &str| {
        format!("name = \"t\"\nvariant = \"{variant}\"\n[model]\nd_model = 16\nd_ffn = 24\nn_experts = 4\ntokens_per_rank = {tokens}\nseq_len = 8\nn_layers = 2\n{model}\n{BACKBONE}\n[layout]\n{layout}\n[run]\nbackend = \"cpu\"\n{table}")
    };
    let load = |t: String| moelab::spec::from_toml_str(&t).unwrap_or_else(|e| panic!("{e}\n{t}"));
    let (dist, a) = step_retaining(&load(text(16, &format!("dp = {dp}\nep = {ep}"))), &[]);
    let (single, b) = step_retaining(&load(text(16 * world, "")), &[]);
    assert_matches_single_rank(&dist, &a, &single, &b, &[], ep, &format!("{variant} dp={dp} ep={ep}"));
}

#[test]
fn pure_data_parallel_and_wider_expert_parallel_layouts_of_every_variant_match_one_rank() {
    // Layouts validation allows that the other tests leave out: experts replicated on every
    // data rank (ep = 1), and four-way expert parallelism for the chunked and shortcut designs.
    for (variant, table, model) in [
        ("topk", "", "capacity_factor = 1.0"),
        ("mpmoe", "[mpmoe]\nchunks = 2", "capacity_factor = 1.0"),
        ("scmoe", "", "top_k = 1\ncapacity_factor = 1.0"),
        ("dgmoe", "", "capacity_factor = 1.0"),
        ("tutel", "[tutel]\ndegree = 2", "capacity_factor = 1.0"),
    ] {
        check_variant(variant, table, model, 2, 1);
    }
    check_variant("mpmoe", "[mpmoe]\nchunks = 2", "capacity_factor = 0.5", 1, 4);
    check_variant("dgmoe", "", "dropless = true", 1, 4);
    check_variant("scmoe", "", "top_k = 1\ncapacity_factor = 0.5", 1, 2);
}
