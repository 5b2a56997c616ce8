//! Tutel's adaptive parallelism r >= 1 when the expert-parallel world exceeds the experts
//! (W = `layout.ep` = E * s, tutel/impls/moe_layer.py's `sharded_count`): the s members of
//! expert e's group (member p = e * s + j) each hold hidden slice j of s of it: fc1 columns
//! and b1 `[j H/s, (j+1) H/s)`, the same rows of fc2, and a replica of b2. This parameter
//! layout is the same for every r, so switching r moves no tensors.
//!
//! Execution for 1 <= r <= s, r | s, g = s / r: member j = q * g + i computes hidden slice q
//! of r on chunk i of g of every (source, expert) block of kept rows. Each kept row is thus
//! sent r times through the all-to-all (once to each q); the g members of slice group q
//! all-gather their fc1/b1/fc2 slices (the fc1 columns put side by side by a [`OpKind::
//! SwapAxes`]) and compute H/r of the hidden units; the return all-to-all brings back r
//! partial outputs per row, summed by [`OpKind::ShardCombine`]. b2 is added by the q = 0
//! copy only. Backward mirrors it: the weight gradients over H/r are reduce-scattered back to
//! the slice holders (summing the token chunks), the b2 gradient is all-reduced over the slice
//! group (every q sees the same rows), and the input gradient's r partial sums are summed by
//! the same combine. r = 0 on this layout is `dp.rs` (with [`slice_params`]).

use crate::math::linalg::gemm_flops;
use crate::plan::builders::blocks::{self, Routed};
use crate::plan::builders::topk::a2a;
use crate::plan::builders::DataExpertGroups;
use crate::plan::ops::MoeDims;
use crate::plan::{BufId, Group, GroupId, OpKind, ParamInit, ParamSlice, Plan, RankBuilder, RankPlan};
use crate::spec::{Capacity, ExperimentSpec};
use crate::taxonomy::{MemCategory as Mc, Pass, Stage};

/// The sharded layout: slices per expert, the parallelism and its groups.
struct Layout {
    /// Expert-parallel members (W).
    ep: usize,
    /// Experts E.
    n_experts: usize,
    /// Members per expert (W / E).
    s: usize,
    /// Copies of each token in the all-to-all.
    r: usize,
    /// Members per slice group (s / r).
    g: usize,
    /// Index of the first `ep{d}.expert{e}.q{q}` group (when g > 1).
    slice_base: usize,
}

impl Layout {
    fn member(&self, rank: usize) -> usize {
        rank % self.ep
    }
    fn expert(&self, rank: usize) -> usize {
        self.member(rank) / self.s
    }
    /// Hidden slice j of s that `rank` holds.
    fn slice(&self, rank: usize) -> usize {
        self.member(rank) % self.s
    }
    /// (hidden slice q of r it computes, token chunk i of g it takes).
    fn qi(&self, rank: usize) -> (usize, usize) {
        (self.slice(rank) / self.g, self.slice(rank) % self.g)
    }
    fn replica(&self, rank: usize) -> usize {
        rank / self.ep
    }
    /// The g members that together hold `rank`'s hidden slice q of r.
    fn slice_group(&self, rank: usize) -> GroupId {
        let (q, _) = self.qi(rank);
        GroupId((self.slice_base + (self.replica(rank) * self.n_experts + self.expert(rank)) * self.r + q) as u32)
    }
}

/// Build the sharded-expert plan (ep > n_experts, 1 <= r <= s) for every rank.
pub(crate) fn build(spec: &ExperimentSpec, r: usize) -> Plan {
    let (dp, ep, e) = (spec.layout.dp, spec.layout.ep, spec.model.n_experts);
    let s = ep / e;
    let g = s / r;
    let mut groups = DataExpertGroups::new(dp, ep);
    let slice_base = groups.groups.len();
    if g > 1 {
        for d in 0..dp {
            for x in 0..e {
                for q in 0..r {
                    let ranks = (0..g).map(|i| (d * ep + x * s + q * g + i) as u32).collect();
                    groups.groups.push(Group { name: format!("ep{d}.expert{x}.q{q}"), ranks });
                }
            }
        }
    }
    let lay = Layout { ep, n_experts: e, s, r, g, slice_base };
    let ranks = (0..spec.world()).map(|rank| build_rank(spec, &groups, &lay, rank)).collect();
    Plan { spec: spec.clone(), groups: groups.groups.clone(), ranks }
}

