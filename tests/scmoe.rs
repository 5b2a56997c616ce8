//! ScMoE and DGMoE (arXiv 2404.05019): every layout computes what the single-rank run
//! computes; the single-rank run computes the block written directly from `moelab::math`;
//! the backward matches finite differences; the routed branch of layer l reads layer l-1's
//! post-attention representation; and the plan issues the shortcut all-to-alls where a
//! concurrent executor can overlap them with attention and the dense MLP.

mod common;
use common::*;
use moelab::backend::cpu::CpuRuntime;
use moelab::math::{activation, attention, linalg, norm, routing};
use moelab::plan::{OpId, Plan, RankPlan};
use moelab::spec::{from_toml_str, load_file, Activation, Capacity, ExperimentSpec};
use moelab::taxonomy::{Pass, Stage, Stream};
use std::collections::HashSet;
use std::path::Path;

const SCMOE: &str = "variant = \"scmoe\"\n";
const DGMOE: &str = "variant = \"dgmoe\"\n";

/// A small spec of `variant` (`common::spec` with a `variant` line).
fn vspec(variant: &str, model: &str, layout: &str, run: &str) -> ExperimentSpec {
    let text = format!(
        "name = \"t\"\n{variant}[model]\nd_model = 16\nd_ffn = 24\nn_experts = 4\n{model}\n[layout]\n{layout}\n[run]\nbackend = \"cpu\"\n{run}\n"
    );
    from_toml_str(&text).unwrap_or_else(|e| panic!("test spec invalid: {e}\n{text}"))
}

// ---------------------------------------------------------------------------------------------
// Distributed layouts equal the single-rank run
// ---------------------------------------------------------------------------------------------

fn check_layout(variant: &str, model: &str, dp: usize, ep: usize) {
    let (world, tokens) = (dp * ep, 16);
    let layout = format!("dp = {dp}\nep = {ep}");
    let dist_spec = vspec(variant, &format!("tokens_per_rank = {tokens}\nseq_len = 8\nn_layers = 2\n{model}"), &layout, "");
    let ref_spec = vspec(variant, &format!("tokens_per_rank = {}\nseq_len = 8\nn_layers = 2\n{model}", tokens * world), "", "");
    let outs = ["L0.moe.out", "L1.moe.out"];
    let mut dist = runtime(&dist_spec, &outs, true);
    let mut single = runtime(&ref_spec, &outs, true);
    let a = dist.step(false, Some(0)).expect("distributed step");
    let b = single.step(false, Some(0)).expect("single step");
    let what = format!("{variant} dp={dp} ep={ep}");
    assert_matches_single_rank(&dist, &a, &single, &b, &outs, ep, &what);
    assert_eq!(a.routed, b.routed, "{what}: same assignments routed");
    let mut checked = 0;
    for rp in &dist.plan().ranks[0].params {
        let gname = format!("{}.grad", dist.plan().ranks[0].buffer(rp.value).name);
        let want = single.read(0, &gname).unwrap();
        assert!(want.iter().any(|v| *v != 0.0), "{what}: {gname} is all zeros");
        if !rp.expert {
            let got = dist.read(0, &gname).unwrap();
            for r in 1..world {
                assert_eq!(dist.read(r, &gname).unwrap(), got, "{what}: {gname} differs on rank {r}");
            }
        }
        checked += 1;
    }
    assert!(checked > 20, "{what}: only {checked} params");
}

const SC_MODEL: &str = "top_k = 1\ncapacity_factor = 1.25\n[model.backbone]\nn_heads = 2\nd_mlp = 20";
const DG_MODEL: &str = "capacity_factor = 1.0\n[model.backbone]\nn_heads = 2";

#[test]
fn scmoe_ep2_matches_single_rank() {
    check_layout(SCMOE, SC_MODEL, 1, 2);
}

#[test]
fn scmoe_dp2_ep2_matches_single_rank() {
    check_layout(SCMOE, SC_MODEL, 2, 2);
}

#[test]
fn scmoe_top2_dropless_ep4_matches_single_rank() {
    check_layout(SCMOE, "top_k = 2\ndropless = true\nrenormalize = true\n[model.backbone]\nn_heads = 2\nd_mlp = 12", 1, 4);
}

