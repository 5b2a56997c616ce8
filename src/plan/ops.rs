//! [`OpKind`]: the closed set of operations a backend must implement. Each variant names
//! its buffers; [`OpKind::io`] lists what it reads and writes, from which the plan derives
//! dependencies and lifetimes.

use super::{BufId, GroupId};
use crate::spec::{Activation, Capacity};
use serde::Serialize;

/// Heads per call of the attention core's loop on the cuda executor (its score and `dP`
/// scratch holds this many `seq x seq` matrices); the sim prices the loop at this batch.
pub const ATTN_HEADS_PER_SLICE: usize = 4;

/// Attention geometry on one rank.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AttnDims {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Heads.
    pub heads: usize,
    /// Model width.
    pub d_model: usize,
}

/// Routing geometry of one MoE layer on one rank (shared by the routing-aware ops).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MoeDims {
    /// Tokens on this rank.
    pub tokens: usize,
    /// Model width M.
    pub d_model: usize,
    /// Experts E.
    pub n_experts: usize,
    /// Choices per token.
    pub top_k: usize,
    /// Ranks whose tokens share the capacity (the data-parallel world), in data order.
    pub data_world: usize,
    /// This rank's index in data order.
    pub data_rank: usize,
    /// Global data ranks of this rank's expert-parallel group, in group order; peer p owns
    /// experts `[p * E / ep, (p + 1) * E / ep)`.
    pub ep_peers: Vec<usize>,
    /// This rank's index in its expert-parallel group.
    pub ep_index: usize,
    /// Capacity rule.
    pub capacity: Capacity,
    /// Rows per local expert in the expert buffers; `None` when decided at run time (dropless).
    pub rows_per_expert: Option<usize>,
}

impl MoeDims {
    /// Experts per rank.
    pub fn local_experts(&self) -> usize {
        self.n_experts / self.ep_peers.len()
    }

    /// Rows per local expert of a dropless expert layout whose busiest local expert takes
    /// `load` rows: `load` rounded up by [`aligned_rows`] to [`DROPLESS_ROW_ALIGN`], at most the
    /// plan's bound (every token of every peer). The extra rows are zero; the rounding keeps
    /// the number of distinct expert GEMM shapes small while routing changes every step
    /// (cuBLAS chooses an algorithm on the host per new shape, up to milliseconds).
    pub fn dropless_rows(&self, load: usize) -> usize {
        aligned_rows(load, self.tokens * self.ep_peers.len(), DROPLESS_ROW_ALIGN)
    }
}

/// Smallest row multiple of dropless expert blocks and of the GEMMs over their rows.
pub const DROPLESS_ROW_ALIGN: usize = 128;

/// `used` rounded up to a multiple of the larger of `align` and an eighth of the largest power
/// of two not above `used` (so at most 8 sizes per octave, at most 1/8 padding above `align`),
/// capped at `rows`; `align` <= 1 or `used` = 0 means exactly `used` (capped).
pub fn aligned_rows(used: usize, rows: usize, align: usize) -> usize {
    if align <= 1 || used == 0 {
        return used.min(rows);
    }
    let step = row_bucket_step(used, align);
    used.div_ceil(step).saturating_mul(step).min(rows)
}

/// The bucket width [`aligned_rows`] rounds `used` (> 0) rows up to: the larger of `align`
/// and an eighth of the largest power of two not above `used`.
pub fn row_bucket_step(used: usize, align: usize) -> usize {
    let octave = 1usize << (usize::BITS - 1 - used.max(1).leading_zeros());
    align.max(octave / 8)
}

/// Host time of one call an expert op makes per expert when it runs one GEMM per expert (a
/// cuBLAS call or a bias launch), seconds: what one H100 host took to issue them (10-14 us a
/// call, 2026-11-23).
pub const EXPERT_CALL_S: f64 = 12e-6;

/// Nominal GEMM rates (bf16, f32; FLOP/s) for pricing the rows a strided-batched GEMM pads.
pub const PADDING_FLOPS: (f64, f64) = (400e12, 40e12);

