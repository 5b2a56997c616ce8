//! Tutel's adaptive parallelism at r = 0: the expert-parallel parameter layout of r = 1 (each
//! rank holds `E / ep` experts, top-k's names and init streams), executed data-parallel. Per
//! MoE layer every rank all-gathers the expert weights over its expert-parallel group, routes
//! its own tokens to all E experts locally (top-k's capacity, decided over the global batch,
//! so the same tokens drop), and in backward reduce-scatters the expert gradients back to
//! the ranks that own them. No all-to-all; the gathers and reduce-scatters replace it.
//!
//! With experts split over s = ep / E ranks (`sharded.rs`'s layout: hidden slices plus a b2
//! replica per member), the gathered fc1 slices are put side by side per expert
//! ([`OpKind::SwapAxes`]), one b2 replica per expert is kept ([`OpKind::TakeBlock`]), and in
//! backward the b2 gradient is all-reduced over the group before each member takes its
//! expert's row.

use crate::plan::builders::blocks::{self, Routed};
use crate::plan::builders::topk::{expert_param, moe_dims};
use crate::plan::builders::DataExpertGroups;
use crate::plan::ops::MoeDims;
use crate::plan::{BufId, GroupId, OpKind, Plan, RankBuilder, RankPlan};
use crate::spec::ExperimentSpec;
use crate::taxonomy::{MemCategory as Mc, Pass, Stage};

/// What the data-parallel MoE sublayer's backward needs from its forward.
pub(super) struct MoeSaved {
    dims: MoeDims,
    /// The routing front: `ln_moe`, gate, choices, routing statistics.
    r: Routed,
    slots: BufId,
    ein: BufId,
    h: BufId,
    a: BufId,
    back: BufId,
    /// (local slice, gathered full) of w1, b1, w2, b2.
    params: [(BufId, BufId); 4],
}