#[test]
fn dgmoe_ep2_matches_single_rank() {
    check_layout(DGMOE, DG_MODEL, 1, 2);
}

#[test]
fn dgmoe_dp2_ep2_matches_single_rank() {
    check_layout(DGMOE, DG_MODEL, 2, 2);
}

#[test]
fn dgmoe_with_dense_mlp_and_tight_capacity_dp2_ep2_matches_single_rank() {
    check_layout(DGMOE, "capacity_factor = 0.5\n[model.backbone]\nn_heads = 2\nd_mlp = 20", 2, 2);
}

// ---------------------------------------------------------------------------------------------
// The single-rank run equals the block written directly from moelab::math
// ---------------------------------------------------------------------------------------------

/// Reads the parameters of a single-rank run by name.
struct Params<'a>(&'a CpuRuntime);

impl Params<'_> {
    fn get(&self, name: &str) -> Vec<f32> {
        self.0.read(0, name).unwrap_or_else(|| panic!("no param {name}"))
    }
}

fn layer_norm(p: &Params, name: &str, x: &[f32]) -> Vec<f32> {
    let (gamma, beta) = (p.get(&format!("{name}.gamma")), p.get(&format!("{name}.beta")));
    let mut y = vec![0.0; x.len()];
    let mut stats = vec![0.0; 2 * x.len() / gamma.len()];
    norm::forward(x, &gamma, &beta, &mut y, &mut stats);
    y
}

/// `x w + b (+ residual)` for `x[rows, d_in]`.
fn linear(p: &Params, name: &str, x: &[f32], d_in: usize, d_out: usize, residual: Option<&[f32]>) -> Vec<f32> {
    let rows = x.len() / d_in;
    let mut y = residual.map_or_else(|| vec![0.0; rows * d_out], |r| r.to_vec());
    linalg::gemm(x, &p.get(&format!("{name}.w")), &mut y, rows, d_in, d_out, true);
    linalg::add_bias(&mut y, &p.get(&format!("{name}.b")));
    y
}

/// Reference model geometry.
struct Geo {
    t: usize,
    m: usize,
    f: usize,
    e: usize,
    seq: usize,
    heads: usize,
    act: Activation,
    renormalize: bool,
    cap: Capacity,
}

impl Geo {
    fn of(s: &ExperimentSpec) -> Self {
        let bb = s.model.backbone.as_ref().expect("a backbone");
        Geo {
            t: s.tokens_per_rank(),
            m: s.model.d_model,
            f: s.model.d_ffn,
            e: s.model.n_experts,
            seq: s.seq_len(),
            heads: bb.n_heads,
            act: s.model.activation,
            renormalize: s.model.renormalize,
            cap: s.capacity(),
        }
    }
}

/// `x + Attn(LN(x))`.
fn attn_block(p: &Params, g: &Geo, l: usize, x: &[f32]) -> Vec<f32> {
    let y = layer_norm(p, &format!("L{l}.ln_attn"), x);
    let qkv = linear(p, &format!("L{l}.attn.qkv"), &y, g.m, 3 * g.m, None);
    let shape = attention::AttnShape { batch: g.t / g.seq, seq: g.seq, heads: g.heads, d_model: g.m };
    let (mut probs, mut ctx) = (vec![0.0; shape.probs_len()], vec![0.0; g.t * g.m]);
    attention::forward(shape, &qkv, &mut probs, &mut ctx);
    linear(p, &format!("L{l}.attn.out"), &ctx, g.m, g.m, Some(x))
}

/// `x + MLP(LN(x))`.
fn mlp_block(p: &Params, g: &Geo, l: usize, x: &[f32], d_mlp: usize) -> Vec<f32> {
    let y = layer_norm(p, &format!("L{l}.ln_mlp"), x);
    let h = linear(p, &format!("L{l}.mlp.fc1"), &y, g.m, d_mlp, None);
    let mut a = vec![0.0; h.len()];
    activation::forward(g.act, &h, &mut a);
    linear(p, &format!("L{l}.mlp.fc2"), &a, d_mlp, g.m, Some(x))
}

