//! Reusable pieces of a transformer block's plan (LayerNorm, attention, dense MLP, loss,
//! gradient reduction and Adam), shared by every variant's builder.

use super::tensor::{self, column_linear, row_linear, TpShard};
use crate::math::linalg::gemm_flops;
use crate::plan::{AttnDims, BufId, GroupId, OpKind, ParamInit, RankBuilder};
use crate::spec::{Activation, ExperimentSpec};
use crate::taxonomy::{MemCategory as Mc, Pass, Stage};

/// Saved state of a LayerNorm for its backward.
pub struct LnSaved {
    /// Input.
    pub x: BufId,
    /// Gain.
    pub gamma: BufId,
    /// Shift.
    pub beta: BufId,
    /// (mean, rstd) per row.
    pub stats: BufId,
    /// Output.
    pub y: BufId,
}

fn init(tag: &str, layer: usize, mean: f32, std: f32) -> ParamInit {
    ParamInit { tag: tag.into(), layer: layer as u32, experts: None, mean, std }
}

/// `y = LN(x)` with fresh params named `{name}.gamma/beta`.
pub fn layernorm(b: &mut RankBuilder, name: &str, layer: usize, x: BufId, t: usize, m: usize) -> LnSaved {
    let (gamma, beta) = layernorm_params(b, name, layer, m);
    layernorm_with(b, name, layer, x, gamma, beta, t, m)
}

/// The (gamma, beta) params of a LayerNorm named `name`.
pub fn layernorm_params(b: &mut RankBuilder, name: &str, layer: usize, m: usize) -> (BufId, BufId) {
    let gamma = b.param(&format!("L{layer}.{name}.gamma"), m, init(&format!("{name}.gamma"), layer, 1.0, 0.1), false);
    let beta = b.param(&format!("L{layer}.{name}.beta"), m, init(&format!("{name}.beta"), layer, 0.0, 0.1), false);
    (gamma, beta)
}

/// `y = LN(x)` with existing params (also the recomputation of a checkpointed LayerNorm).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_with(b: &mut RankBuilder, name: &str, layer: usize, x: BufId, gamma: BufId, beta: BufId, t: usize, m: usize) -> LnSaved {
    let y = b.buf(format!("L{layer}.{name}.y"), t * m, Mc::Activations);
    let stats = b.buf(format!("L{layer}.{name}.stats"), t * 2, Mc::Activations);
    let bytes = b.f32_bytes_of(x) * 2;
    b.op(name, Stage::Layernorm, Pass::Forward, OpKind::LayerNorm { x, gamma, beta, y, stats }, 8 * (t * m) as u64, bytes);
    LnSaved { x, gamma, beta, stats, y }
}

/// Backward of a LayerNorm whose output gradient is `dy`, adding the residual gradient.
pub fn layernorm_bwd(b: &mut RankBuilder, name: &str, layer: usize, ln: &LnSaved, dy: BufId, residual: BufId, t: usize, m: usize) -> BufId {
    let dx = b.buf(format!("L{layer}.{name}.dx"), t * m, Mc::Activations);
    let (dgamma, dbeta) = (b.grad(ln.gamma), b.grad(ln.beta));
    let bytes = b.f32_bytes_of(dy) * 4;
    b.op(format!("{name}_bwd"), Stage::Layernorm, Pass::Backward,
        OpKind::LayerNormBwd { x: ln.x, gamma: ln.gamma, stats: ln.stats, dy, residual: Some(residual), dx, dgamma, dbeta },
        12 * (t * m) as u64, bytes);
    dx
}

