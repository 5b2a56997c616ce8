//! PPMoE (Chen, Zhang, Gu, Bi, Xie, Tian, "Pipeline MoE: A Flexible MoE Implementation with Pipeline
//! Parallelism", arXiv 2304.11414): the experts of a layer are spread over the tensor-parallel
//! group, whose ranks hold the same tokens; no all-to-all.
//!
//! Layout: `world = dp * tp` (ep = 1): TP groups are consecutive ranks holding one data shard,
//! the data-parallel dimension is strided by `tp`. TP rank i owns experts
//! `[i * E / tp, (i + 1) * E / tp)`. The gate and everything dense is replicated and computed
//! redundantly (same top-k on every TP rank, no communication); each rank picks its experts'
//! rows out of its own dispatch layout (index slicing), runs its experts, scatters the
//! weighted rows into a `[T, M]` partial sum (the residual added by TP index 0), and one
//! all-reduce over the TP group gives the layer's output. Backward: the output gradient is
//! replicated; the gate-weight gradients (`[T, k]`) and the LayerNorm-output gradient
//! (`[T, M]`) are partial sums, each all-reduced over the TP group. Pipeline stages of the
//! backbone are not built (pp = 1).

use super::blocks::{self, LnSaved};
use super::topk::expert_param;
use super::TensorExpertDataGroups as Groups;
use crate::math::linalg::gemm_flops;
use crate::plan::ops::MoeDims;
use crate::plan::{BufId, GroupId, OpKind, Plan, RankBuilder, RankPlan};
use crate::spec::{Capacity, ExperimentSpec, Mode};
use crate::taxonomy::{MemCategory as Mc, Pass, Stage};

struct MoeSaved {
    dims: MoeDims,
    ln: LnSaved,
    wg: BufId,
    probs: BufId,
    idx: BufId,
    weights: BufId,
    gathered: BufId,
    slots: BufId,
    ein: BufId,
    h: BufId,
    a: BufId,
    back: BufId,
    w1: BufId,
    b1: BufId,
    w2: BufId,
    b2: BufId,
}

/// Build the PPMoE plan for every rank.
pub fn build(spec: &ExperimentSpec) -> Plan {
    let l = &spec.layout;
    let groups = Groups::new(l.dp, 1, l.tp);
    let ranks = (0..spec.world()).map(|r| build_rank(spec, &groups, r)).collect();
    Plan { spec: spec.clone(), groups: groups.groups.clone(), ranks }
}

/// Routing geometry: the data world is the `dp` shards; the "expert-parallel peers" are the
/// TP group, every one of which reads the same shard.
fn moe_dims(spec: &ExperimentSpec, g: &Groups, rank: usize) -> MoeDims {
    let m = &spec.model;
    let t = spec.tokens_per_rank();
    let rows_per_expert = match spec.capacity() {
        Capacity::Factor(cf) => {
            let c = ((cf * (m.top_k * t * g.shards()) as f64 / m.n_experts as f64).ceil() as usize).max(1);
            Some(c.min(t))
        }
        // Sized at run time: the capacity depends on the step's loads.
        Capacity::Dropless | Capacity::Bounded(_) => None,
    };
    MoeDims {
        tokens: t,
        d_model: m.d_model,
        n_experts: m.n_experts,
        top_k: m.top_k,
        data_world: g.shards(),
        data_rank: g.shard(rank),
        ep_peers: vec![g.shard(rank); spec.layout.tp],
        ep_index: g.tp_index(rank),
        capacity: spec.capacity(),
        rows_per_expert,
    }
}

/// The PPMoE sublayer of one rank (experts over its TP group), for the shared skeleton.
struct Sublayer<'a> {
    spec: &'a ExperimentSpec,
    groups: &'a Groups,
    rank: usize,
    tpg: Option<GroupId>,
}

impl blocks::MoeSublayer for Sublayer<'_> {
    type Saved = MoeSaved;
    fn forward(&mut self, b: &mut RankBuilder, layer: usize, x: BufId) -> (BufId, MoeSaved) {
        moe_forward(b, self.spec, self.groups, self.rank, self.tpg, layer, x)
    }
    fn backward(&mut self, b: &mut RankBuilder, layer: usize, s: &MoeSaved, dout: BufId) -> BufId {
        moe_backward(b, self.spec, self.tpg, layer, s, dout)
    }
}

fn build_rank(spec: &ExperimentSpec, groups: &Groups, rank: usize) -> RankPlan {
    let training = spec.run.mode == Mode::Training;
    let mut b = RankBuilder::new(rank as u32, training, spec.model.dtype.size());
    let shards = groups.shards();
    let tpg = (spec.layout.tp > 1).then(|| groups.tp_group(rank));
    // Every TP rank computes the same loss; TP index 0 reports it, the others are replicas.
    let role = if groups.tp_index(rank) == 0 { blocks::LossRole::Counted } else { blocks::LossRole::Replica };
    let mut moe = Sublayer { spec, groups, rank, tpg };
    if blocks::model(&mut b, spec, groups.shard(rank), spec.tokens_per_rank() * shards, role, &mut moe) {
        // Identical dense gradients on the TP ranks of a shard: sum over the shards only.
        let dense = (shards > 1).then(|| groups.data_group(rank));
        let expert = (spec.layout.dp > 1).then(|| groups.edp_group(rank));
        blocks::update(&mut b, spec, dense, expert);
    }
    b.finish()
}

