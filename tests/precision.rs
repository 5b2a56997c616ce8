//! The bf16 precision policy of plans (`plan::precision`), without a GPU: which buffers end
//! bf16 and which stay f32, the bf16 shadows of GEMM-read parameters and their bytes in the
//! predicted peak, the validation rules for bf16 per backend, and the cross-check tolerance.

use moelab::plan::memory::predict;
use moelab::plan::{BufId, ElemType, OpKind, Plan, RankPlan};
use moelab::spec::{from_toml_str, DType, ExperimentSpec};
use moelab::taxonomy::MemCategory;
use std::collections::HashSet;
use std::path::Path;

const MODEL: &str = "d_model = 16\nd_ffn = 24\nn_experts = 4\ntop_k = 2\nn_layers = 2\nbatch = 2\nseq_len = 8\n[model.backbone]\nn_heads = 2\nd_mlp = 16";

fn text(variant: &str, dtype: &str, layout: &str, backend: &str) -> String {
    format!("name = \"t\"\nvariant = \"{variant}\"\n[model]\ndtype = \"{dtype}\"\n{MODEL}\n[layout]\n{layout}\n[run]\nbackend = \"{backend}\"\n")
}

fn spec(variant: &str, dtype: &str, layout: &str) -> ExperimentSpec {
    let t = text(variant, dtype, layout, "sim");
    from_toml_str(&t).unwrap_or_else(|e| panic!("{e}\n{t}"))
}

fn bytes(rp: &RankPlan, id: BufId) -> usize {
    rp.buffer(id).elem_bytes
}

/// Buffers the policy must leave f32 in a bf16 plan, and those that must be bf16.
fn check_policy(rp: &RankPlan) {
    use OpKind::*;
    let f32_of = |ids: &[BufId], what: &str, op: &str| {
        for id in ids {
            assert_eq!(bytes(rp, *id), 4, "{op}: {what} {} should stay f32", rp.buffer(*id).name);
        }
    };
    let bf16_of = |ids: &[BufId], what: &str, op: &str| {
        for id in ids {
            assert!(rp.buffer(*id).is_bf16(), "{op}: {what} {} should be bf16", rp.buffer(*id).name);
        }
    };
    let mut seen = HashSet::new();
    for op in &rp.ops {
        let n = op.name.as_str();
        seen.insert(std::mem::discriminant(&op.kind));
        match &op.kind {
            Route { logits, probs, weights, stats, .. } => f32_of(&[*logits, *probs, *weights, *stats], "routing", n),
            RouteBwd { probs, dweights, gathered, dlogits, .. } => f32_of(&[*probs, *dweights, *gathered, *dlogits], "routing grad", n),
            LayerNorm { x, y, stats, .. } => {
                f32_of(&[*stats], "stats", n);
                bf16_of(&[*x, *y], "activation", n);
            }
            LayerNormBwd { stats, dgamma, dbeta, .. } => f32_of(&[*stats, *dgamma, *dbeta], "stats/grads", n),
            Loss { loss, dy, target, .. } => {
                f32_of(&[*loss, *target], "loss", n);
                bf16_of(&dy.iter().copied().collect::<Vec<_>>(), "loss grad", n);
            }
            Combine { weights, back, out, .. } => {
                f32_of(&[*weights], "combine weights", n);
                bf16_of(&[*back, *out], "activation", n);
            }
            CombineBwd { weights, dweights, dback, .. } => {
                f32_of(&[*weights, *dweights], "combine weights", n);
                bf16_of(&[*dback], "activation grad", n);
            }
            Linear { x, .. } => bf16_of(&[*x], "GEMM input", n),
            LinearBwd { dw, dbias, .. } => {
                f32_of(&[*dw], "weight grad", n);
                f32_of(&dbias.iter().copied().collect::<Vec<_>>(), "bias grad", n);
            }
            ExpertLinear { x, y, .. } => bf16_of(&[*x, *y], "expert activation", n),
            ExpertLinearBwd { dw, dbias, dx, .. } => {
                f32_of(&[*dw, *dbias], "expert grads", n);
                bf16_of(&[*dx], "expert activation grad", n);
            }
            AttnCore { qkv, probs, ctx, .. } => bf16_of(&[*qkv, *probs, *ctx], "attention", n),
            _ => {}
        }
    }
    for k in ["Route", "RouteBwd", "LayerNorm", "Loss", "Combine", "ExpertLinear", "AttnCore", "LinearBwd"] {
        assert!(rp.ops.iter().any(|o| format!("{:?}", o.kind).starts_with(k)), "the test plan has a {k} op");
    }
    // Masters, gradients and moments stay f32.
    for p in &rp.params {
        for id in [Some(p.value), p.grad, p.moments.map(|m| m.0), p.moments.map(|m| m.1)].into_iter().flatten() {
            assert_eq!(bytes(rp, id), 4, "{} is an f32 master", rp.buffer(id).name);
            assert!(rp.buffer(id).persistent);
        }
    }
}