/// A dense projection op with its params; returns (y, w, bias).
#[allow(clippy::too_many_arguments)]
pub fn linear(b: &mut RankBuilder, name: &str, tag: &str, stage: Stage, layer: usize, x: BufId, residual: Option<BufId>,
    rows: usize, d_in: usize, d_out: usize, with_bias: bool) -> (BufId, BufId, Option<BufId>) {
    let w = b.param(&format!("L{layer}.{tag}.w"), d_in * d_out, init(&format!("{tag}.w"), layer, 0.0, 1.0 / (d_in as f32).sqrt()), false);
    let bias = with_bias.then(|| b.param(&format!("L{layer}.{tag}.b"), d_out, init(&format!("{tag}.b"), layer, 0.0, 0.02), false));
    let y = b.buf(format!("L{layer}.{tag}.y"), rows * d_out, Mc::Activations);
    let bytes = 4 * (rows * d_in + d_in * d_out + rows * d_out) as u64;
    b.op(name, stage, Pass::Forward, OpKind::Linear { x, w, bias, residual, y, rows, d_in, d_out }, gemm_flops(rows, d_in, d_out), bytes);
    (y, w, bias)
}

/// Backward of a projection: returns dx (a fresh buffer, or `into` accumulated).
#[allow(clippy::too_many_arguments)]
pub fn linear_bwd(b: &mut RankBuilder, name: &str, stage: Stage, layer: usize, x: BufId, w: BufId, bias: Option<BufId>, dy: BufId,
    into: Option<BufId>, rows: usize, d_in: usize, d_out: usize) -> BufId {
    let (dx, accumulate_dx) = match into {
        Some(d) => (d, true),
        None => (b.buf(format!("L{layer}.{name}.dx"), rows * d_in, Mc::Activations), false),
    };
    let dw = b.grad(w);
    let dbias = bias.map(|bb| b.grad(bb));
    let bytes = 4 * 2 * (rows * d_in + d_in * d_out + rows * d_out) as u64;
    b.op(format!("{name}_bwd"), stage, Pass::Backward,
        OpKind::LinearBwd { x, w, dy, dx: Some(dx), dw, dbias, accumulate_dx, rows, d_in, d_out },
        2 * gemm_flops(rows, d_in, d_out), bytes);
    dx
}

/// Saved state of an attention sublayer.
pub struct AttnSaved {
    ln: LnSaved,
    wqkv: BufId,
    bqkv: Option<BufId>,
    qkv: BufId,
    probs: BufId,
    ctx: BufId,
    wo: BufId,
    bo: Option<BufId>,
    dims: AttnDims,
    tp: Option<TpShard>,
}

/// `x + Attn(LN(x))`; returns (output, saved).
pub fn attention(b: &mut RankBuilder, spec: &ExperimentSpec, layer: usize, x: BufId, heads: usize) -> (BufId, AttnSaved) {
    attention_tp(b, spec, layer, x, heads, None)
}

/// [`attention`] split by heads over a tensor-parallel group when `tp` is given: QKV
/// column-parallel (this rank's `heads / tp` heads), the output projection row-parallel and
/// all-reduced over the group.
pub fn attention_tp(b: &mut RankBuilder, spec: &ExperimentSpec, layer: usize, x: BufId, heads: usize, tp: Option<&TpShard>)
    -> (BufId, AttnSaved) {
    let (t, m) = (spec.tokens_per_rank(), spec.model.d_model);
    let parts = tp.map_or(1, |s| s.size);
    let (local_heads, local_m) = (heads / parts, m / parts);
    let dims = AttnDims { batch: t / spec.seq_len(), seq: spec.seq_len(), heads: local_heads, d_model: local_m };
    let ln = layernorm(b, "ln_attn", layer, x, t, m);
    let (qkv, wqkv, bqkv) = column_linear(b, "qkv", "attn.qkv", Stage::Attention, layer, ln.y, t, m, 3 * m, 3, tp);
    let probs = b.buf(format!("L{layer}.attn.probs"), dims.batch * local_heads * dims.seq * dims.seq, Mc::Activations);
    let ctx = b.buf(format!("L{layer}.attn.ctx"), t * local_m, Mc::Activations);
    let core = crate::math::attention::AttnShape { batch: dims.batch, seq: dims.seq, heads: local_heads, d_model: local_m };
    b.op("attn_core", Stage::Attention, Pass::Forward, OpKind::AttnCore { qkv, probs, ctx, dims }, core.core_flops(),
        4 * (t * 4 * local_m + core.probs_len()) as u64);
    let (out, wo, bo) = row_linear(b, "attn_out", "attn.out", Stage::Attention, layer, ctx, x, t, m, m, tp);
    (out, AttnSaved { ln, wqkv, bqkv, qkv, probs, ctx, wo, bo, dims, tp: tp.copied() })
}