fn tp_allreduce(b: &mut RankBuilder, name: &str, pass: Pass, group: Option<GroupId>, buf: BufId) {
    if let Some(g) = group {
        let bytes = b.bytes_of(buf);
        b.op(name, Stage::AllReduce, pass, OpKind::AllReduce { group: g, bufs: vec![buf] }, 0, bytes);
    }
}

fn moe_forward(b: &mut RankBuilder, spec: &ExperimentSpec, groups: &Groups, rank: usize, tpg: Option<GroupId>, layer: usize, x: BufId)
    -> (BufId, MoeSaved) {
    let dims = moe_dims(spec, groups, rank);
    let (t, m, k, f) = (dims.tokens, dims.d_model, dims.top_k, spec.model.d_ffn);
    let el = dims.local_experts();
    let routed = blocks::gate_and_route(b, spec, layer, x, &dims, groups.data_group(rank));
    let (ln, wg, probs, idx, weights, gathered) = (routed.ln, routed.wg, routed.probs, routed.idx, routed.weights, routed.gathered);
    let dropless = dims.rows_per_expert.is_none();
    let rows = dims.rows_per_expert.unwrap_or(t);
    let route_buf = |b: &mut RankBuilder, name: String, elems: usize, cat: Mc| {
        if dropless { b.dyn_buf(name, elems, cat) } else { b.buf(name, elems, cat) }
    };
    let send = b.buf(format!("L{layer}.moe.send"), t * k * m, Mc::Activations);
    let send_counts = b.index_buf(format!("L{layer}.moe.send_counts"), dims.ep_peers.len(), Mc::Activations);
    let slots = b.index_buf(format!("L{layer}.moe.slots"), t * k, Mc::Activations);
    b.op("dispatch", Stage::Permute, Pass::Forward,
        OpKind::Dispatch { x: ln.y, idx, gathered, send, send_counts, slots, dims: dims.clone() }, 0, 8 * (t * k * m) as u64);
    let ein = route_buf(b, format!("L{layer}.expert.in"), el * rows * m, Mc::Activations);
    b.op("expert_layout", Stage::Permute, Pass::Forward, OpKind::LocalLayout { send, gathered, out: ein, dims: dims.clone() }, 0,
        8 * (el * rows * m) as u64);
    let w1 = expert_param(b, layer, "w1", &dims, m * f, 1.0 / (m as f32).sqrt());
    let b1 = expert_param(b, layer, "b1", &dims, f, 0.02);
    let w2 = expert_param(b, layer, "w2", &dims, f * m, 1.0 / (f as f32).sqrt());
    let b2 = expert_param(b, layer, "b2", &dims, m, 0.02);
    let h = route_buf(b, format!("L{layer}.expert.h"), el * rows * f, Mc::Activations);
    b.op("expert_gemm1", Stage::ExpertGemm1, Pass::Forward,
        OpKind::ExpertLinear { x: ein, w: w1, bias: b1, y: h, n_local: el, d_in: m, d_out: f },
        el as u64 * gemm_flops(rows, m, f), 4 * (el * (rows * m + m * f + rows * f)) as u64);
    let a = route_buf(b, format!("L{layer}.expert.act"), el * rows * f, Mc::Activations);
    b.op("expert_act", Stage::Act, Pass::Forward, OpKind::Act { h, a, act: spec.model.activation }, 8 * (el * rows * f) as u64,
        8 * (el * rows * f) as u64);
    let y = route_buf(b, format!("L{layer}.expert.out"), el * rows * m, Mc::Temporaries);
    b.op("expert_gemm2", Stage::ExpertGemm2, Pass::Forward,
        OpKind::ExpertLinear { x: a, w: w2, bias: b2, y, n_local: el, d_in: f, d_out: m },
        el as u64 * gemm_flops(rows, f, m), 4 * (el * (rows * m + m * f + rows * f)) as u64);
    let back = b.buf(format!("L{layer}.moe.back"), t * k * m, Mc::Activations);
    b.op("expert_unlayout", Stage::Permute, Pass::Forward, OpKind::LocalUnlayout { input: y, gathered, full: back, dims: dims.clone() }, 0,
        8 * (t * k * m) as u64);
    let out = b.buf(format!("L{layer}.moe.out"), t * m, Mc::Activations);
    let residual = (dims.ep_index == 0).then_some(x);
    b.op("combine", Stage::Combine, Pass::Forward,
        OpKind::CombinePart { back, slots, weights, residual, out, dims: dims.clone() }, 2 * (t * k * m) as u64,
        4 * (t * k * m + 2 * t * m) as u64);
    tp_allreduce(b, "moe_allreduce", Pass::Forward, tpg, out);
    (out, MoeSaved { dims, ln, wg, probs, idx, weights, gathered, slots, ein, h, a, back, w1, b1, w2, b2 })
}