/// Parameters read as a GEMM's weight operand.
/// Weights of the GEMMs that run in bf16: all but the router's (a Linear with an f32 output,
/// and its backward from an f32 gradient), which runs in f32 on the master.
fn gemm_weights(rp: &RankPlan) -> HashSet<BufId> {
    use OpKind::*;
    let f32_buf = |b: &BufId| rp.buffer(*b).elem_bytes == 4;
    rp.ops
        .iter()
        .filter_map(|o| match &o.kind {
            Linear { y, .. } if f32_buf(y) => None,
            LinearBwd { dy, .. } if f32_buf(dy) => None,
            Linear { w, .. } | LinearBwd { w, .. } | ExpertLinear { w, .. } | ExpertLinearBwd { w, .. } | ExpertLinearBwdAcc { w, .. }
            | ExpertLinearPart { w, .. } | ExpertLinearPartBwd { w, .. } => Some(*w),
            _ => None,
        })
        .collect()
}

#[test]
fn bf16_topk_plan_keeps_routing_norm_stats_loss_and_grads_f32() {
    let plan = Plan::build(&spec("topk", "bf16", "ep = 2")).unwrap();
    for rp in &plan.ranks {
        check_policy(rp);
    }
}

#[test]
fn gemm_read_params_get_a_counted_bf16_shadow_in_bf16_plans_only() {
    let bf = Plan::build(&spec("topk", "bf16", "ep = 2")).unwrap();
    let f = Plan::build(&spec("topk", "f32", "ep = 2")).unwrap();
    for (rb, rf) in bf.ranks.iter().zip(&f.ranks) {
        let weights = gemm_weights(rb);
        assert!(!weights.is_empty());
        let mut shadow_bytes = 0u64;
        for p in &rb.params {
            match p.half {
                Some(h) => {
                    assert!(weights.contains(&p.value), "{} has a shadow but no GEMM reads it", rb.buffer(p.value).name);
                    let (d, m) = (rb.buffer(h), rb.buffer(p.value));
                    assert!(d.is_bf16() && d.persistent && d.category == MemCategory::Params && d.elems == m.elems, "{d:?}");
                    assert_eq!(d.name, format!("{}.bf16", m.name));
                    shadow_bytes += d.bytes();
                }
                None => assert!(!weights.contains(&p.value), "GEMM weight {} lacks its bf16 shadow", rb.buffer(p.value).name),
            }
        }
        assert!(shadow_bytes > 0);
        // The router runs in f32: its weight has no bf16 copy.
        for p in &rb.params {
            if rb.buffer(p.value).name.ends_with("gate.w") {
                assert!(p.half.is_none(), "{}", rb.buffer(p.value).name);
            }
        }
        // The prediction holds masters (f32) plus shadows (bf16) in Params from the start.
        let masters: u64 = rb.params.iter().map(|p| rb.buffer(p.value).bytes()).sum();
        let pred = predict(rb);
        assert_eq!(pred.at_peak[MemCategory::Params.index()], masters + shadow_bytes);
        // f32 plans: no shadows, every value buffer 4 bytes wide, the same masters.
        assert!(rf.params.iter().all(|p| p.half.is_none()));
        assert!(rf.buffers.iter().all(|b| b.elem_bytes == 4 && !b.name.ends_with(".bf16")));
        assert_eq!(predict(rf).at_peak[MemCategory::Params.index()], masters);
        // Activations are half as wide in the bf16 plan.
        let act = |r: &RankPlan| r.buffers.iter().filter(|b| b.category == MemCategory::Activations).map(|b| b.bytes()).sum::<u64>();
        assert!(act(rb) < act(rf), "bf16 activations {} vs f32 {}", act(rb), act(rf));
    }
}

