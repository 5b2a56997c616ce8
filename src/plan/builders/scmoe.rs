//! ScMoE: shortcut-connected MoE (Cai et al., "Shortcut-connected Expert Parallelism for
//! Accelerating Mixture of Experts", arXiv 2404.05019), whose all-to-alls overlap the dense
//! branch of the block.
//!
//! Block `l` (pre-norm), with `x_prev` the shortcut (block `l-1`'s `x_attn`; the block's own
//! input `x` for `l = 0`):
//!
//! ```text
//! x_attn = x + Attn(LN(x))
//! out    = x_attn + DenseMLP(LN(x_attn)) + RoutedMoE(LN(x_prev))
//! ```
//!
//! The routed input exists before the block starts, so the op list issues, per layer:
//! LN/gate/route/stats all-gather/dispatch and the dispatch all-to-all, then attention (runs
//! while the dispatch all-to-all is in flight), then the experts and the combine all-to-all,
//! then the dense MLP (runs while the combine all-to-all is in flight), then the combine that
//! adds the routed rows into the dense branch's output. Backward mirrors it: the combine
//! all-to-all's backward overlaps the dense MLP's backward and the dispatch all-to-all's
//! backward overlaps the attention's backward.
//!
//! This file also holds the routed-branch phases ([`route_dispatch`], [`experts`],
//! [`combine`] and their backwards) that DGMoE reuses. With an empty prefix they name ops and
//! buffers exactly as the top-k builder does (`L0.route.idx`, `L0.moe.out`, ...).

use super::blocks::{self, AttnSaved, LnSaved, MlpSaved};
use super::topk::{a2a, expert_param, moe_dims};
use super::{DataExpertGroups, PlanError};
use crate::math::linalg::gemm_flops;
use crate::plan::ops::MoeDims;
use crate::plan::{BufId, OpKind, ParamInit, Plan, RankBuilder, RankPlan};
use crate::spec::{Capacity, ExperimentSpec, Mode};
use crate::taxonomy::{MemCategory as Mc, Pass, Stage};

/// Build the ScMoE plan for every rank.
pub fn build(spec: &ExperimentSpec) -> Result<Plan, PlanError> {
    let (heads, d_mlp) = spec.model.backbone.as_ref().map_or((0, 0), |bb| (bb.n_heads, bb.d_mlp));
    if heads == 0 || d_mlp == 0 {
        return Err(PlanError::Invalid(format!(
            "variant scmoe needs attention and a dense MLP in every block (model.backbone n_heads={heads}, d_mlp={d_mlp})"
        )));
    }
    let groups = DataExpertGroups::new(spec.layout.dp, spec.layout.ep);
    let ranks = (0..spec.world()).map(|r| build_rank(spec, &groups, r, heads, d_mlp)).collect();
    Ok(Plan { spec: spec.clone(), groups: groups.groups.clone(), ranks })
}

/// What one ScMoE block's backward needs.
struct Layer {
    routed: Routed,
    experts: ExpertsOut,
    weights: ExpertParams,
    attn: AttnSaved,
    mlp: MlpSaved,
}