/// Whether a dropless expert op pays to run one GEMM per expert over its `gemm_rows` (each
/// expert's rows, rounded up) rather than one strided-batched GEMM over whole blocks of
/// `block_rows`. A per-expert GEMM of two or more waves of 128 x 128 tiles over `sms`
/// multiprocessors (its smallest product: `y` forward, `dx` or `dw` backward) keeps the GPU
/// busy while the host issues the next call, so per expert pays; smaller ones run part-filled
/// waves while the GPU waits on the calls, so the padding the batched GEMM computes (`gemms`
/// products of `d_in x d_out` per row) is held against `calls` calls per non-empty expert at
/// [`EXPERT_CALL_S`]. Measured on H100 and H200 (2026-11-23): 64 experts of 2,048 x 1,408
/// (about 1,500 rows each) go batched, 1-12% faster a step by host (H200 4%); 8 experts of
/// 4,096 x 14,336 at 512 or 4,096 rows stay per expert.
#[allow(clippy::too_many_arguments)]
pub fn per_expert_pays(gemm_rows: &[usize], block_rows: usize, d_in: usize, d_out: usize, gemms: usize, calls: usize, bf16: bool, sms: usize) -> bool {
    let busy: Vec<usize> = gemm_rows.iter().copied().filter(|&r| r > 0).collect();
    if busy.is_empty() {
        return true;
    }
    let rows = busy.iter().sum::<usize>() / busy.len();
    let tiles = |a: usize, b: usize| a.div_ceil(128) * b.div_ceil(128);
    let smallest = if gemms == 1 { tiles(rows, d_out) } else { tiles(rows, d_in).min(tiles(d_in, d_out)) };
    if smallest >= 2 * sms.max(1) {
        return true;
    }
    let padded: usize = busy.iter().map(|&r| block_rows.saturating_sub(r)).sum::<usize>() + (gemm_rows.len() - busy.len()) * block_rows;
    let rate = if bf16 { PADDING_FLOPS.0 } else { PADDING_FLOPS.1 };
    let padding_s = 2.0 * padded as f64 * d_in as f64 * d_out as f64 * gemms as f64 / rate;
    let host_s = busy.len() as f64 * calls as f64 * EXPERT_CALL_S;
    padding_s >= host_s
}