/// Build the r = 0 plan for every rank.
pub(crate) fn build(spec: &ExperimentSpec) -> Plan {
    let groups = DataExpertGroups::new(spec.layout.dp, spec.layout.ep);
    let ranks = (0..spec.world()).map(|r| build_rank(spec, &groups, r)).collect();
    Plan { spec: spec.clone(), groups: groups.groups.clone(), ranks }
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

fn build_rank(spec: &ExperimentSpec, groups: &DataExpertGroups, rank: usize) -> RankPlan {
    blocks::expert_parallel_rank(spec, groups, rank, &mut Sublayer { spec, groups, rank })
}

/// Ranks each expert is split over (`ep / n_experts` when the expert-parallel group is larger
/// than the experts, else 1).
fn split(spec: &ExperimentSpec) -> usize {
    let (ep, e) = (spec.layout.ep, spec.model.n_experts);
    if ep > e { ep / e } else { 1 }
}

/// Rows per expert and a buffer maker (routing-dependent sizes when dropless).
fn rows(d: &MoeDims) -> usize {
    d.rows_per_expert.unwrap_or(d.tokens)
}

fn route_buf(b: &mut RankBuilder, d: &MoeDims, name: String, elems: usize, cat: Mc) -> BufId {
    if d.rows_per_expert.is_none() { b.dyn_buf(name, elems, cat) } else { b.buf(name, elems, cat) }
}

/// The data-parallel (r = 0) MoE sublayer forward of `layer` on rank `rank`.
pub(super) fn moe_forward(b: &mut RankBuilder, spec: &ExperimentSpec, groups: &DataExpertGroups, rank: usize, layer: usize, x: BufId) -> (BufId, MoeSaved) {
    let ep_dims = moe_dims(spec, groups, rank);
    // Every expert is local: one "peer" (this rank), E local experts, at most T rows each.
    let dims = MoeDims { ep_peers: vec![rank], ep_index: 0, rows_per_expert: ep_dims.rows_per_expert.map(|r| r.min(ep_dims.tokens)), ..ep_dims.clone() };
    let (t, m, e, k, f) = (dims.tokens, dims.d_model, dims.n_experts, dims.top_k, spec.model.d_ffn);
    let ep = ep_dims.ep_peers.len();
    let r = rows(&dims);
    let routed = blocks::gate_and_route(b, spec, layer, x, &dims, groups.world());
    let (idx, weights, gathered) = (routed.idx, routed.weights, routed.gathered);
    let send = b.buf(format!("L{layer}.moe.send"), t * k * m, Mc::CommBuffers);
    let send_counts = b.index_buf(format!("L{layer}.moe.send_counts"), 1, Mc::CommBuffers);
    let slots = b.index_buf(format!("L{layer}.moe.slots"), t * k, Mc::Activations);
    b.op("dispatch", Stage::Permute, Pass::Forward,
        OpKind::Dispatch { x: routed.ln.y, idx, gathered, send, send_counts, slots, dims: dims.clone() }, 0, 8 * (t * k * m) as u64);
    let ein = route_buf(b, &dims, format!("L{layer}.expert.in"), e * r * m, Mc::Activations);
    b.op("expert_layout", Stage::Permute, Pass::Forward, OpKind::ExpertLayout { recv: send, gathered, out: ein, dims: dims.clone() },
        0, 8 * (e * r * m) as u64);
    let ep_group = groups.ep_group(rank);
    let mut params = [(BufId(0), BufId(0)); 4];
    let s = split(spec);
    let own = if s > 1 {
        super::sharded::slice_params(b, layer, rank % ep / s, rank % s, s, m, f)
    } else {
        let mut own = [BufId(0); 4];
        for (i, (tag, per, std)) in [("w1", m * f, 1.0 / (m as f32).sqrt()), ("b1", f, 0.02), ("w2", f * m, 1.0 / (f as f32).sqrt()), ("b2", m, 0.02)]
            .into_iter()
            .enumerate()
        {
            own[i] = expert_param(b, layer, tag, &ep_dims, per, std);
        }
        own
    };
    for (i, (tag, per)) in [("w1", m * f), ("b1", f), ("w2", f * m), ("b2", m)].into_iter().enumerate() {
        let local = own[i];
        let full = if ep > 1 {
            // Whole experts: E * per gathered; split ones: every member's slice, E * per as well
            // (fc1 with the slices member-major), except b2: s replicas per expert.
            let gathered = if s > 1 && tag == "b2" { e * s * per } else { e * per };
            let name = if s > 1 && (tag == "w1" || tag == "b2") { format!("L{layer}.expert.{tag}_slices") } else { format!("L{layer}.expert.{tag}_full") };
            let g = b.buf(name, gathered, Mc::CommBuffers);
            let bytes = b.f32_bytes_of(local);
            b.op(format!("expert_allgather_{tag}"), Stage::AllGather, Pass::Forward, OpKind::AllGather { group: ep_group, send: local, recv: g }, 0, bytes);
            match tag {
                "w1" if s > 1 => {
                    let full = b.buf(format!("L{layer}.expert.w1_full"), e * per, Mc::CommBuffers);
                    b.op("expert_w1_columns", Stage::Permute, Pass::Forward, OpKind::SwapAxes { src: g, dst: full, shape: (e, s, m, f / s) }, 0,
                        8 * (e * per) as u64);
                    full
                }
                "b2" if s > 1 => {
                    let full = b.buf(format!("L{layer}.expert.b2_full"), e * per, Mc::CommBuffers);
                    b.op("expert_b2_replica", Stage::Permute, Pass::Forward, OpKind::TakeBlock { src: g, dst: full, shape: (e, s, m), index: 0 }, 0,
                        8 * (e * per) as u64);
                    full
                }
                _ => g,
            }
        } else {
            local
        };
        params[i] = (local, full);
    }
    let [(_, w1), (_, b1), (_, w2), (_, b2)] = params;
    let blk = blocks::ExpertBlock { n_local: e, rows: r, m, f, dynamic: dims.rows_per_expert.is_none() };
    let (h, a, y) = blocks::expert_mlp_forward(b, spec, layer, &blk, ein, blocks::ExpertWeights { w1, b1, w2, b2 });
    let back = b.buf(format!("L{layer}.moe.back"), t * k * m, Mc::CommBuffers);
    let back_counts = b.index_buf(format!("L{layer}.moe.back_counts"), 1, Mc::CommBuffers);
    b.op("expert_unlayout", Stage::Permute, Pass::Forward,
        OpKind::ExpertUnlayout { input: y, gathered, send: back, send_counts: back_counts, dims: dims.clone() }, 0, 8 * (e * r * m) as u64);
    let out = b.buf(format!("L{layer}.moe.out"), t * m, Mc::Activations);
    b.op("combine", Stage::Combine, Pass::Forward,
        OpKind::Combine { back, slots, weights, residual: x, out, dims: dims.clone() }, 2 * (t * k * m) as u64, 4 * (t * k * m + 2 * t * m) as u64);
    (out, MoeSaved { dims, r: routed, slots, ein, h, a, back, params })
}

/// Where an expert weight gradient is computed: the owned gradient slice itself (ep = 1), or
/// a full `[E, ...]` buffer that is reduce-scattered into it.
fn full_grad(b: &mut RankBuilder, layer: usize, tag: &str, local: BufId, full: BufId, ep: usize) -> BufId {
    if ep > 1 {
        let n = b.elems_of(full) as usize;
        b.buf(format!("L{layer}.expert.{tag}_full.grad"), n, Mc::Grads)
    } else {
        b.grad(local)
    }
}

#[allow(clippy::too_many_arguments)]
/// Its backward: expert gradients reduce-scattered back to their owners.
pub(super) fn moe_backward(b: &mut RankBuilder, spec: &ExperimentSpec, groups: &DataExpertGroups, rank: usize, layer: usize, s: &MoeSaved, dout: BufId) -> BufId {
    let d = &s.dims;
    let (t, m, e, k, f) = (d.tokens, d.d_model, d.n_experts, d.top_k, spec.model.d_ffn);
    let ep = groups.ranks(groups.ep_group(rank)).len();
    let r = rows(d);
    let dback = b.buf(format!("L{layer}.moe.dback"), t * k * m, Mc::CommBuffers);
    let dweights = b.buf(format!("L{layer}.route.dweights"), t * k, Mc::Activations);
    b.op("combine_bwd", Stage::Combine, Pass::Backward,
        OpKind::CombineBwd { dout, back: s.back, slots: s.slots, weights: s.r.weights, dback, dweights, dims: d.clone() },
        4 * (t * k * m) as u64, 4 * (2 * t * k * m + t * m) as u64);
    let dy = route_buf(b, d, format!("L{layer}.expert.dout"), e * r * m, Mc::Temporaries);
    b.op("expert_layout_bwd", Stage::Permute, Pass::Backward,
        OpKind::ExpertLayout { recv: dback, gathered: s.r.gathered, out: dy, dims: d.clone() }, 0, 8 * (e * r * m) as u64);
    let [(lw1, w1), (lb1, b1), (lw2, w2), (lb2, b2)] = s.params;
    let (gw1, gb1) = (full_grad(b, layer, "w1", lw1, w1, ep), full_grad(b, layer, "b1", lb1, b1, ep));
    let (gw2, gb2) = (full_grad(b, layer, "w2", lw2, w2, ep), full_grad(b, layer, "b2", lb2, b2, ep));
    let blk = blocks::ExpertBlock { n_local: e, rows: r, m, f, dynamic: d.rows_per_expert.is_none() };
    let g = blocks::ExpertWeights { w1: gw1, b1: gb1, w2: gw2, b2: gb2 };
    let dein = blocks::expert_mlp_backward(b, spec, layer, &blk, s.ein, s.h, s.a, blocks::ExpertWeights { w1, b1, w2, b2 }, g, dy);
    let split_n = split(spec);
    if ep > 1 {
        let group: GroupId = groups.ep_group(rank);
        // Split experts: fc1's gradient back to member-major slices; b2's is all-reduced and
        // each member keeps its expert's row (its replica).
        let gw1 = if split_n > 1 {
            let slices = b.buf(format!("L{layer}.expert.w1_slices.grad"), e * m * f, Mc::Grads);
            b.op("expert_w1_columns_bwd", Stage::Permute, Pass::Backward, OpKind::SwapAxes { src: gw1, dst: slices, shape: (e, m, split_n, f / split_n) }, 0,
                8 * (e * m * f) as u64);
            slices
        } else {
            gw1
        };
        let scattered: &[(&str, BufId, BufId)] =
            if split_n > 1 { &[("w1", gw1, lw1), ("b1", gb1, lb1), ("w2", gw2, lw2)] } else { &[("w1", gw1, lw1), ("b1", gb1, lb1), ("w2", gw2, lw2), ("b2", gb2, lb2)] };
        for &(tag, full, local) in scattered {
            let recv = b.grad(local);
            let bytes = b.f32_bytes_of(full);
            b.op(format!("expert_reduce_scatter_{tag}"), Stage::ReduceScatter, Pass::Backward, OpKind::ReduceScatter { group, send: full, recv }, 0, bytes);
        }
        if split_n > 1 {
            let bytes = b.f32_bytes_of(gb2);
            b.op("expert_allreduce_b2", Stage::AllReduce, Pass::Backward, OpKind::AllReduce { group, bufs: vec![gb2] }, 0, bytes);
            let own = b.grad(lb2);
            b.op("expert_b2_replica_bwd", Stage::Permute, Pass::Backward,
                OpKind::TakeBlock { src: gb2, dst: own, shape: (1, e, m), index: rank % ep / split_n }, 0, 8 * m as u64);
        }
    }
    let dsend = b.buf(format!("L{layer}.moe.dsend"), t * k * m, Mc::CommBuffers);
    let dcounts = b.index_buf(format!("L{layer}.moe.dsend_counts"), 1, Mc::CommBuffers);
    b.op("expert_unlayout_bwd", Stage::Permute, Pass::Backward,
        OpKind::ExpertUnlayout { input: dein, gathered: s.r.gathered, send: dsend, send_counts: dcounts, dims: d.clone() }, 0,
        8 * (e * r * m) as u64);
    blocks::route_backward(b, spec, layer, &s.r, d, s.slots, dsend, dweights, dout)
}