fn build_rank(spec: &ExperimentSpec, groups: &DataExpertGroups, lay: &Layout, rank: usize) -> RankPlan {
    blocks::expert_parallel_rank(spec, groups, rank, &mut Sublayer { spec, groups, lay, rank })
}

struct Sublayer<'a> {
    spec: &'a ExperimentSpec,
    groups: &'a DataExpertGroups,
    lay: &'a Layout,
    rank: usize,
}

impl blocks::MoeSublayer for Sublayer<'_> {
    type Saved = MoeSaved;
    fn forward(&mut self, b: &mut RankBuilder, layer: usize, x: BufId) -> (BufId, MoeSaved) {
        moe_forward(b, self.spec, self.groups, self.lay, self.rank, layer, x)
    }
    fn backward(&mut self, b: &mut RankBuilder, layer: usize, s: &MoeSaved, dout: BufId) -> BufId {
        moe_backward(b, self.spec, self.groups, self.lay, self.rank, layer, s, dout)
    }
}

/// What the backward needs from the forward.
struct MoeSaved {
    dims: MoeDims,
    /// The routing front: `ln_moe`, gate, choices, routing statistics.
    r: Routed,
    slots: BufId,
    ein: BufId,
    h: BufId,
    a: BufId,
    back: BufId,
    /// Rows received from each member (the return all-to-all's counts, in both passes).
    recv_counts: BufId,
    /// The owned slices (w1, b1, w2) and b2.
    own: [BufId; 4],
    /// fc1, b1 and fc2 over this member's H/r (the owned slices when g = 1).
    wide: [BufId; 3],
}

/// Routing geometry for the dispatch: one "peer" per expert (the layout's send buffer is
/// expert-major), the capacity over every data rank, expert buffers sized at run time.
fn dims(spec: &ExperimentSpec, lay: &Layout, rank: usize) -> MoeDims {
    let m = &spec.model;
    let first = lay.replica(rank) * lay.ep;
    MoeDims {
        tokens: spec.tokens_per_rank(),
        d_model: m.d_model,
        n_experts: m.n_experts,
        top_k: m.top_k,
        data_world: spec.world(),
        data_rank: rank,
        ep_peers: (0..lay.n_experts).map(|x| first + x * lay.s).collect(),
        ep_index: lay.expert(rank),
        capacity: spec.capacity(),
        rows_per_expert: None,
    }
}

/// Upper bound of the rows a member receives: its chunk of every source's block of its
/// expert (at most the capacity, or every token of the group), plus rounding per source.
fn recv_bound(spec: &ExperimentSpec, lay: &Layout) -> usize {
    let (t, k, e) = (spec.tokens_per_rank(), spec.model.top_k, spec.model.n_experts);
    let all = t * lay.ep;
    let kept = match spec.capacity() {
        Capacity::Factor(cf) => ((cf * (k * t * spec.world()) as f64 / e as f64).ceil() as usize).min(all),
        Capacity::Dropless | Capacity::Bounded(_) => all,
    };
    (kept / lay.g + lay.ep).min(all)
}

/// The parameters a member holds, the same for every r (r = 0 included): hidden slice `j` of
/// `s` of `expert`'s fc1 columns, b1 and fc2 rows, and a replica of its b2; [w1, b1, w2, b2].
pub(super) fn slice_params(b: &mut RankBuilder, layer: usize, expert: usize, j: usize, s: usize, m: usize, f: usize) -> [BufId; 4] {
    let hs = f / s;
    let keep = (j * hs, (j + 1) * hs);
    let w1 = slice_param(b, layer, "w1", expert, m, f, keep, 1.0 / (m as f32).sqrt());
    let b1 = slice_param(b, layer, "b1", expert, 1, f, keep, 0.02);
    let w2 = slice_param(b, layer, "w2", expert, 1, f * m, (keep.0 * m, keep.1 * m), 1.0 / (f as f32).sqrt());
    let b2 = b.param(&format!("L{layer}.expert.b2"), m,
        ParamInit { tag: "expert.b2".into(), layer: layer as u32, experts: Some((expert as u32, 1)), mean: 0.0, std: 0.02 }, true);
    [w1, b1, w2, b2]
}

/// Hidden slice `j` of s of expert tensor `tag`, viewed `[rows, cols]`, keeping columns `keep`.
#[allow(clippy::too_many_arguments)]
fn slice_param(b: &mut RankBuilder, layer: usize, tag: &str, expert: usize, rows: usize, cols: usize, keep: (usize, usize), std: f32) -> BufId {
    let init = ParamInit { tag: format!("expert.{tag}"), layer: layer as u32, experts: Some((expert as u32, 1)), mean: 0.0, std };
    b.param_sliced(&format!("L{layer}.expert.{tag}"), rows * (keep.1 - keep.0), init, true, ParamSlice { rows, cols, keep })
}