/// What an op computes. Shapes are per rank; `T` tokens, `M` model width.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum OpKind {
    /// Draw the step's inputs `x[T, M]` and regression targets for data shard `shard`.
    LoadBatch { x: BufId, target: BufId, shard: usize, batch: usize, seq: usize, d_model: usize },
    /// `y = LN(x)`, saving (mean, rstd) per row in `stats[T, 2]`.
    LayerNorm { x: BufId, gamma: BufId, beta: BufId, y: BufId, stats: BufId },
    /// `dx = LN'(dy) (+ residual)`, `dgamma`, `dbeta`.
    LayerNormBwd { x: BufId, gamma: BufId, stats: BufId, dy: BufId, residual: Option<BufId>, dx: BufId, dgamma: BufId, dbeta: BufId },
    /// `y[rows, out] = x[rows, in] w[in, out] (+ bias) (+ residual)`.
    Linear { x: BufId, w: BufId, bias: Option<BufId>, residual: Option<BufId>, y: BufId, rows: usize, d_in: usize, d_out: usize },
    /// Gradients of [`OpKind::Linear`]; `dx` accumulates when `accumulate_dx`.
    LinearBwd { x: BufId, w: BufId, dy: BufId, dx: Option<BufId>, dw: BufId, dbias: Option<BufId>, accumulate_dx: bool, rows: usize, d_in: usize, d_out: usize },
    /// Elementwise activation.
    Act { h: BufId, a: BufId, act: Activation },
    /// `dh = da * act'(h)`.
    ActBwd { h: BufId, da: BufId, dh: BufId, act: Activation },
    /// Causal attention core: `qkv[T, 3M]` -> `probs`, `ctx[T, M]`.
    AttnCore { qkv: BufId, probs: BufId, ctx: BufId, dims: AttnDims },
    /// Gradient of the attention core into `dqkv[T, 3M]`.
    AttnCoreBwd { qkv: BufId, probs: BufId, dctx: BufId, dqkv: BufId, dims: AttnDims },
    /// Softmax, top-k and local stats `[(k+1) E]`.
    Route { logits: BufId, probs: BufId, idx: BufId, weights: BufId, stats: BufId, n_experts: usize, top_k: usize, renormalize: bool },
    /// Backward of routing and the aux loss: `dlogits` from `dweights`.
    RouteBwd { probs: BufId, idx: BufId, dweights: BufId, gathered: BufId, dlogits: BufId, dims: MoeDims, renormalize: bool, aux_coef: f32 },
    /// Apply capacity and pack kept rows for each expert-parallel peer into `send` (ordered by
    /// expert, choice, token); `slots[T, k]` gets each assignment's send row or -1.
    Dispatch { x: BufId, idx: BufId, gathered: BufId, send: BufId, send_counts: BufId, slots: BufId, dims: MoeDims },
    /// `dx[t] = sum_j dsend[slots[t, j]]`.
    DispatchBwd { dsend: BufId, slots: BufId, dx: BufId, dims: MoeDims },
    /// Received rows (peer-major) -> expert buffer `[E_local, rows_per_expert, M]`, zero padded.
    ExpertLayout { recv: BufId, gathered: BufId, out: BufId, dims: MoeDims },
    /// Expert buffer -> rows in received order, with per-peer counts, to send back.
    ExpertUnlayout { input: BufId, gathered: BufId, send: BufId, send_counts: BufId, dims: MoeDims },
    /// Per expert: `y[e] = x[e] w[e] + b[e]` with `x[E_l, R, in]`.
    ExpertLinear { x: BufId, w: BufId, bias: BufId, y: BufId, n_local: usize, d_in: usize, d_out: usize },
    /// Gradients of [`OpKind::ExpertLinear`].
    ExpertLinearBwd { x: BufId, w: BufId, dy: BufId, dx: BufId, dw: BufId, dbias: BufId, n_local: usize, d_in: usize, d_out: usize },
    /// `out[t] = residual[t] + sum_j w[t, j] back[slots[t, j]]`.
    Combine { back: BufId, slots: BufId, weights: BufId, residual: BufId, out: BufId, dims: MoeDims },
    /// `dback[slots[t, j]] = w[t, j] dout[t]`, `dweights[t, j] = dout[t] . back[slot]`.
    CombineBwd { dout: BufId, back: BufId, slots: BufId, weights: BufId, dback: BufId, dweights: BufId, dims: MoeDims },
    /// `loss[1] = sum((y - target)^2) / (2 N M)` over this rank's rows; `dy` when training.
    Loss { y: BufId, target: BufId, loss: BufId, dy: Option<BufId>, n_global: usize, d_model: usize },
    /// Gather `send` from every member into `recv` (member-major).
    AllGather { group: GroupId, send: BufId, recv: BufId },
    /// Sum the listed buffers over the group, in place.
    AllReduce { group: GroupId, bufs: Vec<BufId> },
    /// Variable all-to-all: rows of `row_len` floats, `send_counts[p]` rows to member p;
    /// `recv` gets member-major rows.
    AllToAllV { group: GroupId, send: BufId, send_counts: BufId, recv: BufId, row_len: usize },
    /// [`OpKind::AllToAllV`] over an expert-parallel group of `nodes x gpus_per_node` members
    /// (member p = node * gpus_per_node + local index), done as Tutel's 2D hierarchical
    /// all-to-all: an all-to-all within the node (group `intra`, member order = local index)
    /// carrying, for each local peer g, the rows for every node's GPU g, then an all-to-all
    /// among the same-local-index GPUs of every node (group `inter`, member order = node).
    /// `recv` gets exactly what the flat all-to-all would deliver (member-major rows).
    /// `group` is the whole expert-parallel group, whose members all take part (traces
    /// number the collective in it, so its waits line up like a flat all-to-all's).
    AllToAllV2d { group: GroupId, intra: GroupId, inter: GroupId, send: BufId, send_counts: BufId, recv: BufId, row_len: usize, gpus_per_node: usize },
    /// Sum `send` over the group and keep this member's 1/n of it (member-major slices of
    /// `send`, n = group size) in `recv`.
    ReduceScatter { group: GroupId, send: BufId, recv: BufId },
    /// Adam on (param, grad, m, v) quadruples.
    Adam { params: Vec<(BufId, BufId, BufId, BufId)>, lr: f32, beta1: f32, beta2: f32, eps: f32 },
    /// Chunk `g` of `n` (`chunk = (g, n)`) of this rank's dispatch layout (the rows of
    /// [`OpKind::Dispatch`]'s `send`): rows `[len*g/n, len*(g+1)/n)` of each expert's block of
    /// `len` kept rows, expert-major, into `part`, with per-peer row counts. `src` is the
    /// dispatch layout itself, or token rows `[T, M]` read through `slots` when given.
    /// `reserve` is the receive buffer of the all-to-all that sends `part`: allocated here,
    /// when the all-to-all is issued (as a stream-ordered allocator does), and filled by it.
    ChunkSlice { src: BufId, slots: Option<BufId>, gathered: BufId, part: BufId, part_counts: BufId, reserve: Option<BufId>, dims: MoeDims, chunk: (usize, usize) },
    /// Inverse of [`OpKind::ChunkSlice`]: write `part` into chunk `g`'s rows of the dispatch
    /// layout `full`; `first` starts `full` from zeros, later chunks update it in place.
    /// `release` lists the send buffers of the all-to-all that filled `part`, read only so
    /// that they are released here, after the exchange, rather than by the comm stream.
    ChunkMerge { part: BufId, gathered: BufId, full: BufId, release: Vec<BufId>, dims: MoeDims, chunk: (usize, usize), first: bool },
    /// [`OpKind::ExpertLayout`] of one chunk's received rows; `dims.rows_per_expert` is the
    /// chunk's rows per local expert (`None`: the chunk's largest local load, at run time).
    /// `release` as in [`OpKind::ChunkMerge`].
    ChunkLayout { recv: BufId, gathered: BufId, out: BufId, release: Vec<BufId>, dims: MoeDims, chunk: (usize, usize) },
    /// [`OpKind::ExpertUnlayout`] of one chunk (rows per expert as in [`OpKind::ChunkLayout`]);
    /// `reserve` as in [`OpKind::ChunkSlice`].
    ChunkUnlayout { input: BufId, gathered: BufId, send: BufId, send_counts: BufId, reserve: Option<BufId>, dims: MoeDims, chunk: (usize, usize) },
    /// [`OpKind::ExpertLinearBwd`] whose `dw` and `dbias` are added to the buffers' contents
    /// when `accumulate` (weight gradients summed over chunks).
    ExpertLinearBwdAcc { x: BufId, w: BufId, dy: BufId, dx: BufId, dw: BufId, dbias: BufId, n_local: usize, d_in: usize, d_out: usize, accumulate: bool },
    /// DeepSpeed-TED's side of duplicate-token dropping after the all-to-all and the TP
    /// all-gather: `recv` holds, member-major over the TP group, member j's received rows of
    /// chunk `(j, tp)` (each member-major over the expert-parallel peers, then local expert, as
    /// [`OpKind::ChunkLayout`] reads them); writes the full expert buffer `[E_local, R, M]`
    /// in [`OpKind::ExpertLayout`]'s order.
    TpLayout { recv: BufId, gathered: BufId, out: BufId, dims: MoeDims, tp: usize },
    /// From a full expert buffer (in [`OpKind::ExpertLayout`]'s order), the rows of chunk
    /// `chunk = (i, tp)` of every (source peer, local expert) block, peer-major, with per-peer
    /// counts: what [`OpKind::ExpertUnlayout`] would send, less the duplicates that the other
    /// members of the TP group send.
    TpUnlayout { input: BufId, gathered: BufId, send: BufId, send_counts: BufId, dims: MoeDims, chunk: (usize, usize) },
    /// `parts` holds, member-major over the TP group, member j's chunk `(j, tp)` of this data
    /// rank's dispatch layout (in [`OpKind::ChunkSlice`]'s order); writes the whole layout `full`.
    TpMerge { parts: BufId, gathered: BufId, full: BufId, dims: MoeDims, tp: usize },
    /// [`OpKind::ExpertLinear`] with an optional bias: `y[e] = x[e] w[e] (+ b[e])` (a
    /// row-parallel slice whose bias only one member of the TP group adds).
    ExpertLinearPart { x: BufId, w: BufId, bias: Option<BufId>, y: BufId, n_local: usize, d_in: usize, d_out: usize },
    /// Gradients of [`OpKind::ExpertLinearPart`] (`dbias` when it has a bias).
    ExpertLinearPartBwd { x: BufId, w: BufId, dy: BufId, dx: BufId, dw: BufId, dbias: Option<BufId>, n_local: usize, d_in: usize, d_out: usize },
    /// [`OpKind::Loss`] computed by a replica of a rank that reports it (tensor-parallel
    /// ranks holding the same tokens): same value and `dy`, but not added to the step's loss.
    LossReplica { y: BufId, target: BufId, loss: BufId, dy: Option<BufId>, n_global: usize, d_model: usize },
    /// PPMoE's index slicing: from this rank's whole dispatch layout `send` (every expert's
    /// kept rows of data rank `dims.data_rank`, expert-major), the rows of the local experts
    /// `[ep_index * E_local, (ep_index + 1) * E_local)` into `[E_local, R, M]`, zero padded
    /// (R = `dims.rows_per_expert`, or the largest local expert's rows when dropless).
    LocalLayout { send: BufId, gathered: BufId, out: BufId, dims: MoeDims },
    /// Inverse of [`OpKind::LocalLayout`]: the local experts' rows back into a whole dispatch
    /// layout `full`, zero in the rows of every other expert.
    LocalUnlayout { input: BufId, gathered: BufId, full: BufId, dims: MoeDims },
    /// [`OpKind::Combine`] with an optional residual: `out[t] = (residual[t]) + sum_j w[t, j]
    /// back[slots[t, j]]` (a partial sum when `back` holds some experts' rows only).
    CombinePart { back: BufId, slots: BufId, weights: BufId, residual: Option<BufId>, out: BufId, dims: MoeDims },
    /// Point-to-point exchange between the two members of `group` (pipeline neighbours):
    /// `send`, when given, goes to the other member, and `recv`, when given, gets what the
    /// other member sends (NCCL send and recv issued in one group call). Both members call it
    /// at the same point of the group's sequence; a member that only receives passes no
    /// `send`, one that only sends no `recv`.
    SendRecv { group: GroupId, send: Option<BufId>, recv: Option<BufId> },
    /// `dst += src` for each pair: a micro-batch's weight gradients added into the step's.
    GradAccum { pairs: Vec<(BufId, BufId)> },
    /// Tutel's sharded experts (an expert-parallel group of W = E * s members; member
    /// p = e * s + q * g + i, g = s / r, computes hidden slice q of r of expert e on chunk i of
    /// g of every block): from this rank's dispatch layout `src` (kept rows of data rank
    /// `dims.data_rank`, expert-major), for every member in order the rows of chunk (i, g) of
    /// expert e's block (each row thus goes to r members), with per-member counts.
    ShardDispatch { src: BufId, gathered: BufId, send: BufId, send_counts: BufId, dims: MoeDims, s: usize, r: usize },
    /// The rows a sharded-expert member receives from each member of its expert-parallel
    /// group (`peers`: their data ranks, in member order): chunk `chunk` of `peers[j]`'s kept
    /// rows for `expert`; written as per-member counts (what the return all-to-all sends back).
    ShardCounts { gathered: BufId, counts: BufId, dims: MoeDims, peers: Vec<usize>, expert: usize, chunk: (usize, usize) },
    /// Inverse of [`OpKind::ShardDispatch`] with the sum over the r copies: `recv` holds,
    /// member-major, each member's rows of this rank's chunk; `full` (the dispatch layout)
    /// gets, per row, the sum of its r copies.
    ShardCombine { recv: BufId, gathered: BufId, full: BufId, dims: MoeDims, s: usize, r: usize },
    /// Swap the middle two axes: `dst[x, j, i, :] = src[x, i, j, :]` for `src` of shape
    /// `[shape.0, shape.1, shape.2, shape.3]` (all-gathered column slices of weights <-> the
    /// weights, per expert).
    SwapAxes { src: BufId, dst: BufId, shape: (usize, usize, usize, usize) },
    /// `dst[x, :] = src[x, index, :]` for `src` of shape `[shape.0, shape.1, shape.2]`: one of
    /// the replicas (or blocks) along the middle axis.
    TakeBlock { src: BufId, dst: BufId, shape: (usize, usize, usize), index: usize },
}

