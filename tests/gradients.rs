//! The hand-written backward pass matches central finite differences of the loss, for
//! every kind of parameter, through attention, the dense MLP, routing and the experts.

mod common;
use common::*;
use moelab::backend::cpu::CpuRuntime;

/// Total objective the backward differentiates: loss + aux_coef * aux.
fn objective(rt: &mut CpuRuntime, coef: f64) -> f64 {
    let r = rt.step(false, Some(0)).expect("step");
    r.loss + coef * r.aux_loss
}

fn check_param(rt: &mut CpuRuntime, coef: f64, name: &str, probes: usize) {
    let _ = objective(rt, coef);
    let grad = rt.read(0, &format!("{name}.grad")).unwrap();
    let base = rt.read(0, name).unwrap();
    // Probe the largest-gradient coordinates: their finite differences are well above noise.
    let mut order: Vec<usize> = (0..grad.len()).collect();
    order.sort_by(|&a, &b| grad[b].abs().partial_cmp(&grad[a].abs()).unwrap());
    let h = 2e-3f32;
    let routes = |rt: &CpuRuntime| [rt.read_i32(0, "L0.route.idx"), rt.read_i32(0, "L1.route.idx")];
    let base_routes = routes(rt);
    let mut checked = 0;
    for &i in order.iter().take(probes) {
        let mut p = base.clone();
        p[i] = base[i] + h;
        rt.write(0, name, p.clone());
        let fp = objective(rt, coef);
        let routes_p = routes(rt);
        p[i] = base[i] - h;
        rt.write(0, name, p);
        let fm = objective(rt, coef);
        let routes_m = routes(rt);
        rt.write(0, name, base.clone());
        if routes_p != base_routes || routes_m != base_routes {
            // A routing flip is a discontinuity: no derivative to compare there.
            continue;
        }
        let fd = (fp - fm) / (2.0 * h as f64);
        let an = grad[i] as f64;
        let err = (fd - an).abs() / an.abs().max(1e-4);
        assert!(err < 2e-2, "{name}[{i}]: analytic {an:e} vs finite difference {fd:e} (rel {err:e})");
        checked += 1;
    }
    assert!(checked * 2 >= probes, "{name}: only {checked} of {probes} probes kept their routing");
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
