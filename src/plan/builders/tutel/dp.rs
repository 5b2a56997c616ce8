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

use crate::math::linalg::gemm_flops;
use crate::plan::builders::blocks::{self, LnSaved};
use crate::plan::builders::topk::{expert_param, moe_dims};
use crate::plan::builders::DataExpertGroups;
use crate::plan::ops::MoeDims;
use crate::plan::{BufId, GroupId, OpKind, Plan, RankBuilder, RankPlan};
use crate::spec::ExperimentSpec;
use crate::taxonomy::{MemCategory as Mc, Pass, Stage};

/// What the data-parallel MoE sublayer's backward needs from its forward.
pub(super) struct MoeSaved {
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
    let (ln, wg, probs, idx, weights, gathered) = (routed.ln, routed.wg, routed.probs, routed.idx, routed.weights, routed.gathered);
    let send = b.buf(format!("L{layer}.moe.send"), t * k * m, Mc::CommBuffers);
    let send_counts = b.index_buf(format!("L{layer}.moe.send_counts"), 1, Mc::CommBuffers);
    let slots = b.index_buf(format!("L{layer}.moe.slots"), t * k, Mc::Activations);
    b.op("dispatch", Stage::Permute, Pass::Forward,
        OpKind::Dispatch { x: ln.y, idx, gathered, send, send_counts, slots, dims: dims.clone() }, 0, 8 * (t * k * m) as u64);
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
            let bytes = b.bytes_of(local);
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
    let h = route_buf(b, &dims, format!("L{layer}.expert.h"), e * r * f, Mc::Activations);
    b.op("expert_gemm1", Stage::ExpertGemm1, Pass::Forward,
        OpKind::ExpertLinear { x: ein, w: w1, bias: b1, y: h, n_local: e, d_in: m, d_out: f },
        e as u64 * gemm_flops(r, m, f), 4 * (e * (r * m + m * f + r * f)) as u64);
    let a = route_buf(b, &dims, format!("L{layer}.expert.act"), e * r * f, Mc::Activations);
    b.op("expert_act", Stage::Act, Pass::Forward, OpKind::Act { h, a, act: spec.model.activation }, 8 * (e * r * f) as u64,
        8 * (e * r * f) as u64);
    let y = route_buf(b, &dims, format!("L{layer}.expert.out"), e * r * m, Mc::Temporaries);
    b.op("expert_gemm2", Stage::ExpertGemm2, Pass::Forward,
        OpKind::ExpertLinear { x: a, w: w2, bias: b2, y, n_local: e, d_in: f, d_out: m },
        e as u64 * gemm_flops(r, f, m), 4 * (e * (r * m + m * f + r * f)) as u64);
    let back = b.buf(format!("L{layer}.moe.back"), t * k * m, Mc::CommBuffers);
    let back_counts = b.index_buf(format!("L{layer}.moe.back_counts"), 1, Mc::CommBuffers);
    b.op("expert_unlayout", Stage::Permute, Pass::Forward,
        OpKind::ExpertUnlayout { input: y, gathered, send: back, send_counts: back_counts, dims: dims.clone() }, 0, 8 * (e * r * m) as u64);
    let out = b.buf(format!("L{layer}.moe.out"), t * m, Mc::Activations);
    b.op("combine", Stage::Combine, Pass::Forward,
        OpKind::Combine { back, slots, weights, residual: x, out, dims: dims.clone() }, 2 * (t * k * m) as u64, 4 * (t * k * m + 2 * t * m) as u64);
    (out, MoeSaved { dims, ln, wg, probs, idx, weights, gathered, slots, ein, h, a, back, params })
}