fn build_rank(spec: &ExperimentSpec, groups: &DataExpertGroups, rank: usize, heads: usize, d_mlp: usize) -> RankPlan {
    let training = spec.run.mode == Mode::Training;
    let mut b = RankBuilder::new(rank as u32, training, spec.model.dtype.size());
    let (x0, target) = load_batch(&mut b, spec, rank);
    let (t, m, k) = (spec.tokens_per_rank(), spec.model.d_model, spec.model.top_k);

    let mut x = x0;
    // Layer 0's routed branch reads the block's own input.
    let mut shortcut = x0;
    let mut layers: Vec<Layer> = Vec::new();
    for layer in 0..spec.model.n_layers {
        b.set_layer(Some(layer as u32));
        // Routing and the dispatch all-to-all first: they depend only on the shortcut.
        let routed = route_dispatch(&mut b, spec, groups, rank, layer, "", k, shortcut);
        let (x_attn, attn) = blocks::attention(&mut b, spec, layer, x, heads);
        let weights = ExpertParams::new(&mut b, spec, layer, &routed.dims);
        let ex = experts(&mut b, spec, groups, rank, layer, &routed, &weights);
        // The dense MLP (the paper's shared expert on the current representation) runs while
        // the combine all-to-all is in flight; the combine then adds the routed rows to it.
        let (mlp_out, mlp) = blocks::dense_mlp(&mut b, spec, layer, x_attn, d_mlp);
        x = combine(&mut b, &routed, &ex, mlp_out, format!("L{layer}.moe.out"));
        shortcut = x_attn;
        layers.push(Layer { routed, experts: ex, weights, attn, mlp });
    }
    let dy = loss(&mut b, spec, x, target);

    if let Some(mut grad) = dy {
        // The routed branch of layer l + 1 read this layer's x_attn: its LayerNorm backward
        // waits until this layer's dense-MLP backward has produced d(x_attn), and adds into it.
        let mut pending: Option<(usize, BufId)> = None;
        for (layer, s) in layers.iter().enumerate().rev() {
            b.set_layer(Some(layer as u32));
            let cg = combine_bwd(&mut b, groups, rank, layer, &s.routed, &s.experts, grad);
            let mut d_attn = blocks::dense_mlp_bwd(&mut b, spec, layer, &s.mlp, grad);
            if let Some((next, dxm)) = pending.take() {
                d_attn = shortcut_ln_bwd(&mut b, next, &layers[next].routed, dxm, d_attn, t, m);
                b.set_layer(Some(layer as u32));
            }
            let dsend = experts_bwd(&mut b, spec, groups, rank, layer, &s.routed, &s.experts, &s.weights, false, cg.dback);
            grad = blocks::attention_bwd(&mut b, spec, layer, &s.attn, d_attn);
            let dxm = route_bwd(&mut b, spec, layer, &s.routed, dsend, cg.dweights);
            pending = Some((layer, dxm));
        }
        if let Some((first, dxm)) = pending {
            // Layer 0's routed branch read the model input.
            shortcut_ln_bwd(&mut b, first, &layers[first].routed, dxm, grad, t, m);
        }
        let dense = (spec.world() > 1).then(|| groups.world());
        let expert = (spec.layout.dp > 1).then(|| groups.edp_group(rank));
        blocks::update(&mut b, spec, dense, expert);
    }
    b.finish()
}

/// The `load_batch` op of `rank`; returns (x, target), both `[T, M]`.
pub(super) fn load_batch(b: &mut RankBuilder, spec: &ExperimentSpec, rank: usize) -> (BufId, BufId) {
    let (t, m) = (spec.tokens_per_rank(), spec.model.d_model);
    let x0 = b.buf("input.x", t * m, Mc::Inputs);
    let target = b.buf("input.target", t * m, Mc::Inputs);
    let batch = t / spec.seq_len();
    b.op("load_batch", Stage::Data, Pass::Forward,
        OpKind::LoadBatch { x: x0, target, shard: rank, batch, seq: spec.seq_len(), d_model: m }, 0, 8 * (t * m) as u64);
    (x0, target)
}

/// The loss op on the model output `y`; returns its gradient buffer when training.
pub(super) fn loss(b: &mut RankBuilder, spec: &ExperimentSpec, y: BufId, target: BufId) -> Option<BufId> {
    let (t, m) = (spec.tokens_per_rank(), spec.model.d_model);
    let training = spec.run.mode == Mode::Training;
    b.set_layer(None);
    let loss = b.buf("loss", 1, Mc::Activations);
    let dy = training.then(|| b.buf("loss.dy", t * m, Mc::Activations));
    b.op("loss", Stage::Loss, Pass::Forward, OpKind::Loss { y, target, loss, dy, n_global: t * spec.world(), d_model: m },
        3 * (t * m) as u64, 12 * (t * m) as u64);
    dy
}

/// Routing geometry of a branch choosing `k` experts per token: top-k's geometry with its
/// capacity `ceil(cf * k * T_global / E)` computed for this `k`.
pub(super) fn branch_dims(spec: &ExperimentSpec, groups: &DataExpertGroups, rank: usize, k: usize) -> MoeDims {
    let mut dims = moe_dims(spec, groups, rank);
    if dims.top_k != k {
        dims.top_k = k;
        if let Capacity::Factor(cf) = dims.capacity {
            let (t, ep) = (dims.tokens, dims.ep_peers.len());
            let c = ((cf * (k * t * dims.data_world) as f64 / dims.n_experts as f64).ceil() as usize).max(1);
            dims.rows_per_expert = Some(c.min(t * ep));
        }
    }
    dims
}

/// The expert weights of one layer, shared by every branch routed into them.
pub(super) struct ExpertParams {
    w1: BufId,
    b1: BufId,
    w2: BufId,
    b2: BufId,
}