/// Backward of an attention sublayer given the gradient of its output (replicated over the
/// TP group); with tensor parallelism the partial gradient of the LayerNorm output is
/// all-reduced over the group before the LayerNorm's backward.
pub fn attention_bwd(b: &mut RankBuilder, spec: &ExperimentSpec, layer: usize, s: &AttnSaved, dout: BufId) -> BufId {
    let (t, m) = (spec.tokens_per_rank(), spec.model.d_model);
    let lm = s.dims.d_model;
    let dctx = linear_bwd(b, "attn_out", Stage::Attention, layer, s.ctx, s.wo, s.bo, dout, None, t, lm, m);
    let dqkv = b.buf(format!("L{layer}.attn.dqkv"), t * 3 * lm, Mc::Activations);
    let core = crate::math::attention::AttnShape { batch: s.dims.batch, seq: s.dims.seq, heads: s.dims.heads, d_model: lm };
    b.op("attn_core_bwd", Stage::Attention, Pass::Backward,
        OpKind::AttnCoreBwd { qkv: s.qkv, probs: s.probs, dctx, dqkv, dims: s.dims }, 2 * core.core_flops(),
        4 * (t * 8 * lm + core.probs_len()) as u64);
    let dln = linear_bwd(b, "qkv", Stage::Attention, layer, s.ln.y, s.wqkv, s.bqkv, dqkv, None, t, m, 3 * lm);
    if let Some(tp) = &s.tp {
        tensor::allreduce(b, "attn_dx_allreduce", Pass::Backward, tp, dln);
    }
    layernorm_bwd(b, "ln_attn", layer, &s.ln, dln, dout, t, m)
}

/// Saved state of a dense MLP sublayer.
pub struct MlpSaved {
    ln: LnSaved,
    w1: BufId,
    b1: Option<BufId>,
    h: BufId,
    a: BufId,
    w2: BufId,
    b2: Option<BufId>,
    d_mlp: usize,
    act: Activation,
    tp: Option<TpShard>,
}

/// `x + MLP(LN(x))`.
pub fn dense_mlp(b: &mut RankBuilder, spec: &ExperimentSpec, layer: usize, x: BufId, d_mlp: usize) -> (BufId, MlpSaved) {
    dense_mlp_tp(b, spec, layer, x, d_mlp, None)
}

/// [`dense_mlp`] over a tensor-parallel group when `tp` is given: fc1 column-parallel (this
/// rank's `d_mlp / tp` hidden units), fc2 row-parallel and all-reduced over the group.
pub fn dense_mlp_tp(b: &mut RankBuilder, spec: &ExperimentSpec, layer: usize, x: BufId, d_mlp: usize, tp: Option<&TpShard>)
    -> (BufId, MlpSaved) {
    let (t, m, act) = (spec.tokens_per_rank(), spec.model.d_model, spec.model.activation);
    let f = d_mlp / tp.map_or(1, |s| s.size);
    let ln = layernorm(b, "ln_mlp", layer, x, t, m);
    let (h, w1, b1) = column_linear(b, "mlp_fc1", "mlp.fc1", Stage::DenseMlp, layer, ln.y, t, m, d_mlp, 1, tp);
    let a = b.buf(format!("L{layer}.mlp.act"), t * f, Mc::Activations);
    b.op("mlp_act", Stage::DenseMlp, Pass::Forward, OpKind::Act { h, a, act }, 8 * (t * f) as u64, 8 * (t * f) as u64);
    let (out, w2, b2) = row_linear(b, "mlp_fc2", "mlp.fc2", Stage::DenseMlp, layer, a, x, t, d_mlp, m, tp);
    (out, MlpSaved { ln, w1, b1, h, a, w2, b2, d_mlp: f, act, tp: tp.copied() })
}