fn gather(b: &mut RankBuilder, name: String, buf: String, group: GroupId, send: BufId, elems: usize) -> BufId {
    let recv = b.buf(buf, elems, Mc::CommBuffers);
    let bytes = b.f32_bytes_of(send);
    b.op(name, Stage::AllGather, Pass::Forward, OpKind::AllGather { group, send, recv }, 0, bytes);
    recv
}

/// The sharded MoE sublayer's forward: routing, `dispatch` (capacity; this rank's kept rows
/// expert-major), the all-to-all to the members, their H/r of the expert, the return
/// all-to-all and the sum over the r copies, `combine`.
#[allow(clippy::too_many_arguments)]
fn moe_forward(b: &mut RankBuilder, spec: &ExperimentSpec, groups: &DataExpertGroups, lay: &Layout, rank: usize, layer: usize, x: BufId)
    -> (BufId, MoeSaved) {
    let dims = dims(spec, lay, rank);
    let (t, m, k, f) = (dims.tokens, dims.d_model, dims.top_k, spec.model.d_ffn);
    let (s, r, g) = (lay.s, lay.r, lay.g);
    let (hs, hr) = (f / s, f / r);
    let expert = lay.expert(rank);
    let (q, i) = lay.qi(rank);
    let j = lay.slice(rank);
    let ep_group = groups.ep_group(rank);
    let routed = blocks::gate_and_route(b, spec, layer, x, &dims, groups.world());
    let (idx, weights, gathered) = (routed.idx, routed.weights, routed.gathered);
    let send = b.buf(format!("L{layer}.moe.send"), t * k * m, Mc::CommBuffers);
    let send_counts = b.index_buf(format!("L{layer}.moe.send_counts"), lay.n_experts, Mc::CommBuffers);
    let slots = b.index_buf(format!("L{layer}.moe.slots"), t * k, Mc::Activations);
    b.op("dispatch", Stage::Permute, Pass::Forward,
        OpKind::Dispatch { x: routed.ln.y, idx, gathered, send, send_counts, slots, dims: dims.clone() }, 0, 8 * (t * k * m) as u64);
    let bound = recv_bound(spec, lay);
    let ein = to_members(b, &dims, lay, layer, send, gathered, ep_group, "dispatch", bound, Mc::Activations, Pass::Forward);
    let back_counts = b.index_buf(format!("L{layer}.moe.recv_counts"), lay.ep, Mc::CommBuffers);
    let peers = groups.ranks(ep_group).iter().map(|&p| p as usize).collect();
    b.op("shard_counts", Stage::Permute, Pass::Forward,
        OpKind::ShardCounts { gathered, counts: back_counts, dims: dims.clone(), peers, expert, chunk: (i, g) }, 0, 0);
    // The owned slices (one layout for every r) and this member's H/r of them.
    let [w1, b1, w2, b2] = slice_params(b, layer, expert, j, s, m, f);
    let wide = if g > 1 {
        let sg = lay.slice_group(rank);
        let w1g = gather(b, "expert_allgather_w1".into(), format!("L{layer}.expert.w1_gathered"), sg, w1, g * m * hs);
        let w1r = b.buf(format!("L{layer}.expert.w1_wide"), m * hr, Mc::CommBuffers);
        b.op("expert_w1_columns", Stage::Permute, Pass::Forward, OpKind::SwapAxes { src: w1g, dst: w1r, shape: (1, g, m, hs) }, 0,
            8 * (m * hr) as u64);
        let b1r = gather(b, "expert_allgather_b1".into(), format!("L{layer}.expert.b1_wide"), sg, b1, hr);
        let w2r = gather(b, "expert_allgather_w2".into(), format!("L{layer}.expert.w2_wide"), sg, w2, hr * m);
        [w1r, b1r, w2r]
    } else {
        [w1, b1, w2]
    };
    let h = b.dyn_buf(format!("L{layer}.expert.h"), bound * hr, Mc::Activations);
    b.op("expert_gemm1", Stage::ExpertGemm1, Pass::Forward,
        OpKind::ExpertLinear { x: ein, w: wide[0], bias: wide[1], y: h, n_local: 1, d_in: m, d_out: hr },
        gemm_flops(bound, m, hr), 4 * (bound * m + m * hr + bound * hr) as u64);
    let a = b.dyn_buf(format!("L{layer}.expert.act"), bound * hr, Mc::Activations);
    b.op("expert_act", Stage::Act, Pass::Forward, OpKind::Act { h, a, act: spec.model.activation }, 8 * (bound * hr) as u64,
        8 * (bound * hr) as u64);
    let y = b.dyn_buf(format!("L{layer}.expert.out"), bound * m, Mc::Temporaries);
    b.op("expert_gemm2", Stage::ExpertGemm2, Pass::Forward,
        OpKind::ExpertLinearPart { x: a, w: wide[2], bias: (q == 0).then_some(b2), y, n_local: 1, d_in: hr, d_out: m },
        gemm_flops(bound, hr, m), 4 * (bound * m + m * hr + bound * hr) as u64);
    let back = from_members(b, &dims, lay, layer, y, back_counts, gathered, ep_group, "back", Pass::Forward);
    let out = b.buf(format!("L{layer}.moe.out"), t * m, Mc::Activations);
    b.op("combine", Stage::Combine, Pass::Forward,
        OpKind::Combine { back, slots, weights, residual: x, out, dims: dims.clone() }, 2 * (t * k * m) as u64, 4 * (t * k * m + 2 * t * m) as u64);
    let saved = MoeSaved { dims, r: routed, slots, ein, h, a, back, recv_counts: back_counts, own: [w1, b1, w2, b2], wide };
    (out, saved)
}