#[test]
fn inference_bf16_plans_have_shadows_too() {
    let mut s = spec("topk", "bf16", "ep = 2");
    s.run.mode = moelab::spec::Mode::Inference;
    let plan = Plan::build(&s).unwrap();
    for rp in &plan.ranks {
        let weights = gemm_weights(rp);
        assert!(rp.params.iter().filter(|p| weights.contains(&p.value)).all(|p| p.half.is_some()));
    }
}

#[test]
fn tutel_all_gathered_weights_travel_bf16_from_the_shadow_and_biases_f32() {
    let t = text("tutel", "bf16", "ep = 2", "sim") + "[tutel]\nr = 0\n";
    let plan = Plan::build(&from_toml_str(&t).unwrap_or_else(|e| panic!("{e}\n{t}"))).unwrap();
    let mut gathers = 0;
    for rp in &plan.ranks {
        let weights = gemm_weights(rp);
        for op in &rp.ops {
            if let OpKind::AllGather { send, recv, .. } = &op.kind {
                let Some(p) = rp.params.iter().find(|p| p.value == *send) else { continue };
                gathers += 1;
                if weights.contains(recv) {
                    assert!(rp.buffer(*recv).is_bf16(), "{}", rp.buffer(*recv).name);
                    assert!(p.half.is_some(), "{} is gathered into a GEMM operand", rp.buffer(*send).name);
                } else {
                    assert_eq!(rp.buffer(*recv).elem_bytes, 4, "{}", rp.buffer(*recv).name);
                }
            }
            if let OpKind::ReduceScatter { send, recv, .. } = &op.kind {
                assert_eq!((bytes(rp, *send), bytes(rp, *recv)), (4, 4), "gradients reduce in f32");
            }
        }
    }
    assert!(gathers > 0, "tutel with ep = 2 all-gathers its experts");
}

/// Every GPU experiment, in bf16 on the sim backend: the plan builds and keeps the policy.
#[test]
fn every_gpu_experiment_has_a_consistent_bf16_plan() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/gpu");
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        let src = std::fs::read_to_string(&path).unwrap();
        let src = src.replace("backend = \"cuda\"", "backend = \"sim\"");
        let src = if src.contains("dtype = ") { src } else { src.replacen("[model]\n", "[model]\ndtype = \"bf16\"\n", 1) };
        let s = from_toml_str(&src).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
        assert_eq!(s.model.dtype, DType::Bf16, "{}", path.display());
        let plan = Plan::build(&s).unwrap();
        for rp in &plan.ranks {
            for op in &rp.ops {
                match &op.kind {
                    OpKind::Route { logits, probs, weights, .. } => {
                        assert!([logits, probs, weights].iter().all(|b| bytes(rp, **b) == 4), "{}: {}", path.display(), op.name)
                    }
                    OpKind::Loss { dy: Some(d), .. } | OpKind::LossReplica { dy: Some(d), .. } => assert_eq!(bytes(rp, *d), 2),
                    _ => {}
                }
            }
            let weights = gemm_weights(rp);
            for p in &rp.params {
                if weights.contains(&p.value) {
                    assert!(p.half.is_some(), "{}: {}", path.display(), rp.buffer(p.value).name);
                }
            }
            for b in &rp.buffers {
                assert!(b.elem != ElemType::I32 || b.elem_bytes == 4);
            }
        }
        n += 1;
    }
    assert!(n > 10);
}