/// Backward of a dense MLP sublayer (with tensor parallelism, the partial gradient of the
/// LayerNorm output is all-reduced over the TP group first).
pub fn dense_mlp_bwd(b: &mut RankBuilder, spec: &ExperimentSpec, layer: usize, s: &MlpSaved, dout: BufId) -> BufId {
    let (t, m, f) = (spec.tokens_per_rank(), spec.model.d_model, s.d_mlp);
    let da = linear_bwd(b, "mlp_fc2", Stage::DenseMlp, layer, s.a, s.w2, s.b2, dout, None, t, f, m);
    let dh = b.buf(format!("L{layer}.mlp.dh"), t * f, Mc::Activations);
    b.op("mlp_act_bwd", Stage::DenseMlp, Pass::Backward, OpKind::ActBwd { h: s.h, da, dh, act: s.act }, 10 * (t * f) as u64, 12 * (t * f) as u64);
    let dln = linear_bwd(b, "mlp_fc1", Stage::DenseMlp, layer, s.ln.y, s.w1, s.b1, dh, None, t, m, f);
    if let Some(tp) = &s.tp {
        tensor::allreduce(b, "mlp_dx_allreduce", Pass::Backward, tp, dln);
    }
    layernorm_bwd(b, "ln_mlp", layer, &s.ln, dln, dout, t, m)
}

/// Gradient reduction (dense grads over `dense_group`, expert grads over `expert_group`)
/// followed by Adam over every param.
pub fn update(b: &mut RankBuilder, spec: &ExperimentSpec, dense_group: Option<GroupId>, expert_group: Option<GroupId>) {
    b.set_layer(None);
    let params = b.params().to_vec();
    for (group, expert, name) in [(dense_group, false, "grad_allreduce_dense"), (expert_group, true, "grad_allreduce_expert")] {
        if let Some(g) = group {
            let bufs: Vec<BufId> = params.iter().filter(|p| p.expert == expert).filter_map(|p| p.grad).collect();
            if !bufs.is_empty() {
                let bytes: u64 = bufs.iter().map(|x| b.f32_bytes_of(*x)).sum();
                b.op(name, Stage::AllReduce, Pass::Update, OpKind::AllReduce { group: g, bufs }, 0, bytes);
            }
        }
    }
    let quads: Vec<_> = params.iter().map(|p| {
        let (m, v) = p.moments.expect("training params have moments");
        (p.value, p.grad.expect("training params have grads"), m, v)
    }).collect();
    let bytes: u64 = quads.iter().map(|q| 7 * b.f32_bytes_of(q.0)).sum();
    let flops: u64 = quads.iter().map(|q| 12 * b.elems_of(q.0)).sum();
    b.op("adam", Stage::Optimizer, Pass::Update,
        OpKind::Adam { params: quads, lr: spec.run.lr as f32, beta1: 0.9, beta2: 0.999, eps: 1e-8 }, flops, bytes);
}

/// The routing front of an MoE layer and what its backward needs.
pub struct Routed {
    /// LayerNorm of the MoE input.
    pub ln: LnSaved,
    /// Gate weight `[M, E]`.
    pub wg: BufId,
    /// Softmax probabilities `[T, E]`.
    pub probs: BufId,
    /// Chosen experts `[T, k]`.
    pub idx: BufId,
    /// Gate weights of the choices `[T, k]`.
    pub weights: BufId,
    /// Routing statistics of every data rank (or this rank's own, when it is the only one).
    pub gathered: BufId,
}

/// The routing tail of an MoE layer's backward, [`dispatch_backward`] then [`gate_backward`]:
/// returns the gradient of the MoE sublayer's input (`dout`, the residual's, included).
#[allow(clippy::too_many_arguments)]
pub fn route_backward(b: &mut RankBuilder, spec: &ExperimentSpec, layer: usize, r: &Routed, d: &crate::plan::ops::MoeDims, slots: BufId,
    dsend: BufId, dweights: BufId, dout: BufId) -> BufId {
    let dxm = dispatch_backward(b, layer, d, slots, dsend);
    gate_backward(b, spec, layer, r, d, dweights, dxm, dout)
}