/// `sum_j w[t, j] expert_{idx[t, j]}(LN(x)[t])` over kept assignments: one gate with `k` choices.
fn routed(p: &Params, g: &Geo, l: usize, prefix: &str, k: usize, x: &[f32]) -> Vec<f32> {
    let (t, m, f, e) = (g.t, g.m, g.f, g.e);
    let y = layer_norm(p, &format!("L{l}.{prefix}ln_moe"), x);
    let mut logits = vec![0.0; t * e];
    linalg::gemm(&y, &p.get(&format!("L{l}.{prefix}gate.w")), &mut logits, t, m, e, false);
    let mut probs = vec![0.0; t * e];
    routing::softmax_rows(&logits, &mut probs, e);
    let (mut idx, mut w) = (vec![0i32; t * k], vec![0.0; t * k]);
    routing::top_k(&probs, e, k, g.renormalize, &mut idx, &mut w);
    let mut stats = vec![0.0; (k + 1) * e];
    routing::local_stats(&probs, &idx, e, k, &mut stats);
    let table = routing::RoutingTable::new(&stats, 1, k, e, t, g.cap);
    let keep = routing::keep_mask(&table, 0, &idx, k, e);
    let (w1, b1, w2, b2) = (p.get(&format!("L{l}.expert.w1")), p.get(&format!("L{l}.expert.b1")), p.get(&format!("L{l}.expert.w2")),
        p.get(&format!("L{l}.expert.b2")));
    let mut out = vec![0.0; t * m];
    for (a, &x_e) in idx.iter().enumerate() {
        if !keep[a] {
            continue;
        }
        let (tok, ex) = (a / k, x_e as usize);
        let mut h = b1[ex * f..(ex + 1) * f].to_vec();
        linalg::gemm(&y[tok * m..(tok + 1) * m], &w1[ex * m * f..(ex + 1) * m * f], &mut h, 1, m, f, true);
        let mut act = vec![0.0; f];
        activation::forward(g.act, &h, &mut act);
        let mut o = b2[ex * m..(ex + 1) * m].to_vec();
        linalg::gemm(&act, &w2[ex * f * m..(ex + 1) * f * m], &mut o, 1, f, m, true);
        for (dst, v) in out[tok * m..(tok + 1) * m].iter_mut().zip(o) {
            *dst += w[a] * v;
        }
    }
    out
}

fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// Block outputs of a 2-layer ScMoE or DGMoE model, computed directly.
fn reference(rt: &CpuRuntime, s: &ExperimentSpec, dgmoe: bool) -> Vec<Vec<f32>> {
    let p = Params(rt);
    let g = Geo::of(s);
    let d_mlp = s.model.backbone.as_ref().map_or(0, |bb| bb.d_mlp);
    let mut x = rt.read(0, "input.x").expect("retained input");
    let mut shortcut = x.clone();
    let mut outs = Vec::new();
    for l in 0..s.model.n_layers {
        let x_attn = attn_block(&p, &g, l, &x);
        let out = if dgmoe {
            let x_cur = if d_mlp > 0 { mlp_block(&p, &g, l, &x_attn, d_mlp) } else { x_attn.clone() };
            let sc = routed(&p, &g, l, "sc_", 1, &shortcut);
            let cur = routed(&p, &g, l, "cur_", 1, &x_cur);
            add(&add(&x_cur, &sc), &cur)
        } else {
            add(&mlp_block(&p, &g, l, &x_attn, d_mlp), &routed(&p, &g, l, "", s.model.top_k, &shortcut))
        };
        outs.push(out.clone());
        shortcut = x_attn;
        x = out;
    }
    outs
}

fn check_reference(variant: &str, model: &str) {
    let s = vspec(variant, &format!("tokens_per_rank = 32\nseq_len = 8\nn_layers = 2\n{model}"), "", "mode = \"inference\"");
    let mut rt = runtime(&s, &["input.x", "L0.moe.out", "L1.moe.out"], true);
    let r = rt.step(false, Some(0)).expect("step");
    let want = reference(&rt, &s, variant == DGMOE);
    for (l, w) in want.iter().enumerate() {
        let got = rt.read(0, &format!("L{l}.moe.out")).unwrap();
        let err = rel_err(&got, w);
        assert!(err < 1e-5, "{variant}: L{l}.moe.out vs direct implementation: rel err {err}");
    }
    assert!(r.routed > 0);
}