/// The expert GEMM an op runs over expert blocks `x` (`[n_local, rows, d_in]`): what the
/// executor's per-expert-or-batched choice and the sim's pricing of it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertGemm {
    /// The row operand (expert blocks).
    pub x: BufId,
    /// Experts on this rank.
    pub n_local: usize,
    /// Input width.
    pub d_in: usize,
    /// Output width.
    pub d_out: usize,
    /// GEMMs per expert: 1 forward, 2 backward (`dx` and `dw`).
    pub gemms: usize,
    /// A bias pass per expert follows each forward GEMM.
    pub bias: bool,
}

impl ExpertGemm {
    /// Host calls per expert when the op runs one GEMM per expert: its GEMMs and bias passes.
    pub fn calls(&self) -> usize {
        self.gemms + self.bias as usize
    }
}

impl OpKind {
    /// The expert GEMM of an expert linear op (forward or backward), `None` for other ops.
    pub fn expert_gemm(&self) -> Option<ExpertGemm> {
        use OpKind::*;
        let g = |x: &BufId, n_local: &usize, d_in: &usize, d_out: &usize, gemms, bias| ExpertGemm { x: *x, n_local: *n_local, d_in: *d_in, d_out: *d_out, gemms, bias };
        match self {
            ExpertLinear { x, n_local, d_in, d_out, .. } => Some(g(x, n_local, d_in, d_out, 1, true)),
            ExpertLinearPart { x, bias, n_local, d_in, d_out, .. } => Some(g(x, n_local, d_in, d_out, 1, bias.is_some())),
            ExpertLinearBwd { x, n_local, d_in, d_out, .. }
            | ExpertLinearBwdAcc { x, n_local, d_in, d_out, .. }
            | ExpertLinearPartBwd { x, n_local, d_in, d_out, .. } => Some(g(x, n_local, d_in, d_out, 2, false)),
            _ => None,
        }
    }