#[test]
fn bf16_is_valid_on_every_backend() {
    // cuda: no dtype problem (without GPUs only the GPU count is reported).
    match from_toml_str(&text("topk", "bf16", "ep = 1", "cuda")) {
        Ok(s) => assert_eq!(s.model.dtype, DType::Bf16),
        Err(e) => {
            let shown = e.to_string();
            assert!(!shown.contains("model.dtype"), "bf16 on cuda is allowed: {shown}");
            assert!(shown.contains("run.backend"), "{shown}");
        }
    }
    assert!(from_toml_str(&text("topk", "bf16", "ep = 1", "sim")).is_ok());
    assert!(from_toml_str(&text("topk", "bf16", "ep = 1", "cpu")).is_ok());
}

/// The cpu runs bf16 plans as f32 arithmetic with bf16 storage: every bf16 buffer holds
/// bf16-representable values, parameters keep f32 masters, the bf16 copies are counted, and
/// the result differs from the f32 run by bf16 rounding only.
#[test]
fn cpu_runs_bf16_plans_with_bf16_storage() {
    use moelab::backend::cpu::CpuRuntime;
    use moelab::backend::ExecOptions;
    use moelab::plan::Plan;
    let run = |dtype: &str| {
        let spec = from_toml_str(&text("topk", dtype, "ep = 2", "cpu")).unwrap();
        let plan = Plan::build(&spec).unwrap();
        let mut rt = CpuRuntime::new(plan.clone(), ExecOptions::default());
        let mut losses = Vec::new();
        for i in 0..3 {
            losses.push(rt.step(i > 0, None).unwrap().loss);
        }
        (plan, rt, losses)
    };
    let (plan, rt, l16) = run("bf16");
    let (_, _, l32) = run("f32");
    for (a, b) in l16.iter().zip(&l32) {
        let rel = (a - b).abs() / b.abs();
        assert!(rel > 0.0 && rel < 2e-2, "bf16 loss {a} vs f32 {b}");
    }
    let rp = &plan.ranks[0];
    let mut bf16_seen = 0;
    for p in &rp.params {
        let master = rt.read(0, &rp.buffer(p.value).name).unwrap();
        if let Some(h) = p.half {
            let copy = rt.read(0, &rp.buffer(h).name).unwrap();
            assert!(copy.iter().zip(&master).all(|(c, m)| *c == moelab::math::bf16::round(*m)), "{}", rp.buffer(h).name);
            // Adam moved the masters off the bf16 grid.
            assert!(master.iter().any(|m| moelab::math::bf16::round(*m) != *m));
            bf16_seen += 1;
        }
    }
    assert!(bf16_seen > 0);
    let pred = moelab::plan::memory::predict(rp);
    let (peak, at_peak) = rt.tracked_peaks()[0];
    assert!(!pred.upper_bound);
    assert_eq!((peak, at_peak), (pred.peak_total, pred.at_peak), "tracked peak equals the plan's prediction (bf16 copies included)");
}

#[test]
fn crosscheck_tolerance_follows_the_dtype() {
    use moelab::run::crosscheck::{tolerance, BF16_TOL, F32_TOL};
    assert_eq!(tolerance(&spec("topk", "f32", "ep = 1")), F32_TOL);
    assert_eq!(tolerance(&spec("topk", "bf16", "ep = 1")), BF16_TOL);
    assert_eq!(BF16_TOL, 1e-2);
    assert_eq!(F32_TOL, 1e-4);
}