/// `dispatch_bwd`: every token's gradient summed from its dispatched rows `dsend` (the
/// gradient of the `ln_moe` output through the experts).
pub fn dispatch_backward(b: &mut RankBuilder, layer: usize, d: &crate::plan::ops::MoeDims, slots: BufId, dsend: BufId) -> BufId {
    let (t, m, k) = (d.tokens, d.d_model, d.top_k);
    let dxm = b.buf(format!("L{layer}.moe.dx_ln"), t * m, Mc::Activations);
    // t*k rows read, the token gradients written; a dropless `dsend` of ep = 1 is the
    // expert-side buffer, counted at its bound, which the sim scales to the routed rows.
    let dynamic = d.rows_per_expert.is_none() && d.ep_peers.len() == 1;
    let dsend_bytes = if dynamic { b.f32_bytes_of(dsend) } else { 4 * (t * k * m) as u64 };
    let bytes = dsend_bytes + 4 * (t * m) as u64;
    b.op("dispatch_bwd", Stage::Permute, Pass::Backward, OpKind::DispatchBwd { dsend, slots, dx: dxm, dims: d.clone() },
        (t * k * m) as u64, bytes);
    dxm
}

/// Routing (with the aux loss), gate and `ln_moe` backward: `dxm` (the `ln_moe` output's
/// gradient through the experts) gains the gate's share; returns the MoE input's gradient.
#[allow(clippy::too_many_arguments)]
pub fn gate_backward(b: &mut RankBuilder, spec: &ExperimentSpec, layer: usize, r: &Routed, d: &crate::plan::ops::MoeDims, dweights: BufId,
    dxm: BufId, dout: BufId) -> BufId {
    let (t, m, e) = (d.tokens, d.d_model, d.n_experts);
    let dlogits = b.buf(format!("L{layer}.gate.dlogits"), t * e, Mc::Activations);
    b.op("route_bwd", Stage::Topk, Pass::Backward,
        OpKind::RouteBwd { probs: r.probs, idx: r.idx, dweights, gathered: r.gathered, dlogits, dims: d.clone(),
            renormalize: spec.model.renormalize, aux_coef: spec.model.aux_loss_coef as f32 },
        (t * e * 6) as u64, 4 * (3 * t * e) as u64);
    linear_bwd(b, "gate", Stage::Gate, layer, r.ln.y, r.wg, None, dlogits, Some(dxm), t, m, e);
    layernorm_bwd(b, "ln_moe", layer, &r.ln, dxm, dout, t, m)
}

/// The four expert tensors as the expert GEMMs read them, for `n_local` experts: `w1`
/// `[M, F]`, `b1` `[F]`, `w2` `[F, M]`, `b2` `[M]` per expert (parameters, or their gradients).
#[derive(Debug, Clone, Copy)]
pub struct ExpertWeights {
    /// fc1 weight.
    pub w1: BufId,
    /// fc1 bias.
    pub b1: BufId,
    /// fc2 weight.
    pub w2: BufId,
    /// fc2 bias.
    pub b2: BufId,
}

/// The shape of one expert MLP block: `n_local` experts with `rows` rows each (an upper
/// bound when `dynamic`: dropless routing sizes the buffers at run time).
#[derive(Debug, Clone, Copy)]
pub struct ExpertBlock {
    /// Experts in the block.
    pub n_local: usize,
    /// Rows per expert.
    pub rows: usize,
    /// Model width.
    pub m: usize,
    /// Expert hidden width.
    pub f: usize,
    /// Buffers sized by routing.
    pub dynamic: bool,
}

impl ExpertBlock {
    fn buf(&self, b: &mut RankBuilder, name: String, elems: usize, cat: Mc) -> BufId {
        if self.dynamic { b.dyn_buf(name, elems, cat) } else { b.buf(name, elems, cat) }
    }
}