fn moe_backward(b: &mut RankBuilder, spec: &ExperimentSpec, tpg: Option<GroupId>, layer: usize, s: &MoeSaved, dout: BufId) -> BufId {
    let d = &s.dims;
    let (t, m, e, k, f) = (d.tokens, d.d_model, d.n_experts, d.top_k, spec.model.d_ffn);
    let el = d.local_experts();
    let dropless = d.rows_per_expert.is_none();
    let rows = d.rows_per_expert.unwrap_or(t);
    let route_buf = |b: &mut RankBuilder, name: String, elems: usize, cat: Mc| {
        if dropless { b.dyn_buf(name, elems, cat) } else { b.buf(name, elems, cat) }
    };
    let dback = b.buf(format!("L{layer}.moe.dback"), t * k * m, Mc::Activations);
    let dweights = b.buf(format!("L{layer}.route.dweights"), t * k, Mc::Activations);
    b.op("combine_bwd", Stage::Combine, Pass::Backward,
        OpKind::CombineBwd { dout, back: s.back, slots: s.slots, weights: s.weights, dback, dweights, dims: d.clone() },
        4 * (t * k * m) as u64, 4 * (2 * t * k * m + t * m) as u64);
    // Each rank knows the weight gradients of its own experts' assignments only.
    tp_allreduce(b, "dweights_allreduce", Pass::Backward, tpg, dweights);
    let dy = route_buf(b, format!("L{layer}.expert.dout"), el * rows * m, Mc::Temporaries);
    b.op("expert_layout_bwd", Stage::Permute, Pass::Backward, OpKind::LocalLayout { send: dback, gathered: s.gathered, out: dy, dims: d.clone() },
        0, 8 * (el * rows * m) as u64);
    let da = route_buf(b, format!("L{layer}.expert.dact"), el * rows * f, Mc::Temporaries);
    let (gw2, gb2) = (b.grad(s.w2), b.grad(s.b2));
    b.op("expert_gemm2_bwd", Stage::ExpertGemm2, Pass::Backward,
        OpKind::ExpertLinearBwd { x: s.a, w: s.w2, dy, dx: da, dw: gw2, dbias: gb2, n_local: el, d_in: f, d_out: m },
        2 * el as u64 * gemm_flops(rows, f, m), 8 * (el * (rows * m + m * f + rows * f)) as u64);
    let dh = route_buf(b, format!("L{layer}.expert.dh"), el * rows * f, Mc::Temporaries);
    b.op("expert_act_bwd", Stage::Act, Pass::Backward, OpKind::ActBwd { h: s.h, da, dh, act: spec.model.activation },
        10 * (el * rows * f) as u64, 12 * (el * rows * f) as u64);
    let dein = route_buf(b, format!("L{layer}.expert.din"), el * rows * m, Mc::Temporaries);
    let (gw1, gb1) = (b.grad(s.w1), b.grad(s.b1));
    b.op("expert_gemm1_bwd", Stage::ExpertGemm1, Pass::Backward,
        OpKind::ExpertLinearBwd { x: s.ein, w: s.w1, dy: dh, dx: dein, dw: gw1, dbias: gb1, n_local: el, d_in: m, d_out: f },
        2 * el as u64 * gemm_flops(rows, m, f), 8 * (el * (rows * m + m * f + rows * f)) as u64);
    let dsend = b.buf(format!("L{layer}.moe.dsend"), t * k * m, Mc::Activations);
    b.op("expert_unlayout_bwd", Stage::Permute, Pass::Backward,
        OpKind::LocalUnlayout { input: dein, gathered: s.gathered, full: dsend, dims: d.clone() }, 0, 8 * (t * k * m) as u64);
    let dxm = b.buf(format!("L{layer}.moe.dx_ln"), t * m, Mc::Activations);
    b.op("dispatch_bwd", Stage::Permute, Pass::Backward, OpKind::DispatchBwd { dsend, slots: s.slots, dx: dxm, dims: d.clone() },
        (t * k * m) as u64, 8 * (t * k * m) as u64);
    // Partial over the local experts: sum over the TP group before the replicated gate's share.
    tp_allreduce(b, "dx_allreduce", Pass::Backward, tpg, dxm);
    let dlogits = b.buf(format!("L{layer}.gate.dlogits"), t * e, Mc::Activations);
    b.op("route_bwd", Stage::Topk, Pass::Backward,
        OpKind::RouteBwd { probs: s.probs, idx: s.idx, dweights, gathered: s.gathered, dlogits, dims: d.clone(),
            renormalize: spec.model.renormalize, aux_coef: spec.model.aux_loss_coef as f32 },
        (t * e * 6) as u64, 4 * (3 * t * e) as u64);
    blocks::linear_bwd(b, "gate", Stage::Gate, layer, s.ln.y, s.wg, None, dlogits, Some(dxm), t, m, e);
    blocks::layernorm_bwd(b, "ln_moe", layer, &s.ln, dxm, dout, t, m)
}