/// Routing replay (bf16 cross-checks): a cpu run given another run's choices takes exactly
/// those, computes the same weights top-k would for them, and differs when they differ.
#[test]
fn cpu_replays_given_routing_choices() {
    use moelab::backend::cpu::CpuRuntime;
    use moelab::backend::ExecOptions;
    use moelab::plan::Plan;
    use std::collections::HashMap;
    use std::sync::Arc;
    let spec = from_toml_str(&text("topk", "bf16", "ep = 2", "cpu")).unwrap();
    let plan = Plan::build(&spec).unwrap();
    let names: Vec<(u32, String)> = plan.ranks.iter().flat_map(|rp| {
        rp.buffers.iter().filter(|b| b.name.ends_with("route.idx")).map(move |b| (rp.rank, b.name.clone()))
    }).collect();
    assert!(!names.is_empty());
    let retain: Vec<String> = names.iter().map(|(_, n)| n.clone()).collect();
    let run = |replay: Option<Arc<HashMap<(u32, String), Vec<i32>>>>| {
        let mut rt = CpuRuntime::new(plan.clone(), ExecOptions { skip_optimizer: true, retain: retain.clone(), replay_routes: replay, ..Default::default() });
        let rep = rt.step(true, None).unwrap();
        let routes: HashMap<(u32, String), Vec<i32>> = names.iter().map(|(r, n)| ((*r, n.clone()), rt.read_i32(*r as usize, n).unwrap())).collect();
        let g = rt.read(0, "L1.gate.w.grad").unwrap();
        (rep.loss, routes, g)
    };
    let (loss, own, grad) = run(None);
    let (loss2, same, grad2) = run(Some(Arc::new(own.clone())));
    assert_eq!((loss, &own, &grad), (loss2, &same, &grad2), "replaying a run's own choices changes nothing");
    // Swap the two choices of token 0 in one layer, then move one token to another expert.
    let mut forced = own.clone();
    let key = names.iter().find(|(r, n)| *r == 0 && n.starts_with("L1")).unwrap().clone();
    let v = forced.get_mut(&key).unwrap();
    v.swap(0, 1);
    v[2] = (0..8).find(|e| *e != v[2] && *e != v[3]).unwrap();
    let (_, taken, grad3) = run(Some(Arc::new(forced.clone())));
    assert_eq!(taken[&key], forced[&key], "the forced choices are the ones taken");
    assert_ne!(grad3, grad, "a moved token changes the gate's gradient");
}

/// Op byte counts follow the widths buffers are stored at: a bf16 plan's activation moves
/// half the f32 plan's bytes, its all-to-all sends half as much, while Adam (f32 masters,
/// moments and gradients) moves the same; the sim prices bf16 plans from these counts.
#[test]
fn op_bytes_follow_the_stored_widths() {
    let layout = "ep = 2";
    let f32_plan = Plan::build(&spec("topk", "f32", layout)).expect("f32 plan");
    let bf16_plan = Plan::build(&spec("topk", "bf16", layout)).expect("bf16 plan");
    let bytes_of = |p: &Plan, name: &str| -> u64 {
        let rp = &p.ranks[0];
        rp.ops.iter().find(|o| o.name == name).unwrap_or_else(|| panic!("no op {name}")).bytes
    };
    for (name, ratio) in [("L0.expert_act", 0.5), ("L0.expert_act_bwd", 0.5), ("L0.dispatch_a2a", 0.5), ("adam", 1.0)] {
        let (f, b) = (bytes_of(&f32_plan, name), bytes_of(&bf16_plan, name));
        assert!(f > 0, "{name}: f32 bytes");
        let got = b as f64 / f as f64;
        assert!((got - ratio).abs() < 0.02, "{name}: bf16 / f32 bytes = {got}, want {ratio}");
    }
}