/// An expert MLP forward (`expert_gemm1`, `expert_act`, `expert_gemm2`) over the expert-layout
/// input `x`; returns `(h, a, y)`: pre-activation, activation and output rows.
pub fn expert_mlp_forward(b: &mut RankBuilder, spec: &ExperimentSpec, layer: usize, blk: &ExpertBlock, x: BufId, w: ExpertWeights) -> (BufId, BufId, BufId) {
    let ExpertBlock { n_local: el, rows, m, f, .. } = *blk;
    let h = blk.buf(b, format!("L{layer}.expert.h"), el * rows * f, Mc::Activations);
    b.op("expert_gemm1", Stage::ExpertGemm1, Pass::Forward,
        OpKind::ExpertLinear { x, w: w.w1, bias: w.b1, y: h, n_local: el, d_in: m, d_out: f },
        el as u64 * gemm_flops(rows, m, f), 4 * (el * (rows * m + m * f + rows * f)) as u64);
    let a = blk.buf(b, format!("L{layer}.expert.act"), el * rows * f, Mc::Activations);
    b.op("expert_act", Stage::Act, Pass::Forward, OpKind::Act { h, a, act: spec.model.activation }, 8 * (el * rows * f) as u64,
        8 * (el * rows * f) as u64);
    let y = blk.buf(b, format!("L{layer}.expert.out"), el * rows * m, Mc::Temporaries);
    b.op("expert_gemm2", Stage::ExpertGemm2, Pass::Forward,
        OpKind::ExpertLinear { x: a, w: w.w2, bias: w.b2, y, n_local: el, d_in: f, d_out: m },
        el as u64 * gemm_flops(rows, f, m), 4 * (el * (rows * m + m * f + rows * f)) as u64);
    (h, a, y)
}

/// Backward of [`expert_mlp_forward`] from the output rows' gradient `dy`: writes the weight
/// gradients into `g` and returns the input rows' gradient.
#[allow(clippy::too_many_arguments)]
pub fn expert_mlp_backward(b: &mut RankBuilder, spec: &ExperimentSpec, layer: usize, blk: &ExpertBlock, x: BufId, h: BufId, a: BufId,
    w: ExpertWeights, g: ExpertWeights, dy: BufId) -> BufId {
    let ExpertBlock { n_local: el, rows, m, f, .. } = *blk;
    let da = blk.buf(b, format!("L{layer}.expert.dact"), el * rows * f, Mc::Temporaries);
    b.op("expert_gemm2_bwd", Stage::ExpertGemm2, Pass::Backward,
        OpKind::ExpertLinearBwd { x: a, w: w.w2, dy, dx: da, dw: g.w2, dbias: g.b2, n_local: el, d_in: f, d_out: m },
        2 * el as u64 * gemm_flops(rows, f, m), 8 * (el * (rows * m + m * f + rows * f)) as u64);
    let dh = blk.buf(b, format!("L{layer}.expert.dh"), el * rows * f, Mc::Temporaries);
    b.op("expert_act_bwd", Stage::Act, Pass::Backward, OpKind::ActBwd { h, da, dh, act: spec.model.activation },
        10 * (el * rows * f) as u64, 12 * (el * rows * f) as u64);
    let dein = blk.buf(b, format!("L{layer}.expert.din"), el * rows * m, Mc::Temporaries);
    b.op("expert_gemm1_bwd", Stage::ExpertGemm1, Pass::Backward,
        OpKind::ExpertLinearBwd { x, w: w.w1, dy: dh, dx: dein, dw: g.w1, dbias: g.b1, n_local: el, d_in: m, d_out: f },
        2 * el as u64 * gemm_flops(rows, m, f), 8 * (el * (rows * m + m * f + rows * f)) as u64);
    dein
}

/// The params of an MoE layer's routing front: the `ln_moe` LayerNorm and the gate.
#[derive(Debug, Clone, Copy)]
pub struct GateParams {
    /// LayerNorm gain.
    pub gamma: BufId,
    /// LayerNorm shift.
    pub beta: BufId,
    /// Gate weight `[M, E]`.
    pub wg: BufId,
}