    /// The process group whose members all take part in a collective (all-gather,
    /// all-reduce, all-to-all, reduce-scatter, point-to-point exchange; for the 2D
    /// all-to-all the expert-parallel group its two phases span); `None` for compute ops.
    pub fn collective_group(&self) -> Option<GroupId> {
        use OpKind::*;
        match self {
            AllGather { group, .. }
            | AllReduce { group, .. }
            | AllToAllV { group, .. }
            | AllToAllV2d { group, .. }
            | ReduceScatter { group, .. }
            | SendRecv { group, .. } => Some(*group),
            _ => None,
        }
    }

    /// (reads, writes).
    pub fn io(&self) -> (Vec<BufId>, Vec<BufId>) {
        use OpKind::*;
        let opt = |o: &Option<BufId>| o.iter().copied().collect::<Vec<_>>();
        match self {
            LoadBatch { x, target, .. } => (vec![], vec![*x, *target]),
            LayerNorm { x, gamma, beta, y, stats } => (vec![*x, *gamma, *beta], vec![*y, *stats]),
            LayerNormBwd { x, gamma, stats, dy, residual, dx, dgamma, dbeta } => {
                let mut r = vec![*x, *gamma, *stats, *dy];
                r.extend(opt(residual));
                (r, vec![*dx, *dgamma, *dbeta])
            }
            Linear { x, w, bias, residual, y, .. } => {
                let mut r = vec![*x, *w];
                r.extend(opt(bias));
                r.extend(opt(residual));
                (r, vec![*y])
            }
            LinearBwd { x, w, dy, dx, dw, dbias, accumulate_dx, .. } => {
                let mut r = vec![*x, *w, *dy];
                if *accumulate_dx {
                    r.extend(opt(dx));
                }
                let mut wr = vec![*dw];
                wr.extend(opt(dx));
                wr.extend(opt(dbias));
                (r, wr)
            }
            Act { h, a, .. } => (vec![*h], vec![*a]),
            ActBwd { h, da, dh, .. } => (vec![*h, *da], vec![*dh]),
            AttnCore { qkv, probs, ctx, .. } => (vec![*qkv], vec![*probs, *ctx]),
            AttnCoreBwd { qkv, probs, dctx, dqkv, .. } => (vec![*qkv, *probs, *dctx], vec![*dqkv]),
            Route { logits, probs, idx, weights, stats, .. } => (vec![*logits], vec![*probs, *idx, *weights, *stats]),
            RouteBwd { probs, idx, dweights, gathered, dlogits, .. } => (vec![*probs, *idx, *dweights, *gathered], vec![*dlogits]),
            Dispatch { x, idx, gathered, send, send_counts, slots, .. } => (vec![*x, *idx, *gathered], vec![*send, *send_counts, *slots]),
            DispatchBwd { dsend, slots, dx, .. } => (vec![*dsend, *slots], vec![*dx]),
            ExpertLayout { recv, gathered, out, .. } => (vec![*recv, *gathered], vec![*out]),
            ExpertUnlayout { input, gathered, send, send_counts, .. } => (vec![*input, *gathered], vec![*send, *send_counts]),
            ExpertLinear { x, w, bias, y, .. } => (vec![*x, *w, *bias], vec![*y]),
            ExpertLinearBwd { x, w, dy, dx, dw, dbias, .. } => (vec![*x, *w, *dy], vec![*dx, *dw, *dbias]),
            Combine { back, slots, weights, residual, out, .. } => (vec![*back, *slots, *weights, *residual], vec![*out]),
            CombineBwd { dout, back, slots, weights, dback, dweights, .. } => (vec![*dout, *back, *slots, *weights], vec![*dback, *dweights]),
            Loss { y, target, loss, dy, .. } => {
                let mut w = vec![*loss];
                w.extend(opt(dy));
                (vec![*y, *target], w)
            }
            AllGather { send, recv, .. } => (vec![*send], vec![*recv]),
            AllReduce { bufs, .. } => (bufs.clone(), bufs.clone()),
            AllToAllV { send, send_counts, recv, .. } => (vec![*send, *send_counts], vec![*recv]),
            AllToAllV2d { send, send_counts, recv, .. } => (vec![*send, *send_counts], vec![*recv]),
            ReduceScatter { send, recv, .. } => (vec![*send], vec![*recv]),
            Adam { params, .. } => {
                let r: Vec<BufId> = params.iter().flat_map(|(p, g, m, v)| [*p, *g, *m, *v]).collect();
                let w: Vec<BufId> = params.iter().flat_map(|(p, _, m, v)| [*p, *m, *v]).collect();
                (r, w)
            }
            ChunkSlice { src, slots, gathered, part, part_counts, reserve, .. } => {
                let mut r = vec![*src];
                r.extend(opt(slots));
                r.push(*gathered);
                let mut w = vec![*part, *part_counts];
                w.extend(opt(reserve));
                (r, w)
            }
            ChunkMerge { part, gathered, full, release, first, .. } => {
                let mut r = vec![*part, *gathered];
                r.extend(release.iter().copied());
                if !*first {
                    r.push(*full);
                }
                (r, vec![*full])
            }
            ChunkLayout { recv, gathered, out, release, .. } => {
                let mut r = vec![*recv, *gathered];
                r.extend(release.iter().copied());
                (r, vec![*out])
            }
            ChunkUnlayout { input, gathered, send, send_counts, reserve, .. } => {
                let mut w = vec![*send, *send_counts];
                w.extend(opt(reserve));
                (vec![*input, *gathered], w)
            }
            ExpertLinearBwdAcc { x, w, dy, dx, dw, dbias, accumulate, .. } => {
                let mut r = vec![*x, *w, *dy];
                if *accumulate {
                    r.extend([*dw, *dbias]);
                }
                (r, vec![*dx, *dw, *dbias])
            }
            TpLayout { recv, gathered, out, .. } => (vec![*recv, *gathered], vec![*out]),
            TpUnlayout { input, gathered, send, send_counts, .. } => (vec![*input, *gathered], vec![*send, *send_counts]),
            TpMerge { parts, gathered, full, .. } => (vec![*parts, *gathered], vec![*full]),
            ExpertLinearPart { x, w, bias, y, .. } => {
                let mut r = vec![*x, *w];
                r.extend(opt(bias));
                (r, vec![*y])
            }
            ExpertLinearPartBwd { x, w, dy, dx, dw, dbias, .. } => {
                let mut wr = vec![*dx, *dw];
                wr.extend(opt(dbias));
                (vec![*x, *w, *dy], wr)
            }
            LossReplica { y, target, loss, dy, .. } => {
                let mut w = vec![*loss];
                w.extend(opt(dy));
                (vec![*y, *target], w)
            }
            LocalLayout { send, gathered, out, .. } => (vec![*send, *gathered], vec![*out]),
            LocalUnlayout { input, gathered, full, .. } => (vec![*input, *gathered], vec![*full]),
            CombinePart { back, slots, weights, residual, out, .. } => {
                let mut r = vec![*back, *slots, *weights];
                r.extend(opt(residual));
                (r, vec![*out])
            }
            SendRecv { send, recv, .. } => (opt(send), opt(recv)),
            GradAccum { pairs } => {
                let r = pairs.iter().flat_map(|(s, d)| [*s, *d]).collect();
                (r, pairs.iter().map(|p| p.1).collect())
            }
            ShardDispatch { src, gathered, send, send_counts, .. } => (vec![*src, *gathered], vec![*send, *send_counts]),
            ShardCounts { gathered, counts, .. } => (vec![*gathered], vec![*counts]),
            ShardCombine { recv, gathered, full, .. } => (vec![*recv, *gathered], vec![*full]),
            SwapAxes { src, dst, .. } | TakeBlock { src, dst, .. } => (vec![*src], vec![*dst]),
        }
    }
}