/// `shard_dispatch` of a dispatch layout `src` and the all-to-all to the members: the rows
/// this member computes on (`what`_recv).
#[allow(clippy::too_many_arguments)]
fn to_members(b: &mut RankBuilder, dims: &MoeDims, lay: &Layout, layer: usize, src: BufId, gathered: BufId, group: GroupId, what: &str,
    bound: usize, cat: Mc, pass: Pass) -> BufId {
    let (t, k, m) = (dims.tokens, dims.top_k, dims.d_model);
    let bwd = if pass == Pass::Backward { "_bwd" } else { "" };
    let send = b.dyn_buf(format!("L{layer}.moe.{what}_shards"), lay.r * t * k * m, Mc::CommBuffers);
    let counts = b.index_buf(format!("L{layer}.moe.{what}_shard_counts"), lay.ep, Mc::CommBuffers);
    b.op(format!("shard_dispatch{bwd}"), Stage::Permute, pass,
        OpKind::ShardDispatch { src, gathered, send, send_counts: counts, dims: dims.clone(), s: lay.s, r: lay.r }, 0,
        8 * (lay.r * t * k * m) as u64);
    let recv = b.dyn_buf(format!("L{layer}.moe.{what}_recv"), bound * m, cat);
    let name = if pass == Pass::Backward { "combine_a2a_bwd" } else { "dispatch_a2a" };
    a2a(b, name, pass, group, send, counts, recv, m);
    recv
}

/// The return all-to-all of a member's rows `input` (per-source `counts`) and
/// `shard_combine`: the dispatch layout with each row's r partial results summed.
#[allow(clippy::too_many_arguments)]
fn from_members(b: &mut RankBuilder, dims: &MoeDims, lay: &Layout, layer: usize, input: BufId, counts: BufId, gathered: BufId,
    group: GroupId, what: &str, pass: Pass) -> BufId {
    let (t, k, m) = (dims.tokens, dims.top_k, dims.d_model);
    let bwd = if pass == Pass::Backward { "_bwd" } else { "" };
    let parts = b.dyn_buf(format!("L{layer}.moe.{what}_parts"), lay.r * t * k * m, Mc::CommBuffers);
    let name = if pass == Pass::Backward { "dispatch_a2a_bwd" } else { "combine_a2a" };
    a2a(b, name, pass, group, input, counts, parts, m);
    let full = b.buf(format!("L{layer}.moe.{what}"), t * k * m, Mc::CommBuffers);
    b.op(format!("shard_combine{bwd}"), Stage::Permute, pass,
        OpKind::ShardCombine { recv: parts, gathered, full, dims: dims.clone(), s: lay.s, r: lay.r }, (lay.r * t * k * m) as u64,
        8 * (lay.r * t * k * m) as u64);
    full
}