/// Create the routing front's params (`ln_moe` gamma and beta, then the gate weight).
pub fn gate_params(b: &mut RankBuilder, layer: usize, m: usize, e: usize) -> GateParams {
    let (gamma, beta) = layernorm_params(b, "ln_moe", layer, m);
    let wg = b.param(&format!("L{layer}.gate.w"), m * e,
        ParamInit { tag: "gate.w".into(), layer: layer as u32, experts: None, mean: 0.0, std: 1.0 / (m as f32).sqrt() }, false);
    GateParams { gamma, beta, wg }
}

/// `ln_moe` -> `gate` -> `route` -> `stats_allgather` over `stats_group` (the ranks whose
/// tokens share the capacity); the all-gather is left out when there is one data rank.
pub fn gate_and_route(b: &mut RankBuilder, spec: &ExperimentSpec, layer: usize, x: BufId, dims: &crate::plan::ops::MoeDims,
    stats_group: GroupId) -> Routed {
    let p = gate_params(b, layer, dims.d_model, dims.n_experts);
    route_with(b, spec, layer, x, dims, stats_group, p, None)
}

/// [`gate_and_route`] with existing params. `kept_stats`: the routing statistics the forward
/// already all-gathered (a recomputation that keeps communication outputs issues no
/// all-gather and reuses them).
#[allow(clippy::too_many_arguments)]
pub fn route_with(b: &mut RankBuilder, spec: &ExperimentSpec, layer: usize, x: BufId, dims: &crate::plan::ops::MoeDims,
    stats_group: GroupId, p: GateParams, kept_stats: Option<BufId>) -> Routed {
    let (t, m, e, k) = (dims.tokens, dims.d_model, dims.n_experts, dims.top_k);
    let ln = layernorm_with(b, "ln_moe", layer, x, p.gamma, p.beta, t, m);
    let wg = p.wg;
    let logits = b.buf(format!("L{layer}.gate.logits"), t * e, Mc::Activations);
    b.op("gate", Stage::Gate, Pass::Forward,
        OpKind::Linear { x: ln.y, w: wg, bias: None, residual: None, y: logits, rows: t, d_in: m, d_out: e },
        gemm_flops(t, m, e), 4 * (t * m + m * e + t * e) as u64);
    let probs = b.buf(format!("L{layer}.route.probs"), t * e, Mc::Activations);
    let idx = b.index_buf(format!("L{layer}.route.idx"), t * k, Mc::Activations);
    let weights = b.buf(format!("L{layer}.route.weights"), t * k, Mc::Activations);
    let stats = b.buf(format!("L{layer}.route.stats"), (k + 1) * e, Mc::CommBuffers);
    b.op("route", Stage::Topk, Pass::Forward,
        OpKind::Route { logits, probs, idx, weights, stats, n_experts: e, top_k: k, renormalize: spec.model.renormalize },
        (t * e * 6) as u64, 4 * (3 * t * e + 2 * t * k) as u64);
    let gathered = match kept_stats {
        Some(g) => g,
        None if dims.data_world > 1 => {
            let g = b.buf(format!("L{layer}.route.gathered"), dims.data_world * (k + 1) * e, Mc::CommBuffers);
            let bytes = b.f32_bytes_of(stats);
            b.op("stats_allgather", Stage::AllGather, Pass::Forward, OpKind::AllGather { group: stats_group, send: stats, recv: g }, 0, bytes);
            g
        }
        None => stats,
    };
    Routed { ln, wg, probs, idx, weights, gathered }
}

/// A variant's MoE sublayer inside the shared pre-norm block: `forward` returns the
/// sublayer's output (residual included) and what `backward` needs; `backward` returns the
/// gradient of the sublayer's input.
pub trait MoeSublayer {
    /// Forward state kept for backward.
    type Saved;
    /// Build the forward ops of layer `layer` on input `x`.
    fn forward(&mut self, b: &mut RankBuilder, layer: usize, x: BufId) -> (BufId, Self::Saved);
    /// Build the backward ops given the gradient of the output.
    fn backward(&mut self, b: &mut RankBuilder, layer: usize, saved: &Self::Saved, dout: BufId) -> BufId;
}

/// Whether a rank's loss counts in the step's loss (`Loss`) or is a tensor-parallel copy
/// that only produces the gradient (`LossReplica`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossRole {
    /// Counted.
    Counted,
    /// A replica of a counted loss.
    Replica,
}

