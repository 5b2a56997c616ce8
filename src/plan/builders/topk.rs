//! GShard/Switch top-k MoE with all-to-all expert parallelism, the baseline every other
//! variant is compared with.
//!
//! Per MoE layer: LN -> gate -> route (softmax, top-k) -> all-gather of routing stats
//! (global capacity) -> dispatch (capacity, pack rows per peer) -> all-to-all -> expert
//! layout -> fc1 -> act -> fc2 -> unlayout -> all-to-all back -> combine (+ residual).

use super::blocks::{self, Routed};
use super::DataExpertGroups;
use crate::plan::ops::MoeDims;
use crate::plan::{BufId, GroupId, OpKind, ParamInit, Plan, RankBuilder};
use crate::spec::{Capacity, ExperimentSpec};
use crate::taxonomy::{MemCategory as Mc, Pass, Stage};

/// Everything the MoE sublayer's backward needs from its forward.
struct MoeSaved {
    dims: MoeDims,
    /// The routing front: `ln_moe`, gate, choices, routing statistics.
    r: Routed,
    send_counts: BufId,
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

/// Build the top-k plan for every rank.
pub fn build(spec: &ExperimentSpec) -> Plan {
    let (dp, ep) = (spec.layout.dp, spec.layout.ep);
    let groups = DataExpertGroups::new(dp, ep);
    let ranks = (0..spec.world()).map(|r| build_rank(spec, &groups, r)).collect();
    Plan { spec: spec.clone(), groups: groups.groups.clone(), ranks }
}

/// Routing geometry of one MoE layer on `rank` (shared with the variants built on top-k).
pub(super) fn moe_dims(spec: &ExperimentSpec, groups: &DataExpertGroups, rank: usize) -> MoeDims {
    let m = &spec.model;
    let t = spec.tokens_per_rank();
    let world = spec.world();
    let ep = spec.layout.ep;
    let rows_per_expert = match spec.capacity() {
        Capacity::Factor(cf) => {
            let c = ((cf * (m.top_k * t * world) as f64 / m.n_experts as f64).ceil() as usize).max(1);
            Some(c.min(t * ep))
        }
        // Sized at run time: the capacity depends on the step's loads.
        Capacity::Dropless | Capacity::Bounded(_) => None,
    };
    MoeDims {
        tokens: t,
        d_model: m.d_model,
        n_experts: m.n_experts,
        top_k: m.top_k,
        data_world: world,
        data_rank: rank,
        ep_peers: groups.ranks(groups.ep_group(rank)).iter().map(|&r| r as usize).collect(),
        ep_index: rank % ep,
        capacity: spec.capacity(),
        rows_per_expert,
    }
}

/// The top-k MoE sublayer of one rank, for the shared block skeleton.
struct Sublayer<'a> {
    spec: &'a ExperimentSpec,
    groups: &'a DataExpertGroups,
    rank: usize,
}

impl blocks::MoeSublayer for Sublayer<'_> {
    type Saved = MoeSaved;
    fn forward(&mut self, b: &mut RankBuilder, layer: usize, x: BufId) -> (BufId, MoeSaved) {
        moe_forward(b, self.spec, self.groups, self.rank, layer, x)
    }
    fn backward(&mut self, b: &mut RankBuilder, layer: usize, s: &MoeSaved, dout: BufId) -> BufId {
        moe_backward(b, self.spec, self.groups, self.rank, layer, s, dout)
    }
}

fn build_rank(spec: &ExperimentSpec, groups: &DataExpertGroups, rank: usize) -> crate::plan::RankPlan {
    blocks::expert_parallel_rank(spec, groups, rank, &mut Sublayer { spec, groups, rank })
}

/// An expert weight slice with top-k's init tag `expert.{tag}`, so every variant draws the same experts.
pub(super) fn expert_param(b: &mut RankBuilder, layer: usize, tag: &str, dims: &MoeDims, per_expert: usize, std: f32) -> BufId {
    let el = dims.local_experts();
    let first = (dims.ep_index * el) as u32;
    let init = ParamInit { tag: format!("expert.{tag}"), layer: layer as u32, experts: Some((first, el as u32)), mean: 0.0, std };
    b.param(&format!("L{layer}.expert.{tag}"), el * per_expert, init, true)
}

