//! The hand-written backward pass matches central finite differences of the loss, for
//! every kind of parameter, through attention, the dense MLP, routing and the experts: on
//! the largest-gradient coordinates and along a direction through every coordinate, also
//! with tokens dropped at capacity (renormalized gates and not).

mod common;
use common::*;
use moelab::backend::cpu::CpuRuntime;

/// The route buffers whose flips make a finite difference meaningless.
fn routes() -> Vec<String> {
    vec!["L0.route.idx".to_string(), "L1.route.idx".to_string()]
}

fn check_param(rt: &mut CpuRuntime, coef: f64, name: &str, probes: usize) {
    check_finite_differences(rt, coef, &routes(), name, probes);
}

#[test]
fn backward_matches_finite_differences() {
    let s = spec(
        "tokens_per_rank = 16\nseq_len = 8\nn_layers = 1\ndropless = true\nrenormalize = true\naux_loss_coef = 0.1\n[model.backbone]\nn_heads = 2\nd_mlp = 12",
        "",
        "",
    );
    let coef = s.model.aux_loss_coef;
    let mut rt = runtime(&s, &["L0.route.idx", "L1.route.idx"], true);
    for name in [
        "L0.expert.w1", "L0.expert.b1", "L0.expert.w2", "L0.expert.b2", "L0.gate.w", "L0.ln_moe.gamma", "L0.ln_moe.beta",
        "L0.attn.qkv.w", "L0.attn.qkv.b", "L0.attn.out.w", "L0.ln_attn.gamma", "L0.mlp.fc1.w", "L0.mlp.fc2.b", "L0.ln_mlp.beta",
    ] {
        check_param(&mut rt, coef, name, 6);
    }
    // The largest-gradient probes above never look at small coordinates; a derivative along
    // a direction through all of them does, for every parameter.
    for name in [
        "L0.expert.w1", "L0.expert.b1", "L0.expert.w2", "L0.expert.b2", "L0.gate.w", "L0.ln_moe.gamma", "L0.ln_moe.beta",
        "L0.attn.qkv.w", "L0.attn.qkv.b", "L0.attn.out.w", "L0.attn.out.b", "L0.ln_attn.gamma", "L0.ln_attn.beta",
        "L0.mlp.fc1.w", "L0.mlp.fc1.b", "L0.mlp.fc2.w", "L0.mlp.fc2.b", "L0.ln_mlp.gamma", "L0.ln_mlp.beta",
    ] {
        check_directional_derivative(&mut rt, coef, &routes(), name);
    }
}

#[test]
fn relu_and_top1_backward_matches_finite_differences() {
    let s = spec("tokens_per_rank = 16\nn_layers = 2\ntop_k = 1\nactivation = \"relu\"\ndropless = true", "", "");
    let coef = s.model.aux_loss_coef;
    let mut rt = runtime(&s, &["L0.route.idx", "L1.route.idx"], true);
    for name in ["L0.expert.w1", "L1.expert.w2", "L0.gate.w", "L1.gate.w", "L0.ln_moe.gamma"] {
        check_param(&mut rt, coef, name, 6);
    }
}

#[test]
fn aux_loss_gradient_matches_finite_differences() {
    // A large coefficient makes the load-balancing term dominate the gate's gradient.
    let s = spec("tokens_per_rank = 32\nn_layers = 1\ntop_k = 2\ncapacity_factor = 2.0\naux_loss_coef = 20.0", "", "");
    let coef = s.model.aux_loss_coef;
    let mut rt = runtime(&s, &["L0.route.idx"], true);
    for name in ["L0.gate.w", "L0.ln_moe.gamma"] {
        check_param(&mut rt, coef, name, 6);
    }
}

#[test]
fn backward_with_dropped_tokens_matches_finite_differences() {
    // Capacity factor 0.5: about half of the assignments drop, so the dropped slots'
    // branches of the combine and routing backward run (renormalized gates and not).
    for renormalize in [false, true] {
        let s = spec(&format!("tokens_per_rank = 32\nn_layers = 2\ntop_k = 2\ncapacity_factor = 0.5\nrenormalize = {renormalize}\naux_loss_coef = 0.1"), "", "");
        let coef = s.model.aux_loss_coef;
        let mut rt = runtime(&s, &["L0.route.idx", "L1.route.idx"], true);
        let r = rt.step(false, Some(0)).expect("step");
        assert!(r.dropped * 4 >= r.routed, "renormalize={renormalize}: {} of {} dropped", r.dropped, r.routed);
        for name in ["L0.expert.w1", "L1.expert.b2", "L1.ln_moe.gamma"] {
            check_param(&mut rt, coef, name, 6);
        }
        // The gates' largest coordinates flip routing at the coordinate step; along a
        // direction the step shrinks until none flips.
        for name in ["L0.expert.w1", "L1.expert.b2", "L0.gate.w", "L1.gate.w", "L1.ln_moe.gamma", "L0.ln_moe.beta"] {
            check_directional_derivative(&mut rt, coef, &routes(), name);
        }
    }
}