impl ExpertParams {
    /// This rank's slice of layer `layer`'s experts (named and drawn as top-k's).
    pub(super) fn new(b: &mut RankBuilder, spec: &ExperimentSpec, layer: usize, dims: &MoeDims) -> Self {
        let (m, f) = (dims.d_model, spec.model.d_ffn);
        let w1 = expert_param(b, layer, "w1", dims, m * f, 1.0 / (m as f32).sqrt());
        let b1 = expert_param(b, layer, "b1", dims, f, 0.02);
        let w2 = expert_param(b, layer, "w2", dims, f * m, 1.0 / (f as f32).sqrt());
        let b2 = expert_param(b, layer, "b2", dims, m, 0.02);
        ExpertParams { w1, b1, w2, b2 }
    }
}

/// One routed branch of a layer after its dispatch: LN -> gate -> route -> all-gather ->
/// dispatch -> all-to-all. Names carry `prefix` (empty for top-k's names).
pub(super) struct Routed {
    prefix: &'static str,
    /// Routing geometry of the branch.
    pub(super) dims: MoeDims,
    ln: LnSaved,
    wg: BufId,
    probs: BufId,
    idx: BufId,
    weights: BufId,
    gathered: BufId,
    send_counts: BufId,
    slots: BufId,
    recv: BufId,
}

impl Routed {
    fn rows(&self) -> usize {
        self.dims.rows_per_expert.unwrap_or(self.dims.tokens * self.dims.ep_peers.len())
    }
    /// A buffer sized by routing: dynamic (an upper bound) when dropless.
    fn route_buf(&self, b: &mut RankBuilder, name: String, elems: usize, cat: Mc) -> BufId {
        if self.dims.rows_per_expert.is_none() { b.dyn_buf(name, elems, cat) } else { b.buf(name, elems, cat) }
    }
}

/// What a branch's expert phase leaves for the combine and the backward.
pub(super) struct ExpertsOut {
    ein: BufId,
    h: BufId,
    a: BufId,
    back: BufId,
}

/// Gradients the combine's backward hands on.
pub(super) struct CombineGrads {
    /// Gradient of the gate weights `[T, k]`.
    pub(super) dweights: BufId,
    /// Gradient of the expert outputs, received by the experts' owners.
    pub(super) dback: BufId,
}

/// Route `x` (`[T, M]`) with `k` choices and send the kept rows to their experts' owners.
#[allow(clippy::too_many_arguments)]
pub(super) fn route_dispatch(b: &mut RankBuilder, spec: &ExperimentSpec, groups: &DataExpertGroups, rank: usize, layer: usize,
    prefix: &'static str, k: usize, x: BufId) -> Routed {
    let dims = branch_dims(spec, groups, rank, k);
    let (t, m, e) = (dims.tokens, dims.d_model, dims.n_experts);
    let (ep, el) = (dims.ep_peers.len(), dims.local_experts());
    let p = prefix;
    let ln = blocks::layernorm(b, &format!("{p}ln_moe"), layer, x, t, m);
    let wg = b.param(&format!("L{layer}.{p}gate.w"), m * e,
        ParamInit { tag: format!("{p}gate.w"), layer: layer as u32, experts: None, mean: 0.0, std: 1.0 / (m as f32).sqrt() }, false);
    let logits = b.buf(format!("L{layer}.{p}gate.logits"), t * e, Mc::Activations);
    b.op(format!("{p}gate"), Stage::Gate, Pass::Forward,
        OpKind::Linear { x: ln.y, w: wg, bias: None, residual: None, y: logits, rows: t, d_in: m, d_out: e },
        gemm_flops(t, m, e), 4 * (t * m + m * e + t * e) as u64);
    let probs = b.buf(format!("L{layer}.{p}route.probs"), t * e, Mc::Activations);
    let idx = b.index_buf(format!("L{layer}.{p}route.idx"), t * k, Mc::Activations);
    let weights = b.buf(format!("L{layer}.{p}route.weights"), t * k, Mc::Activations);
    let stats = b.buf(format!("L{layer}.{p}route.stats"), (k + 1) * e, Mc::CommBuffers);
    b.op(format!("{p}route"), Stage::Topk, Pass::Forward,
        OpKind::Route { logits, probs, idx, weights, stats, n_experts: e, top_k: k, renormalize: spec.model.renormalize },
        (t * e * 6) as u64, 4 * (3 * t * e + 2 * t * k) as u64);
    let gathered = if dims.data_world > 1 {
        let g = b.buf(format!("L{layer}.{p}route.gathered"), dims.data_world * (k + 1) * e, Mc::CommBuffers);
        let bytes = b.f32_bytes_of(stats);
        b.op(format!("{p}stats_allgather"), Stage::AllGather, Pass::Forward, OpKind::AllGather { group: groups.world(), send: stats, recv: g },
            0, bytes);
        g
    } else {
        stats
    };
    let send = b.buf(format!("L{layer}.{p}moe.send"), t * k * m, Mc::CommBuffers);
    let send_counts = b.index_buf(format!("L{layer}.{p}moe.send_counts"), ep, Mc::CommBuffers);
    let slots = b.index_buf(format!("L{layer}.{p}moe.slots"), t * k, Mc::Activations);
    b.op(format!("{p}dispatch"), Stage::Permute, Pass::Forward,
        OpKind::Dispatch { x: ln.y, idx, gathered, send, send_counts, slots, dims: dims.clone() }, 0, 8 * (t * k * m) as u64);
    let mut r = Routed { prefix, dims, ln, wg, probs, idx, weights, gathered, send_counts, slots, recv: send };
    if ep > 1 {
        let rows = r.rows();
        let recv = r.route_buf(b, format!("L{layer}.{p}moe.recv"), el * rows * m, Mc::CommBuffers);
        a2a(b, &format!("{p}dispatch_a2a"), Pass::Forward, groups.ep_group(rank), send, send_counts, recv, m);
        r.recv = recv;
    }
    r
}