/// A variable all-to-all op whose byte count is the planned size of `send`.
#[allow(clippy::too_many_arguments)]
pub(super) fn a2a(b: &mut RankBuilder, name: &str, pass: Pass, group: GroupId, send: BufId, send_counts: BufId, recv: BufId, m: usize) {
    let bytes = b.f32_bytes_of(send);
    a2a_of_bytes(b, name, pass, group, send, send_counts, recv, m, bytes);
}

/// [`a2a`] counting `bytes` instead of `send`'s planned size (a sender that fills only part
/// of its buffer by construction).
#[allow(clippy::too_many_arguments)]
pub(super) fn a2a_of_bytes(b: &mut RankBuilder, name: &str, pass: Pass, group: GroupId, send: BufId, send_counts: BufId, recv: BufId, m: usize, bytes: u64) {
    b.op(name, Stage::AllToAll, pass, OpKind::AllToAllV { group, send, send_counts, recv, row_len: m }, 0, bytes);
}

fn moe_forward(b: &mut RankBuilder, spec: &ExperimentSpec, groups: &DataExpertGroups, rank: usize, layer: usize, x: BufId) -> (BufId, MoeSaved) {
    let dims = moe_dims(spec, groups, rank);
    let (t, m, k, f) = (dims.tokens, dims.d_model, dims.top_k, spec.model.d_ffn);
    let ep = dims.ep_peers.len();
    let el = dims.local_experts();
    let routed = blocks::gate_and_route(b, spec, layer, x, &dims, groups.world());
    let (idx, weights, gathered) = (routed.idx, routed.weights, routed.gathered);
    let dropless = dims.rows_per_expert.is_none();
    let rows = dims.rows_per_expert.unwrap_or(t * ep);
    let route_buf = |b: &mut RankBuilder, name: String, elems: usize, cat: Mc| {
        if dropless { b.dyn_buf(name, elems, cat) } else { b.buf(name, elems, cat) }
    };
    let send = b.buf(format!("L{layer}.moe.send"), t * k * m, Mc::CommBuffers);
    let send_counts = b.index_buf(format!("L{layer}.moe.send_counts"), ep, Mc::CommBuffers);
    let slots = b.index_buf(format!("L{layer}.moe.slots"), t * k, Mc::Activations);
    b.op("dispatch", Stage::Permute, Pass::Forward,
        OpKind::Dispatch { x: routed.ln.y, idx, gathered, send, send_counts, slots, dims: dims.clone() }, 0, 8 * (t * k * m) as u64);
    let recv = if ep > 1 {
        let r = route_buf(b, format!("L{layer}.moe.recv"), el * rows * m, Mc::CommBuffers);
        a2a(b, "dispatch_a2a", Pass::Forward, groups.ep_group(rank), send, send_counts, r, m);
        r
    } else {
        send
    };
    let ein = route_buf(b, format!("L{layer}.expert.in"), el * rows * m, Mc::Activations);
    b.op("expert_layout", Stage::Permute, Pass::Forward, OpKind::ExpertLayout { recv, gathered, out: ein, dims: dims.clone() },
        0, 8 * (el * rows * m) as u64);
    let w1 = expert_param(b, layer, "w1", &dims, m * f, 1.0 / (m as f32).sqrt());
    let b1 = expert_param(b, layer, "b1", &dims, f, 0.02);
    let w2 = expert_param(b, layer, "w2", &dims, f * m, 1.0 / (f as f32).sqrt());
    let b2 = expert_param(b, layer, "b2", &dims, m, 0.02);
    let blk = blocks::ExpertBlock { n_local: el, rows, m, f, dynamic: dropless };
    let (h, a, y) = blocks::expert_mlp_forward(b, spec, layer, &blk, ein, blocks::ExpertWeights { w1, b1, w2, b2 });
    let back_send = route_buf(b, format!("L{layer}.moe.back_send"), el * rows * m, Mc::CommBuffers);
    let back_counts = b.index_buf(format!("L{layer}.moe.back_counts"), ep, Mc::CommBuffers);
    b.op("expert_unlayout", Stage::Permute, Pass::Forward,
        OpKind::ExpertUnlayout { input: y, gathered, send: back_send, send_counts: back_counts, dims: dims.clone() }, 0,
        8 * (el * rows * m) as u64);
    let back = if ep > 1 {
        let r = b.buf(format!("L{layer}.moe.back"), t * k * m, Mc::CommBuffers);
        a2a(b, "combine_a2a", Pass::Forward, groups.ep_group(rank), back_send, back_counts, r, m);
        r
    } else {
        back_send
    };
    let out = b.buf(format!("L{layer}.moe.out"), t * m, Mc::Activations);
    // t*k rows read, out and residual; a dropless `back` of ep = 1 is the expert-side buffer,
    // counted at its bound, which the sim scales to the routed rows.
    let back_bytes = if dropless && ep == 1 { b.f32_bytes_of(back) } else { 4 * (t * k * m) as u64 };
    let combine_bytes = back_bytes + 8 * (t * m) as u64;
    b.op("combine", Stage::Combine, Pass::Forward,
        OpKind::Combine { back, slots, weights, residual: x, out, dims: dims.clone() }, 2 * (t * k * m) as u64, combine_bytes);
    (out, MoeSaved { dims, r: routed, send_counts, slots, ein, h, a, back, w1, b1, w2, b2 })
}