#[cfg(test)]
mod row_bucket_tests {
    use super::{aligned_rows, per_expert_pays};

    #[test]
    fn small_experts_batch_and_large_ones_run_per_expert() {
        let sms = 132;
        // Fine-grained: 64 experts of 2,048 x 1,408 at ~1,600 rows in blocks of 2,048: under
        // two waves, 128 calls (1.5 ms) against 0.4 ms of padding: batched, both passes.
        let fine = vec![1664; 64];
        assert!(!per_expert_pays(&fine, 2048, 2048, 1408, 1, 2, true, sms));
        assert!(!per_expert_pays(&fine, 2048, 2048, 1408, 2, 2, true, sms));
        // Mixtral-ish at 4,096 rows and small-tokens at 512 rows (8 experts of 4,096 x 14,336):
        // two or more waves each, per expert.
        assert!(per_expert_pays(&[4096; 8], 5632, 4096, 14336, 1, 2, true, sms));
        assert!(per_expert_pays(&[512; 8], 640, 4096, 14336, 1, 2, true, sms));
        // small-tokens' fc2 (d_out 4,096) is under two waves; its padding still outweighs
        // its 16 calls.
        assert!(per_expert_pays(&[512; 8], 640, 14336, 4096, 1, 2, true, sms));
        // No padding at all: per expert costs only calls, so batch.
        assert!(!per_expert_pays(&[2048; 64], 2048, 2048, 1408, 1, 2, true, sms));
        // Nothing routed: nothing to batch.
        assert!(per_expert_pays(&[0; 4], 512, 64, 64, 1, 2, true, sms));
    }

    #[test]
    fn rows_round_up_to_eight_buckets_per_octave_and_stop_at_the_bound() {
        assert_eq!(aligned_rows(0, 512, 128), 0);
        assert_eq!(aligned_rows(1, 512, 128), 128);
        assert_eq!(aligned_rows(128, 512, 128), 128);
        assert_eq!(aligned_rows(129, 512, 128), 256);
        assert_eq!(aligned_rows(450, 500, 128), 500);
        assert_eq!(aligned_rows(600, 500, 128), 500);
        assert_eq!(aligned_rows(37, 500, 1), 37);
        // Above 1024 rows the step is an eighth of the octave: 4097 -> step 512 -> 4608.
        assert_eq!(aligned_rows(4097, 100_000, 128), 4608);
        assert_eq!(aligned_rows(1536, 100_000, 128), 1536);
        assert_eq!(aligned_rows(1537, 100_000, 128), 1664);
        // Monotonic, so a GEMM's rounded rows never exceed its block's rounded rows.
        let mut last = 0;
        for u in 0..20_000 {
            let r = aligned_rows(u, 1 << 30, 128);
            assert!(r >= last && r >= u && (r - u) * 8 <= u.max(1024), "{u} -> {r}");
            last = r;
        }
    }
}