#[test]
fn scmoe_block_matches_direct_implementation() {
    check_reference(SCMOE, "top_k = 1\ncapacity_factor = 1.0\n[model.backbone]\nn_heads = 2\nd_mlp = 20");
    check_reference(SCMOE, "top_k = 2\ncapacity_factor = 0.75\nrenormalize = true\nactivation = \"relu\"\n[model.backbone]\nn_heads = 4\nd_mlp = 8");
}

#[test]
fn dgmoe_block_matches_direct_implementation() {
    check_reference(DGMOE, "capacity_factor = 1.0\n[model.backbone]\nn_heads = 2");
    check_reference(DGMOE, "dropless = true\n[model.backbone]\nn_heads = 2\nd_mlp = 12");
}

// ---------------------------------------------------------------------------------------------
// The shortcut: layer l's routed branch reads layer l-1's x_attn
// ---------------------------------------------------------------------------------------------

/// Perturbing layer l's attention leaves layer l's routed input alone and changes layer
/// l+1's, so the branch of layer l+1 reads layer l's post-attention representation.
fn check_shortcut_reads_previous_attention(variant: &str, model: &str, ln: &str) {
    let s = vspec(variant, &format!("tokens_per_rank = 16\nseq_len = 8\nn_layers = 3\n{model}"), "", "mode = \"inference\"");
    let names: Vec<String> = (0..3).map(|l| format!("L{l}.{ln}.y")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut rt = runtime(&s, &refs, true);
    rt.step(false, Some(0)).unwrap();
    let base: Vec<Vec<f32>> = names.iter().map(|n| rt.read(0, n).unwrap()).collect();
    for l in 0..2 {
        let w = format!("L{l}.attn.out.b");
        let orig = rt.read(0, &w).unwrap();
        // Not a constant shift: LayerNorm removes those.
        rt.write(0, &w, orig.iter().enumerate().map(|(i, v)| v + 0.1 * (i % 5) as f32).collect());
        rt.step(false, Some(0)).unwrap();
        for (j, n) in names.iter().enumerate() {
            let now = rt.read(0, n).unwrap();
            if j <= l {
                assert_eq!(now, base[j], "{variant}: {w} changed {n}, which must not depend on layer {l}'s attention");
            } else {
                assert!(rel_err(&now, &base[j]) > 1e-3, "{variant}: {w} left {n} unchanged: the shortcut skips layer {l}'s x_attn");
            }
        }
        rt.write(0, &w, orig);
    }
}

#[test]
fn scmoe_routed_branch_reads_previous_x_attn() {
    check_shortcut_reads_previous_attention(SCMOE, "top_k = 1\n[model.backbone]\nn_heads = 2\nd_mlp = 12", "ln_moe");
}

#[test]
fn dgmoe_shortcut_gate_reads_previous_x_attn() {
    check_shortcut_reads_previous_attention(DGMOE, "[model.backbone]\nn_heads = 2", "sc_ln_moe");
}

// ---------------------------------------------------------------------------------------------
// Backward against finite differences
// ---------------------------------------------------------------------------------------------

fn check_gradients(variant: &str, model: &str, idx: &[&str], params: &[&str]) {
    let s = vspec(variant, &format!("tokens_per_rank = 16\nseq_len = 8\nn_layers = 2\ndropless = true\naux_loss_coef = 0.1\n{model}"), "", "");
    let coef = s.model.aux_loss_coef;
    let idx_names: Vec<String> = idx.iter().map(|s| s.to_string()).collect();
    let mut rt = runtime(&s, idx, true);
    for name in params {
        check_finite_differences(&mut rt, coef, &idx_names, name, 6);
    }
}

#[test]
fn scmoe_backward_matches_finite_differences() {
    check_gradients(SCMOE, "top_k = 2\nrenormalize = true\n[model.backbone]\nn_heads = 2\nd_mlp = 12", &["L0.route.idx", "L1.route.idx"], &[
        "L0.expert.w1", "L1.expert.b2", "L0.gate.w", "L1.gate.w", "L0.ln_moe.gamma", "L1.ln_moe.beta", "L0.attn.qkv.w",
        "L0.attn.out.b", "L0.ln_attn.gamma", "L1.attn.qkv.b", "L0.mlp.fc1.w", "L1.mlp.fc2.b", "L0.ln_mlp.beta",
    ]);
}

#[test]
fn dgmoe_backward_matches_finite_differences() {
    let idx = ["L0.sc_route.idx", "L0.cur_route.idx", "L1.sc_route.idx", "L1.cur_route.idx"];
    check_gradients(DGMOE, "[model.backbone]\nn_heads = 2\nd_mlp = 12", &idx, &[
        "L0.expert.w1", "L0.expert.b1", "L1.expert.w2", "L0.sc_gate.w", "L0.cur_gate.w", "L1.sc_gate.w", "L0.sc_ln_moe.gamma",
        "L1.sc_ln_moe.beta", "L0.cur_ln_moe.gamma", "L0.attn.qkv.w", "L0.attn.out.b", "L0.mlp.fc1.w", "L1.ln_attn.beta",
    ]);
}

// ---------------------------------------------------------------------------------------------
// The plan: where the all-to-alls are issued and what they wait for
// ---------------------------------------------------------------------------------------------

fn op_id(rp: &RankPlan, name: &str) -> OpId {
    rp.ops.iter().find(|o| o.name == name).unwrap_or_else(|| panic!("rank {}: no op {name}", rp.rank)).id
}

/// Every op that `op` waits for, directly or through other ops.
fn ancestors(rp: &RankPlan, op: OpId) -> HashSet<OpId> {
    let mut seen = HashSet::new();
    let mut stack = vec![op];
    while let Some(o) = stack.pop() {
        for d in &rp.ops[o.0 as usize].deps {
            if seen.insert(*d) {
                stack.push(*d);
            }
        }
    }
    seen
}

/// Layer `l`'s ops of `pass` whose name is `L{l}.{name}` for one of `names`, or of `stage`.
fn ops_of(rp: &RankPlan, l: u32, pass: Pass, stage: Stage, names: &[&str]) -> Vec<OpId> {
    let full: Vec<String> = names.iter().map(|n| format!("L{l}.{n}")).collect();
    let ids: Vec<OpId> = rp
        .ops
        .iter()
        .filter(|o| o.layer == Some(l) && o.pass == pass && (o.stage == stage || full.contains(&o.name)))
        .map(|o| o.id)
        .collect();
    assert!(!ids.is_empty(), "rank {}: no {stage:?} ops in layer {l}", rp.rank);
    ids
}

/// `a2a` runs on the comm stream, is issued before every op of `others`, and none of them
/// is among its ancestors.
fn assert_independent_and_first(rp: &RankPlan, a2a: OpId, others: &[OpId], what: &str) {
    let op = &rp.ops[a2a.0 as usize];
    assert_eq!(op.stream, Stream::Comm, "{what}: {} is not on the comm stream", op.name);
    let anc = ancestors(rp, a2a);
    for o in others {
        let other = &rp.ops[o.0 as usize];
        assert!(a2a < *o, "{what}: {} is issued after {}", op.name, other.name);
        assert!(!anc.contains(o), "{what}: {} waits for {}", op.name, other.name);
    }
}

/// Attention ops (with their LayerNorm) and dense MLP ops (with theirs) of layer `l`.
fn attn_and_mlp(rp: &RankPlan, l: u32, pass: Pass) -> (Vec<OpId>, Vec<OpId>) {
    let sfx = if pass == Pass::Backward { "_bwd" } else { "" };
    (
        ops_of(rp, l, pass, Stage::Attention, &[&format!("ln_attn{sfx}")]),
        ops_of(rp, l, pass, Stage::DenseMlp, &[&format!("ln_mlp{sfx}")]),
    )
}

fn plan(variant: &str, model: &str, layout: &str) -> Plan {
    let s = vspec(variant, &format!("tokens_per_rank = 16\nseq_len = 8\nn_layers = 3\n{model}"), layout, "");
    Plan::build(&s).expect("plan builds")
}

#[test]
fn scmoe_plan_overlaps_dispatch_with_attention_and_combine_with_dense_mlp() {
    for layout in ["ep = 2", "dp = 2\nep = 2"] {
        let p = plan(SCMOE, "top_k = 1\n[model.backbone]\nn_heads = 2\nd_mlp = 12", layout);
        for rp in &p.ranks {
            for l in 0..3u32 {
                let (attn, mlp) = attn_and_mlp(rp, l, Pass::Forward);
                let dispatch = op_id(rp, &format!("L{l}.dispatch_a2a"));
                assert_independent_and_first(rp, dispatch, &attn, "forward dispatch");
                // The routing that feeds it is issued before attention too.
                for n in ["ln_moe", "gate", "route", "dispatch"] {
                    assert!(op_id(rp, &format!("L{l}.{n}")) < attn[0], "L{l}.{n} is issued after attention");
                }
                let combine = op_id(rp, &format!("L{l}.combine_a2a"));
                assert_independent_and_first(rp, combine, &mlp, "forward combine");
                // The combine that adds the routed rows waits for both.
                let add = ancestors(rp, op_id(rp, &format!("L{l}.combine")));
                assert!(add.contains(&combine) && mlp.iter().all(|o| add.contains(o)));

                let (attn_b, mlp_b) = attn_and_mlp(rp, l, Pass::Backward);
                assert_independent_and_first(rp, op_id(rp, &format!("L{l}.combine_a2a_bwd")), &mlp_b, "backward combine");
                assert_independent_and_first(rp, op_id(rp, &format!("L{l}.dispatch_a2a_bwd")), &attn_b, "backward dispatch");
            }
        }
    }
}

#[test]
fn dgmoe_plan_overlaps_the_shortcut_dispatch_with_attention() {
    for layout in ["ep = 2", "dp = 2\nep = 2"] {
        let p = plan(DGMOE, "[model.backbone]\nn_heads = 2\nd_mlp = 12", layout);
        for rp in &p.ranks {
            for l in 0..3u32 {
                let (attn, mlp) = attn_and_mlp(rp, l, Pass::Forward);
                let mut compute = attn.clone();
                compute.extend(&mlp);
                assert_independent_and_first(rp, op_id(rp, &format!("L{l}.sc_dispatch_a2a")), &compute, "shortcut dispatch");
                // The current gate's dispatch needs the block's output so far.
                let cur = ancestors(rp, op_id(rp, &format!("L{l}.cur_dispatch_a2a")));
                assert!(attn.iter().chain(&mlp).all(|o| cur.contains(o)), "L{l}.cur_dispatch_a2a must follow attention and MLP");
                // The shortcut experts are issued before the current dispatch completes: they do
                // not wait for it.
                let sc_gemm = ancestors(rp, op_id(rp, &format!("L{l}.sc_expert_gemm1")));
                assert!(!sc_gemm.contains(&op_id(rp, &format!("L{l}.cur_dispatch_a2a"))));
                let (attn_b, _) = attn_and_mlp(rp, l, Pass::Backward);
                assert_independent_and_first(rp, op_id(rp, &format!("L{l}.sc_dispatch_a2a_bwd")), &attn_b, "backward shortcut dispatch");
            }
        }
    }
}

#[test]
fn dgmoe_experts_are_shared_by_both_gates() {
    let p = plan(DGMOE, "[model.backbone]\nn_heads = 2", "ep = 2");
    let rp = &p.ranks[0];
    let experts: Vec<&str> = rp.params.iter().filter(|x| x.expert).map(|x| rp.buffer(x.value).name.as_str()).collect();
    assert_eq!(experts.len(), 3 * 4, "one w1, b1, w2, b2 per layer: {experts:?}");
    // Each gate has capacity ceil(1.25 * 1 * 32 / 4) = 10 rows per expert; both read the same weights.
    for prefix in ["sc_", "cur_"] {
        let gemm = rp.ops.iter().find(|o| o.name == format!("L0.{prefix}expert_gemm1")).unwrap();
        let w1 = rp.buffer_id("L0.expert.w1").unwrap();
        assert!(gemm.reads.contains(&w1), "{prefix} branch does not read L0.expert.w1");
        let ein = rp.buffer(rp.buffer_id(&format!("L0.{prefix}expert.in")).unwrap());
        assert_eq!(ein.elems, 2 * 10 * 16);
    }
}

// ---------------------------------------------------------------------------------------------
// Spec rules and shipped experiments
// ---------------------------------------------------------------------------------------------

fn problems(variant: &str, model: &str, layout: &str) -> Vec<moelab::spec::Problem> {
    let text = format!(
        "name = \"t\"\n{variant}[model]\nd_model = 16\nd_ffn = 24\nn_experts = 4\ntokens_per_rank = 16\n{model}\n[layout]\n{layout}\n"
    );
    match from_toml_str(&text) {
        Ok(_) => panic!("expected a rejection:\n{text}"),
        Err(e) => e.problems().to_vec(),
    }
}

fn has(problems: &[moelab::spec::Problem], field: &str, needles: &[&str]) {
    let p = problems.iter().find(|p| p.field == field).unwrap_or_else(|| panic!("no problem on {field}: {problems:?}"));
    let text = format!("{} (fix: {})", p.message, p.fix);
    for n in needles {
        assert!(text.contains(n), "{field}: expected {n:?} in {text}");
    }
}

#[test]
fn scmoe_requires_attention_and_a_dense_mlp() {
    has(&problems(SCMOE, "", ""), "model.backbone", &["scmoe", "attention and a dense MLP", "no [model.backbone]", "n_heads = 4", "d_mlp = 24"]);
    has(&problems(SCMOE, "[model.backbone]\nn_heads = 2", ""), "model.backbone", &["d_mlp=0", "n_heads = 2"]);
    has(&problems(SCMOE, "[model.backbone]\nd_mlp = 8", ""), "model.backbone", &["n_heads=0", "d_mlp = 8"]);
    has(&problems(SCMOE, "[model.backbone]\nn_heads = 2\nd_mlp = 8", "tp = 2"), "layout.tp", &["scmoe", "tp=2", "tp = 1"]);
}

#[test]
fn dgmoe_requires_two_top1_gates_and_attention() {
    has(&problems(DGMOE, "top_k = 1\n[model.backbone]\nn_heads = 2", ""), "model.top_k", &["two top-1 gates", "top_k=1", "top_k = 2"]);
    has(&problems(DGMOE, "", ""), "model.backbone", &["dgmoe", "attention", "n_heads = 4"]);
    has(&problems(DGMOE, "[model.backbone]\nd_mlp = 8", ""), "model.backbone", &["n_heads=0"]);
    has(&problems(DGMOE, "renormalize = true\n[model.backbone]\nn_heads = 2", ""), "model.renormalize", &["renormalize = false"]);
    has(&problems(DGMOE, "[model.backbone]\nn_heads = 2", "pp = 2"), "layout.pp", &["dgmoe", "pp = 1"]);
}

#[test]
fn shipped_experiments_run() {
    for (file, variant) in [("scmoe.toml", "scmoe"), ("dgmoe.toml", "dgmoe")] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments").join(file);
        let s = load_file(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.variant.as_str(), variant);
        assert!(s.world() > 1, "{file} should exercise expert parallelism");
        let mut rt = runtime(&s, &[], false);
        // The same batch every step: Adam must bring its loss down.
        let first = rt.step(false, Some(0)).expect("step").loss;
        let mut last = first;
        for _ in 0..4 {
            last = rt.step(false, Some(0)).expect("step").loss;
        }
        assert!(first.is_finite() && last.is_finite() && last < first, "{file}: loss {first} -> {last}");
    }
}

/// On one rank (no collectives, ops complete in issue order) the plan's memory replay is
/// exact. With expert parallelism the comm stream runs ahead of or behind compute, so the
/// tracked peak moves by a few hundred bytes either way and is not compared here.
#[test]
fn plan_predicts_the_tracked_peak_memory_on_one_rank() {
    use moelab::plan::memory::predict;
    for (variant, model) in [(SCMOE, SC_MODEL), (DGMOE, DG_MODEL), (DGMOE, "[model.backbone]\nn_heads = 2\nd_mlp = 12")] {
        for run in ["", "mode = \"inference\""] {
            let s = vspec(variant, &format!("tokens_per_rank = 32\nseq_len = 8\nn_layers = 2\n{model}"), "", run);
            let mut rt = runtime(&s, &[], false);
            for i in 0..2 {
                rt.step(i > 0, None).expect("step");
            }
            let (peak, at_peak) = rt.tracked_peaks()[0];
            let p = predict(&rt.plan().ranks[0]);
            assert_eq!(peak, p.peak_total, "{variant} {run}: tracked peak vs plan");
            assert_eq!(at_peak, p.at_peak, "{variant} {run}: categories at peak");
        }
    }
}