/// Expert layout, fc1, activation, fc2, unlayout and the all-to-all back to the tokens' ranks.
pub(super) fn experts(b: &mut RankBuilder, spec: &ExperimentSpec, groups: &DataExpertGroups, rank: usize, layer: usize, r: &Routed,
    w: &ExpertParams) -> ExpertsOut {
    let d = &r.dims;
    let (t, m, k, f) = (d.tokens, d.d_model, d.top_k, spec.model.d_ffn);
    let (ep, el, rows) = (d.ep_peers.len(), d.local_experts(), r.rows());
    let p = r.prefix;
    let ein = r.route_buf(b, format!("L{layer}.{p}expert.in"), el * rows * m, Mc::Activations);
    b.op(format!("{p}expert_layout"), Stage::Permute, Pass::Forward,
        OpKind::ExpertLayout { recv: r.recv, gathered: r.gathered, out: ein, dims: d.clone() }, 0, 8 * (el * rows * m) as u64);
    let h = r.route_buf(b, format!("L{layer}.{p}expert.h"), el * rows * f, Mc::Activations);
    b.op(format!("{p}expert_gemm1"), Stage::ExpertGemm1, Pass::Forward,
        OpKind::ExpertLinear { x: ein, w: w.w1, bias: w.b1, y: h, n_local: el, d_in: m, d_out: f },
        el as u64 * gemm_flops(rows, m, f), 4 * (el * (rows * m + m * f + rows * f)) as u64);
    let a = r.route_buf(b, format!("L{layer}.{p}expert.act"), el * rows * f, Mc::Activations);
    b.op(format!("{p}expert_act"), Stage::Act, Pass::Forward, OpKind::Act { h, a, act: spec.model.activation },
        8 * (el * rows * f) as u64, 8 * (el * rows * f) as u64);
    let y = r.route_buf(b, format!("L{layer}.{p}expert.out"), el * rows * m, Mc::Temporaries);
    b.op(format!("{p}expert_gemm2"), Stage::ExpertGemm2, Pass::Forward,
        OpKind::ExpertLinear { x: a, w: w.w2, bias: w.b2, y, n_local: el, d_in: f, d_out: m },
        el as u64 * gemm_flops(rows, f, m), 4 * (el * (rows * m + m * f + rows * f)) as u64);
    let back_send = r.route_buf(b, format!("L{layer}.{p}moe.back_send"), el * rows * m, Mc::CommBuffers);
    let back_counts = b.index_buf(format!("L{layer}.{p}moe.back_counts"), ep, Mc::CommBuffers);
    b.op(format!("{p}expert_unlayout"), Stage::Permute, Pass::Forward,
        OpKind::ExpertUnlayout { input: y, gathered: r.gathered, send: back_send, send_counts: back_counts, dims: d.clone() }, 0,
        8 * (el * rows * m) as u64);
    let back = if ep > 1 {
        let recv = b.buf(format!("L{layer}.{p}moe.back"), t * k * m, Mc::CommBuffers);
        a2a(b, &format!("{p}combine_a2a"), Pass::Forward, groups.ep_group(rank), back_send, back_counts, recv, m);
        recv
    } else {
        back_send
    };
    ExpertsOut { ein, h, a, back }
}