fn moe_backward(b: &mut RankBuilder, spec: &ExperimentSpec, groups: &DataExpertGroups, rank: usize, layer: usize, s: &MoeSaved, dout: BufId) -> BufId {
    let d = &s.dims;
    let (t, m, k, f) = (d.tokens, d.d_model, d.top_k, spec.model.d_ffn);
    let ep = d.ep_peers.len();
    let el = d.local_experts();
    let dropless = d.rows_per_expert.is_none();
    let rows = d.rows_per_expert.unwrap_or(t * ep);
    let route_buf = |b: &mut RankBuilder, name: String, elems: usize, cat: Mc| {
        if dropless { b.dyn_buf(name, elems, cat) } else { b.buf(name, elems, cat) }
    };
    let dback = b.buf(format!("L{layer}.moe.dback"), t * k * m, Mc::CommBuffers);
    let dweights = b.buf(format!("L{layer}.route.dweights"), t * k, Mc::Activations);
    let back_bytes = if dropless && ep == 1 { b.f32_bytes_of(s.back) } else { 4 * (t * k * m) as u64 };
    let combine_bwd_bytes = back_bytes + 4 * (t * k * m + t * m) as u64;
    b.op("combine_bwd", Stage::Combine, Pass::Backward,
        OpKind::CombineBwd { dout, back: s.back, slots: s.slots, weights: s.r.weights, dback, dweights, dims: d.clone() },
        4 * (t * k * m) as u64, combine_bwd_bytes);
    let dback_recv = if ep > 1 {
        let r = route_buf(b, format!("L{layer}.moe.dback_recv"), el * rows * m, Mc::CommBuffers);
        a2a(b, "combine_a2a_bwd", Pass::Backward, groups.ep_group(rank), dback, s.send_counts, r, m);
        r
    } else {
        dback
    };
    let dy = route_buf(b, format!("L{layer}.expert.dout"), el * rows * m, Mc::Temporaries);
    b.op("expert_layout_bwd", Stage::Permute, Pass::Backward,
        OpKind::ExpertLayout { recv: dback_recv, gathered: s.r.gathered, out: dy, dims: d.clone() }, 0, 8 * (el * rows * m) as u64);
    let blk = blocks::ExpertBlock { n_local: el, rows, m, f, dynamic: dropless };
    let w = blocks::ExpertWeights { w1: s.w1, b1: s.b1, w2: s.w2, b2: s.b2 };
    let g = blocks::ExpertWeights { w1: b.grad(s.w1), b1: b.grad(s.b1), w2: b.grad(s.w2), b2: b.grad(s.b2) };
    let dein = blocks::expert_mlp_backward(b, spec, layer, &blk, s.ein, s.h, s.a, w, g, dy);
    let dsend_back = route_buf(b, format!("L{layer}.moe.dsend_back"), el * rows * m, Mc::CommBuffers);
    let dcounts = b.index_buf(format!("L{layer}.moe.dsend_counts"), ep, Mc::CommBuffers);
    b.op("expert_unlayout_bwd", Stage::Permute, Pass::Backward,
        OpKind::ExpertUnlayout { input: dein, gathered: s.r.gathered, send: dsend_back, send_counts: dcounts, dims: d.clone() }, 0,
        8 * (el * rows * m) as u64);
    let dsend = if ep > 1 {
        let r = b.buf(format!("L{layer}.moe.dsend"), t * k * m, Mc::CommBuffers);
        a2a(b, "dispatch_a2a_bwd", Pass::Backward, groups.ep_group(rank), dsend_back, dcounts, r, m);
        r
    } else {
        dsend_back
    };
    blocks::route_backward(b, spec, layer, &s.r, d, s.slots, dsend, dweights, dout)
}