/// Where an expert weight gradient is computed: the owned gradient slice itself (ep = 1), or
/// a full `[E, ...]` buffer that is reduce-scattered into it.
fn full_grad(b: &mut RankBuilder, layer: usize, tag: &str, local: BufId, full: BufId, ep: usize) -> BufId {
    if ep > 1 {
        let n = b.bytes_of(full) as usize / 4;
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
        OpKind::CombineBwd { dout, back: s.back, slots: s.slots, weights: s.weights, dback, dweights, dims: d.clone() },
        4 * (t * k * m) as u64, 4 * (2 * t * k * m + t * m) as u64);
    let dy = route_buf(b, d, format!("L{layer}.expert.dout"), e * r * m, Mc::Temporaries);
    b.op("expert_layout_bwd", Stage::Permute, Pass::Backward,
        OpKind::ExpertLayout { recv: dback, gathered: s.gathered, out: dy, dims: d.clone() }, 0, 8 * (e * r * m) as u64);
    let [(lw1, w1), (lb1, b1), (lw2, w2), (lb2, b2)] = s.params;
    let (gw1, gb1) = (full_grad(b, layer, "w1", lw1, w1, ep), full_grad(b, layer, "b1", lb1, b1, ep));
    let (gw2, gb2) = (full_grad(b, layer, "w2", lw2, w2, ep), full_grad(b, layer, "b2", lb2, b2, ep));
    let da = route_buf(b, d, format!("L{layer}.expert.dact"), e * r * f, Mc::Temporaries);
    b.op("expert_gemm2_bwd", Stage::ExpertGemm2, Pass::Backward,
        OpKind::ExpertLinearBwd { x: s.a, w: w2, dy, dx: da, dw: gw2, dbias: gb2, n_local: e, d_in: f, d_out: m },
        2 * e as u64 * gemm_flops(r, f, m), 8 * (e * (r * m + m * f + r * f)) as u64);
    let dh = route_buf(b, d, format!("L{layer}.expert.dh"), e * r * f, Mc::Temporaries);
    b.op("expert_act_bwd", Stage::Act, Pass::Backward, OpKind::ActBwd { h: s.h, da, dh, act: spec.model.activation },
        10 * (e * r * f) as u64, 12 * (e * r * f) as u64);
    let dein = route_buf(b, d, format!("L{layer}.expert.din"), e * r * m, Mc::Temporaries);
    b.op("expert_gemm1_bwd", Stage::ExpertGemm1, Pass::Backward,
        OpKind::ExpertLinearBwd { x: s.ein, w: w1, dy: dh, dx: dein, dw: gw1, dbias: gb1, n_local: e, d_in: m, d_out: f },
        2 * e as u64 * gemm_flops(r, m, f), 8 * (e * (r * m + m * f + r * f)) as u64);
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
            let bytes = b.bytes_of(full);
            b.op(format!("expert_reduce_scatter_{tag}"), Stage::ReduceScatter, Pass::Backward, OpKind::ReduceScatter { group, send: full, recv }, 0, bytes);
        }
        if split_n > 1 {
            let bytes = b.bytes_of(gb2);
            b.op("expert_allreduce_b2", Stage::AllReduce, Pass::Backward, OpKind::AllReduce { group, bufs: vec![gb2] }, 0, bytes);
            let own = b.grad(lb2);
            b.op("expert_b2_replica_bwd", Stage::Permute, Pass::Backward,
                OpKind::TakeBlock { src: gb2, dst: own, shape: (1, e, m), index: rank % ep / split_n }, 0, 8 * m as u64);
        }
    }
    let dsend = b.buf(format!("L{layer}.moe.dsend"), t * k * m, Mc::CommBuffers);
    let dcounts = b.index_buf(format!("L{layer}.moe.dsend_counts"), 1, Mc::CommBuffers);
    b.op("expert_unlayout_bwd", Stage::Permute, Pass::Backward,
        OpKind::ExpertUnlayout { input: dein, gathered: s.gathered, send: dsend, send_counts: dcounts, dims: d.clone() }, 0,
        8 * (e * r * m) as u64);
    let dxm = b.buf(format!("L{layer}.moe.dx_ln"), t * m, Mc::Activations);
    b.op("dispatch_bwd", Stage::Permute, Pass::Backward, OpKind::DispatchBwd { dsend, slots: s.slots, dx: dxm, dims: d.clone() },
        (t * k * m) as u64, 8 * (t * k * m) as u64);
    let dlogits = b.buf(format!("L{layer}.gate.dlogits"), t * e, Mc::Activations);
    b.op("route_bwd", Stage::Topk, Pass::Backward,
        OpKind::RouteBwd { probs: s.probs, idx: s.idx, dweights, gathered: s.gathered, dlogits, dims: d.clone(),
            renormalize: spec.model.renormalize, aux_coef: spec.model.aux_loss_coef as f32 },
        (t * e * 6) as u64, 4 * (3 * t * e) as u64);
    blocks::linear_bwd(b, "gate", Stage::Gate, layer, s.ln.y, s.wg, None, dlogits, Some(dxm), t, m, e);
    blocks::layernorm_bwd(b, "ln_moe", layer, &s.ln, dxm, dout, t, m)
}