/// `out = residual + sum_j w[t, j] * expert_out[t, j]`, into a fresh buffer named `out_name`.
pub(super) fn combine(b: &mut RankBuilder, r: &Routed, e: &ExpertsOut, residual: BufId, out_name: String) -> BufId {
    let (t, m, k) = (r.dims.tokens, r.dims.d_model, r.dims.top_k);
    let out = b.buf(out_name, t * m, Mc::Activations);
    b.op(format!("{}combine", r.prefix), Stage::Combine, Pass::Forward,
        OpKind::Combine { back: e.back, slots: r.slots, weights: r.weights, residual, out, dims: r.dims.clone() },
        2 * (t * k * m) as u64, 4 * (t * k * m + 2 * t * m) as u64);
    out
}

/// Backward of [`combine`] for output gradient `dout`, and the all-to-all of the expert
/// outputs' gradient to the experts' owners.
pub(super) fn combine_bwd(b: &mut RankBuilder, groups: &DataExpertGroups, rank: usize, layer: usize, r: &Routed, e: &ExpertsOut,
    dout: BufId) -> CombineGrads {
    let d = &r.dims;
    let (t, m, k) = (d.tokens, d.d_model, d.top_k);
    let (ep, el, rows) = (d.ep_peers.len(), d.local_experts(), r.rows());
    let p = r.prefix;
    let dback = b.buf(format!("L{layer}.{p}moe.dback"), t * k * m, Mc::CommBuffers);
    let dweights = b.buf(format!("L{layer}.{p}route.dweights"), t * k, Mc::Activations);
    b.op(format!("{p}combine_bwd"), Stage::Combine, Pass::Backward,
        OpKind::CombineBwd { dout, back: e.back, slots: r.slots, weights: r.weights, dback, dweights, dims: d.clone() },
        4 * (t * k * m) as u64, 4 * (2 * t * k * m + t * m) as u64);
    let dback = if ep > 1 {
        let recv = r.route_buf(b, format!("L{layer}.{p}moe.dback_recv"), el * rows * m, Mc::CommBuffers);
        a2a(b, &format!("{p}combine_a2a_bwd"), Pass::Backward, groups.ep_group(rank), dback, r.send_counts, recv, m);
        recv
    } else {
        dback
    };
    CombineGrads { dweights, dback }
}

/// Backward through the experts and the all-to-all of the dispatched rows' gradient back to
/// the tokens' ranks; returns that gradient (send order). The weight gradients are written,
/// or added to what an earlier branch wrote when `accumulate` (experts shared by branches).
#[allow(clippy::too_many_arguments)]
pub(super) fn experts_bwd(b: &mut RankBuilder, spec: &ExperimentSpec, groups: &DataExpertGroups, rank: usize, layer: usize, r: &Routed,
    e: &ExpertsOut, w: &ExpertParams, accumulate: bool, dback: BufId) -> BufId {
    let d = &r.dims;
    let (t, m, k, f) = (d.tokens, d.d_model, d.top_k, spec.model.d_ffn);
    let (ep, el, rows) = (d.ep_peers.len(), d.local_experts(), r.rows());
    let p = r.prefix;
    let dy = r.route_buf(b, format!("L{layer}.{p}expert.dout"), el * rows * m, Mc::Temporaries);
    b.op(format!("{p}expert_layout_bwd"), Stage::Permute, Pass::Backward,
        OpKind::ExpertLayout { recv: dback, gathered: r.gathered, out: dy, dims: d.clone() }, 0, 8 * (el * rows * m) as u64);
    let da = r.route_buf(b, format!("L{layer}.{p}expert.dact"), el * rows * f, Mc::Temporaries);
    let (dw, dbias) = (b.grad(w.w2), b.grad(w.b2));
    b.op(format!("{p}expert_gemm2_bwd"), Stage::ExpertGemm2, Pass::Backward,
        expert_linear_bwd(e.a, w.w2, dy, da, dw, dbias, el, f, m, accumulate),
        2 * el as u64 * gemm_flops(rows, f, m), 8 * (el * (rows * m + m * f + rows * f)) as u64);
    let dh = r.route_buf(b, format!("L{layer}.{p}expert.dh"), el * rows * f, Mc::Temporaries);
    b.op(format!("{p}expert_act_bwd"), Stage::Act, Pass::Backward, OpKind::ActBwd { h: e.h, da, dh, act: spec.model.activation },
        10 * (el * rows * f) as u64, 12 * (el * rows * f) as u64);
    let dein = r.route_buf(b, format!("L{layer}.{p}expert.din"), el * rows * m, Mc::Temporaries);
    let (dw, dbias) = (b.grad(w.w1), b.grad(w.b1));
    b.op(format!("{p}expert_gemm1_bwd"), Stage::ExpertGemm1, Pass::Backward,
        expert_linear_bwd(e.ein, w.w1, dh, dein, dw, dbias, el, m, f, accumulate),
        2 * el as u64 * gemm_flops(rows, m, f), 8 * (el * (rows * m + m * f + rows * f)) as u64);
    let dsend_back = r.route_buf(b, format!("L{layer}.{p}moe.dsend_back"), el * rows * m, Mc::CommBuffers);
    let dcounts = b.index_buf(format!("L{layer}.{p}moe.dsend_counts"), ep, Mc::CommBuffers);
    b.op(format!("{p}expert_unlayout_bwd"), Stage::Permute, Pass::Backward,
        OpKind::ExpertUnlayout { input: dein, gathered: r.gathered, send: dsend_back, send_counts: dcounts, dims: d.clone() }, 0,
        8 * (el * rows * m) as u64);
    if ep > 1 {
        let dsend = b.buf(format!("L{layer}.{p}moe.dsend"), t * k * m, Mc::CommBuffers);
        a2a(b, &format!("{p}dispatch_a2a_bwd"), Pass::Backward, groups.ep_group(rank), dsend_back, dcounts, dsend, m);
        dsend
    } else {
        dsend_back
    }
}