enum Sub<S> {
    Attn(AttnSaved),
    Mlp(MlpSaved),
    Moe(S),
}

/// The model every non-shortcut variant shares: load the batch of data shard `shard`, then
/// per layer the optional attention and dense MLP sublayers and the variant's MoE sublayer,
/// then the loss over `n_global` tokens and, when training, the backward pass in reverse.
/// Returns whether backward was built; the caller then adds gradient reduction and Adam.
pub fn model<M: MoeSublayer>(b: &mut RankBuilder, spec: &ExperimentSpec, shard: usize, n_global: usize, role: LossRole,
    moe: &mut M) -> bool {
    let training = spec.run.mode == crate::spec::Mode::Training;
    let (t, m) = (spec.tokens_per_rank(), spec.model.d_model);
    let x0 = b.buf("input.x", t * m, Mc::Inputs);
    let target = b.buf("input.target", t * m, Mc::Inputs);
    let batch = t / spec.seq_len();
    b.op("load_batch", Stage::Data, Pass::Forward,
        OpKind::LoadBatch { x: x0, target, shard, batch, seq: spec.seq_len(), d_model: m }, 0, 8 * (t * m) as u64);
    let mut x = x0;
    let mut saved: Vec<(usize, Sub<M::Saved>)> = Vec::new();
    for layer in 0..spec.model.n_layers {
        b.set_layer(Some(layer as u32));
        if let Some(bb) = &spec.model.backbone {
            if bb.n_heads > 0 {
                let (out, s) = attention(b, spec, layer, x, bb.n_heads);
                saved.push((layer, Sub::Attn(s)));
                x = out;
            }
            if bb.d_mlp > 0 {
                let (out, s) = dense_mlp(b, spec, layer, x, bb.d_mlp);
                saved.push((layer, Sub::Mlp(s)));
                x = out;
            }
        }
        let (out, s) = moe.forward(b, layer, x);
        saved.push((layer, Sub::Moe(s)));
        x = out;
    }
    b.set_layer(None);
    let loss = b.buf("loss", 1, Mc::Activations);
    let dy = training.then(|| b.buf("loss.dy", t * m, Mc::Activations));
    let kind = match role {
        LossRole::Counted => OpKind::Loss { y: x, target, loss, dy, n_global, d_model: m },
        LossRole::Replica => OpKind::LossReplica { y: x, target, loss, dy, n_global, d_model: m },
    };
    b.op("loss", Stage::Loss, Pass::Forward, kind, 3 * (t * m) as u64, 12 * (t * m) as u64);
    let Some(mut grad) = dy else { return false };
    for (layer, s) in saved.iter().rev() {
        b.set_layer(Some(*layer as u32));
        grad = match s {
            Sub::Attn(a) => attention_bwd(b, spec, *layer, a, grad),
            Sub::Mlp(p) => dense_mlp_bwd(b, spec, *layer, p, grad),
            Sub::Moe(s) => moe.backward(b, *layer, s, grad),
        };
    }
    true
}

/// One rank of a plan whose MoE sublayer runs over the expert-parallel groups of `groups`
/// (top-k, MPMoE and every Tutel layout): the shared model, then, when training, dense
/// gradients summed over the world and expert gradients over the expert-data-parallel group.
pub fn expert_parallel_rank<M: MoeSublayer>(spec: &ExperimentSpec, groups: &super::DataExpertGroups, rank: usize, moe: &mut M) -> crate::plan::RankPlan {
    let training = spec.run.mode == crate::spec::Mode::Training;
    let mut b = RankBuilder::new(rank as u32, training, spec.model.dtype.size());
    let world = spec.world();
    if model(&mut b, spec, rank, spec.tokens_per_rank() * world, LossRole::Counted, moe) {
        let dense = (world > 1).then(|| groups.world());
        let expert = (spec.layout.dp > 1).then(|| groups.edp_group(rank));
        update(&mut b, spec, dense, expert);
    }
    b.finish()
}