#[allow(clippy::too_many_arguments)]
fn moe_backward(b: &mut RankBuilder, spec: &ExperimentSpec, groups: &DataExpertGroups, lay: &Layout, rank: usize, layer: usize, sv: &MoeSaved,
    dout: BufId) -> BufId {
    let d = &sv.dims;
    let (t, m, k, f) = (d.tokens, d.d_model, d.top_k, spec.model.d_ffn);
    let (s, r, g) = (lay.s, lay.r, lay.g);
    let (hs, hr) = (f / s, f / r);
    let ep_group = groups.ep_group(rank);
    let bound = recv_bound(spec, lay);
    let dback = b.buf(format!("L{layer}.moe.dback"), t * k * m, Mc::CommBuffers);
    let dweights = b.buf(format!("L{layer}.route.dweights"), t * k, Mc::Activations);
    b.op("combine_bwd", Stage::Combine, Pass::Backward,
        OpKind::CombineBwd { dout, back: sv.back, slots: sv.slots, weights: sv.r.weights, dback, dweights, dims: d.clone() },
        4 * (t * k * m) as u64, 4 * (2 * t * k * m + t * m) as u64);
    let dy = to_members(b, d, lay, layer, dback, sv.r.gathered, ep_group, "dback", bound, Mc::Temporaries, Pass::Backward);
    let [w1, b1, w2, b2] = sv.own;
    let wide_grad = |b: &mut RankBuilder, own: BufId, tag: &str, elems: usize| {
        if g > 1 { b.buf(format!("L{layer}.expert.{tag}_wide.grad"), elems, Mc::Grads) } else { b.grad(own) }
    };
    let gw2 = wide_grad(b, w2, "w2", hr * m);
    let gb2 = b.grad(b2);
    let da = b.dyn_buf(format!("L{layer}.expert.dact"), bound * hr, Mc::Temporaries);
    // Every copy q sees the same rows, so each computes its chunk's part of the b2 gradient.
    b.op("expert_gemm2_bwd", Stage::ExpertGemm2, Pass::Backward,
        OpKind::ExpertLinearPartBwd { x: sv.a, w: sv.wide[2], dy, dx: da, dw: gw2, dbias: Some(gb2), n_local: 1, d_in: hr, d_out: m },
        2 * gemm_flops(bound, hr, m), 8 * (bound * m + m * hr + bound * hr) as u64);
    let dh = b.dyn_buf(format!("L{layer}.expert.dh"), bound * hr, Mc::Temporaries);
    b.op("expert_act_bwd", Stage::Act, Pass::Backward, OpKind::ActBwd { h: sv.h, da, dh, act: spec.model.activation },
        10 * (bound * hr) as u64, 12 * (bound * hr) as u64);
    let gw1 = wide_grad(b, w1, "w1", m * hr);
    let gb1 = wide_grad(b, b1, "b1", hr);
    let dein = b.dyn_buf(format!("L{layer}.expert.din"), bound * m, Mc::Temporaries);
    b.op("expert_gemm1_bwd", Stage::ExpertGemm1, Pass::Backward,
        OpKind::ExpertLinearBwd { x: sv.ein, w: sv.wide[0], dy: dh, dx: dein, dw: gw1, dbias: gb1, n_local: 1, d_in: m, d_out: hr },
        2 * gemm_flops(bound, m, hr), 8 * (bound * m + m * hr + bound * hr) as u64);
    if g > 1 {
        let sg = lay.slice_group(rank);
        let gw1g = b.buf(format!("L{layer}.expert.w1_gathered.grad"), g * m * hs, Mc::Grads);
        b.op("expert_w1_columns_bwd", Stage::Permute, Pass::Backward, OpKind::SwapAxes { src: gw1, dst: gw1g, shape: (1, m, g, hs) }, 0,
            8 * (m * hr) as u64);
        for (tag, full, own) in [("w1", gw1g, w1), ("b1", gb1, b1), ("w2", gw2, w2)] {
            let recv = b.grad(own);
            let bytes = b.f32_bytes_of(full);
            b.op(format!("expert_reduce_scatter_{tag}"), Stage::ReduceScatter, Pass::Backward, OpKind::ReduceScatter { group: sg, send: full, recv },
                0, bytes);
        }
        let bytes = b.f32_bytes_of(gb2);
        b.op("expert_allreduce_b2", Stage::AllReduce, Pass::Backward, OpKind::AllReduce { group: sg, bufs: vec![gb2] }, 0, bytes);
    }
    // The input gradient's rows go back as the forward's outputs did: the same counts.
    let dsend = from_members(b, d, lay, layer, dein, sv.recv_counts, sv.r.gathered, ep_group, "dsend", Pass::Backward);
    blocks::route_backward(b, spec, layer, &sv.r, d, sv.slots, dsend, dweights, dout)
}