/// [`OpKind::ExpertLinearBwd`], or [`OpKind::ExpertLinearBwdAcc`] adding into the gradients.
#[allow(clippy::too_many_arguments)]
fn expert_linear_bwd(x: BufId, w: BufId, dy: BufId, dx: BufId, dw: BufId, dbias: BufId, n_local: usize, d_in: usize, d_out: usize,
    accumulate: bool) -> OpKind {
    if accumulate {
        OpKind::ExpertLinearBwdAcc { x, w, dy, dx, dw, dbias, n_local, d_in, d_out, accumulate }
    } else {
        OpKind::ExpertLinearBwd { x, w, dy, dx, dw, dbias, n_local, d_in, d_out }
    }
}

/// Backward of dispatch, routing (with the aux loss) and the gate; returns the gradient of
/// the branch's LayerNorm output, to finish with [`shortcut_ln_bwd`].
pub(super) fn route_bwd(b: &mut RankBuilder, spec: &ExperimentSpec, layer: usize, r: &Routed, dsend: BufId, dweights: BufId) -> BufId {
    let d = &r.dims;
    let (t, m, e, k) = (d.tokens, d.d_model, d.n_experts, d.top_k);
    let p = r.prefix;
    let dxm = b.buf(format!("L{layer}.{p}moe.dx_ln"), t * m, Mc::Activations);
    b.op(format!("{p}dispatch_bwd"), Stage::Permute, Pass::Backward, OpKind::DispatchBwd { dsend, slots: r.slots, dx: dxm, dims: d.clone() },
        (t * k * m) as u64, 4 * ((t * k * m) + (t * m)) as u64);
    let dlogits = b.buf(format!("L{layer}.{p}gate.dlogits"), t * e, Mc::Activations);
    b.op(format!("{p}route_bwd"), Stage::Topk, Pass::Backward,
        OpKind::RouteBwd { probs: r.probs, idx: r.idx, dweights, gathered: r.gathered, dlogits, dims: d.clone(),
            renormalize: spec.model.renormalize, aux_coef: spec.model.aux_loss_coef as f32 },
        (t * e * 6) as u64, 4 * (3 * t * e) as u64);
    blocks::linear_bwd(b, &format!("{p}gate"), Stage::Gate, layer, r.ln.y, r.wg, None, dlogits, Some(dxm), t, m, e);
    dxm
}

/// The branch's LayerNorm backward (tagged with the branch's layer `layer`): `LN'(dxm)` plus
/// `residual`, the rest of the gradient of the representation the branch read.
pub(super) fn shortcut_ln_bwd(b: &mut RankBuilder, layer: usize, r: &Routed, dxm: BufId, residual: BufId, t: usize, m: usize) -> BufId {
    b.set_layer(Some(layer as u32));
    blocks::layernorm_bwd(b, &format!("{}ln_moe", r.prefix), layer, &r.ln, dxm, residual, t, m)
}
