//! MPMoE (Zhang et al., "MPMoE: Memory Efficient MoE for Pre-Trained Models With Adaptive
//! Pipeline Parallelism", IEEE TPDS 2024, doi 10.1109/tpds.2024.3385639; code:
//! whuzhangzheng/MPipeMoE): the top-k MoE layer with its all-to-all/expert/all-to-all path
//! pipelined over `n` chunks, and memory reuse of the per-chunk expert buffers.
//!
//! Per MoE layer: LN -> gate -> route -> all-gather of routing stats -> dispatch (capacity over
//! the whole batch, exactly as top-k) -> for each chunk g: slice (rows `[len*g/n, len*(g+1)/n)`
//! of every (source rank, expert) block) -> all-to-all -> expert layout -> fc1 -> act -> fc2 ->
//! unlayout -> all-to-all back -> merge into the dispatch layout; then one combine (+ residual).
//!
//! Schedule: chunk g+1's slice and dispatch all-to-all are issued before chunk g's expert
//! compute, and chunk g's merge after chunk g+1's compute, so the comm stream's all-to-alls
//! overlap the compute stream's GEMMs. Backward mirrors it: chunk g+1's output-gradient
//! all-to-all (and its re-communication, when reused) is issued before chunk g's expert
//! backward; expert weight gradients accumulate over chunks.
//!
//! Memory reuse ([`Reuse`]): what a chunk's expert backward needs (dispatched input; fc1
//! output and activation) is either kept from forward or released after its last forward use
//! and restored in backward, by re-running the chunk's dispatch all-to-all from the saved
//! LayerNorm output and slots, and/or by recomputing fc1 and the activation.

use super::blocks::{self, Routed};
use super::topk::{a2a, expert_param, moe_dims};
use super::DataExpertGroups;
use crate::math::linalg::gemm_flops;
use crate::plan::ops::MoeDims;
use crate::plan::{BufId, OpKind, Plan, RankBuilder, RankPlan};
use crate::spec::{Degree, ExperimentSpec, MpmoeSpec, Reuse};
use crate::taxonomy::{MemCategory as Mc, Pass, Stage};

/// Buffers of one chunk that its expert backward reads; `None` when the reuse strategy
/// restores them in backward instead.
struct ChunkSaved {
    ein: Option<BufId>,
    h: Option<BufId>,
    a: Option<BufId>,
}

/// Everything the pipelined MoE sublayer's backward needs from its forward.
/// What an MPMoE (or Tutel r = 1) MoE sublayer's backward needs from its forward.
pub(super) struct MoeSaved {
    dims: MoeDims,
    /// The routing front: `ln_moe`, gate, choices, routing statistics.
    r: Routed,
    slots: BufId,
    back: BufId,
    w1: BufId,
    b1: BufId,
    w2: BufId,
    b2: BufId,
    chunks: Vec<ChunkSaved>,
}

/// Chunk geometry of one MoE layer: the pipelining degree and per-chunk buffer bounds.
struct Chunking {
    /// Pipelining degree n.
    n: usize,
    /// Dims of the per-chunk expert ops: `rows_per_expert` is the chunk's bound (or `None`).
    cdims: MoeDims,
    /// Rows per local expert in a chunk's expert buffers (an upper bound when dropless).
    rows: usize,
    /// Rows of one chunk of this rank's dispatch layout (upper bound).
    part_rows: usize,
    /// Reuse strategy.
    reuse: Reuse,
    /// Ranks per node when the all-to-alls are Tutel's 2D hierarchical ones.
    gpus_per_node: Option<usize>,
}

/// How the chunked MoE layer is pipelined and communicated: MPMoE's options, or Tutel's
/// (no reuse, a chosen degree, optionally the 2D hierarchical all-to-all).
#[derive(Debug, Clone, Copy)]
pub(super) struct Pipeline {
    /// Pipelining degree (chunks per MoE layer).
    pub chunks: usize,
    /// What backward restores instead of keeping every chunk's expert buffers.
    pub reuse: Reuse,
    /// `Some(gpus per node)`: chunk all-to-alls are 2D hierarchical over the groups that
    /// [`super::tutel::add_2d_groups`] added.
    pub gpus_per_node: Option<usize>,
}

/// The chunk count a plan uses when built directly from a `chunks = "auto"` spec (outside
/// `crate::run`, which resolves it with the performance model first).
pub const AUTO_PLAN_CHUNKS: usize = 2;

/// The chunk count and reuse strategy a plan built from `o` runs: an unresolved `"auto"`
/// chunk count is [`AUTO_PLAN_CHUNKS`], an unresolved `"auto"` reuse keeps every buffer, as
/// `None`.
pub(super) fn planned(o: &MpmoeSpec) -> (usize, Reuse) {
    let chunks = match o.chunks {
        Degree::Fixed(n) => n,
        Degree::Auto => AUTO_PLAN_CHUNKS,
    };
    (chunks, if o.reuse == Reuse::Auto { Reuse::None } else { o.reuse })
}

impl From<MpmoeSpec> for Pipeline {
    fn from(o: MpmoeSpec) -> Self {
        let (chunks, reuse) = planned(&o);
        Pipeline { chunks, reuse, gpus_per_node: None }
    }
}

impl Chunking {
    fn new(dims: &MoeDims, opts: Pipeline) -> Self {
        let n = opts.chunks.max(1);
        let ep = dims.ep_peers.len();
        // A chunk takes ceil(len / n) rows at most from each block, so from the ep blocks
        // that feed one expert (at most R rows together) it takes at most (R + ep(n-1)) / n.
        let bound = |r: usize, blocks: usize| r.min((r + blocks * (n - 1)) / n);
        let full_rows = dims.rows_per_expert.unwrap_or(dims.tokens * ep);
        let rows = bound(full_rows, ep);
        let part_rows = bound(dims.tokens * dims.top_k, dims.n_experts);
        let cdims = MoeDims { rows_per_expert: dims.rows_per_expert.map(|_| rows), ..dims.clone() };
        Chunking { n, cdims, rows, part_rows, reuse: opts.reuse, gpus_per_node: opts.gpus_per_node }
    }
    fn dropless(&self) -> bool {
        self.cdims.rows_per_expert.is_none()
    }
    /// A chunk's expert-side buffer: static, or routing-dependent when dropless.
    fn route_buf(&self, b: &mut RankBuilder, name: String, elems: usize, cat: Mc) -> BufId {
        if self.dropless() { b.dyn_buf(name, elems, cat) } else { b.buf(name, elems, cat) }
    }
}

/// Names of one chunk's slice-or-unlayout op, its all-to-all and its buffers.
#[derive(Clone, Copy)]
struct ChunkNames {
    permute: &'static str,
    a2a: &'static str,
    buf: &'static str,
}

const DISPATCH: ChunkNames = ChunkNames { permute: "dispatch_slice", a2a: "dispatch_a2a", buf: "send" };
const COMBINE: ChunkNames = ChunkNames { permute: "expert_unlayout", a2a: "combine_a2a", buf: "back" };
const COMBINE_BWD: ChunkNames = ChunkNames { permute: "combine_slice_bwd", a2a: "combine_a2a_bwd", buf: "dback" };
const RECOMM: ChunkNames = ChunkNames { permute: "dispatch_slice_recomm", a2a: "dispatch_a2a_recomm", buf: "send_recomm" };
const DISPATCH_BWD: ChunkNames = ChunkNames { permute: "expert_unlayout_bwd", a2a: "dispatch_a2a_bwd", buf: "dsend" };

/// Build the MPMoE plan for every rank.
pub fn build(spec: &ExperimentSpec) -> Plan {
    let groups = DataExpertGroups::new(spec.layout.dp, spec.layout.ep);
    let mut opts: Pipeline = spec.mpmoe.unwrap_or_default().into();
    opts.chunks = opts.chunks.min(spec.tokens_per_rank().max(1));
    build_with(spec, &groups, opts)
}

/// Build the chunked plan for every rank with explicit pipeline options (shared with Tutel).
pub(super) fn build_with(spec: &ExperimentSpec, groups: &DataExpertGroups, opts: Pipeline) -> Plan {
    let ranks = (0..spec.world()).map(|r| build_rank(spec, groups, r, opts)).collect();
    Plan { spec: spec.clone(), groups: groups.groups.clone(), ranks }
}

/// The pipelined MoE sublayer of one rank, for the shared block skeleton.
struct Sublayer<'a> {
    spec: &'a ExperimentSpec,
    groups: &'a DataExpertGroups,
    rank: usize,
    opts: Pipeline,
}

impl blocks::MoeSublayer for Sublayer<'_> {
    type Saved = MoeSaved;
    fn forward(&mut self, b: &mut RankBuilder, layer: usize, x: BufId) -> (BufId, MoeSaved) {
        moe_forward(b, self.spec, self.groups, self.rank, layer, x, self.opts)
    }
    fn backward(&mut self, b: &mut RankBuilder, layer: usize, s: &MoeSaved, dout: BufId) -> BufId {
        moe_backward(b, self.spec, self.groups, self.rank, layer, s, dout, self.opts)
    }
}

fn build_rank(spec: &ExperimentSpec, groups: &DataExpertGroups, rank: usize, opts: Pipeline) -> RankPlan {
    blocks::expert_parallel_rank(spec, groups, rank, &mut Sublayer { spec, groups, rank, opts })
}

/// What a chunk's all-to-all delivered: the received rows, and the send-side buffers that the
/// op consuming `recv` releases (so every allocation and release happens on the compute
/// stream in issue order, as with a stream-ordered allocator, and the plan's predicted peak
/// holds however the comm stream's all-to-alls interleave with compute).
struct Sent {
    recv: BufId,
    release: Vec<BufId>,
}

/// Slice chunk `g` out of a dispatch-layout buffer (`src`, or token rows through `slots`) and
/// send it to the experts' owners (the slice itself is the received rows when ep = 1).
#[allow(clippy::too_many_arguments)]
fn send_chunk(b: &mut RankBuilder, c: &Chunking, dims: &MoeDims, groups: &DataExpertGroups, rank: usize, layer: usize, g: usize,
    src: BufId, slots: Option<BufId>, gathered: BufId, names: ChunkNames, pass: Pass) -> Sent {
    let (m, el, ep) = (dims.d_model, dims.local_experts(), dims.ep_peers.len());
    let what = names.buf;
    b.set_chunk(Some(g as u32));
    let part = b.buf(format!("L{layer}.moe.c{g}.{what}"), c.part_rows * m, Mc::CommBuffers);
    let counts = b.index_buf(format!("L{layer}.moe.c{g}.{what}_counts"), ep, Mc::CommBuffers);
    let reserve = (ep > 1).then(|| c.route_buf(b, format!("L{layer}.moe.c{g}.{what}_recv"), el * c.rows * m, Mc::CommBuffers));
    b.op(format!("c{g}.{}", names.permute), Stage::Permute, pass,
        OpKind::ChunkSlice { src, slots, gathered, part, part_counts: counts, reserve, dims: dims.clone(), chunk: (g, c.n) }, 0,
        8 * (c.part_rows * m) as u64);
    let sent = match reserve {
        Some(r) => {
            chunk_a2a(b, c, &format!("c{g}.{}", names.a2a), pass, groups, rank, part, counts, r, m);
            Sent { recv: r, release: vec![part, counts] }
        }
        None => Sent { recv: part, release: Vec::new() },
    };
    b.set_chunk(None);
    sent
}

/// A chunk's all-to-all over the expert-parallel group: flat, or 2D hierarchical.
#[allow(clippy::too_many_arguments)]
fn chunk_a2a(b: &mut RankBuilder, c: &Chunking, name: &str, pass: Pass, groups: &DataExpertGroups, rank: usize, send: BufId,
    counts: BufId, recv: BufId, m: usize) {
    match c.gpus_per_node {
        Some(gpn) => super::tutel::a2a_2d(b, name, pass, groups, rank, gpn, send, counts, recv, m),
        None => a2a(b, name, pass, groups.ep_group(rank), send, counts, recv, m),
    }
}

/// Unlayout chunk `g`'s expert rows and send them back to their source ranks; returns the
/// chunk in dispatch-layout order (for [`OpKind::ChunkMerge`]).
#[allow(clippy::too_many_arguments)]
fn return_chunk(b: &mut RankBuilder, c: &Chunking, groups: &DataExpertGroups, rank: usize, layer: usize, g: usize, input: BufId,
    gathered: BufId, names: ChunkNames, pass: Pass) -> Sent {
    let (m, el, ep) = (c.cdims.d_model, c.cdims.local_experts(), c.cdims.ep_peers.len());
    let what = names.buf;
    let send = c.route_buf(b, format!("L{layer}.moe.c{g}.{what}_send"), el * c.rows * m, Mc::CommBuffers);
    let counts = b.index_buf(format!("L{layer}.moe.c{g}.{what}_counts"), ep, Mc::CommBuffers);
    let reserve = (ep > 1).then(|| b.buf(format!("L{layer}.moe.c{g}.{what}"), c.part_rows * m, Mc::CommBuffers));
    b.op(format!("c{g}.{}", names.permute), Stage::Permute, pass,
        OpKind::ChunkUnlayout { input, gathered, send, send_counts: counts, reserve, dims: c.cdims.clone(), chunk: (g, c.n) }, 0,
        8 * (el * c.rows * m) as u64);
    match reserve {
        Some(r) => {
            chunk_a2a(b, c, &format!("c{g}.{}", names.a2a), pass, groups, rank, send, counts, r, m);
            Sent { recv: r, release: vec![send, counts] }
        }
        None => Sent { recv: send, release: Vec::new() },
    }
}

/// Write chunk `g` (dispatch-layout order) into its rows of the full dispatch layout `full`.
#[allow(clippy::too_many_arguments)]
fn merge_chunk(b: &mut RankBuilder, c: &Chunking, dims: &MoeDims, g: usize, part: Sent, gathered: BufId, full: BufId, name: &str, pass: Pass) {
    b.set_chunk(Some(g as u32));
    b.op(format!("c{g}.{name}"), Stage::Permute, pass,
        OpKind::ChunkMerge { part: part.recv, gathered, full, release: part.release, dims: dims.clone(), chunk: (g, c.n), first: g == 0 }, 0,
        8 * (c.part_rows * dims.d_model) as u64);
    b.set_chunk(None);
}

/// The received rows of chunk `g` -> its expert input buffer `[E_local, R_c, M]`.
#[allow(clippy::too_many_arguments)]
fn layout_chunk(b: &mut RankBuilder, c: &Chunking, layer: usize, g: usize, sent: Sent, gathered: BufId, name: &str, cat: Mc,
    op: &str, pass: Pass) -> BufId {
    let (m, el) = (c.cdims.d_model, c.cdims.local_experts());
    let out = c.route_buf(b, format!("L{layer}.expert.c{g}.{name}"), el * c.rows * m, cat);
    let kind = OpKind::ChunkLayout { recv: sent.recv, gathered, out, release: sent.release, dims: c.cdims.clone(), chunk: (g, c.n) };
    b.op(format!("c{g}.{op}"), Stage::Permute, pass, kind,
        0, 8 * (el * c.rows * m) as u64);
    out
}

/// fc1 and the activation of one chunk: returns (h, a).
#[allow(clippy::too_many_arguments)]
fn fc1_act(b: &mut RankBuilder, spec: &ExperimentSpec, c: &Chunking, layer: usize, g: usize, ein: BufId, w1: BufId, b1: BufId, pass: Pass,
    suffix: &str) -> (BufId, BufId) {
    let (m, el, f) = (c.cdims.d_model, c.cdims.local_experts(), spec.model.d_ffn);
    let rows = c.rows;
    let h = c.route_buf(b, format!("L{layer}.expert.c{g}.h{suffix}"), el * rows * f, Mc::Activations);
    b.op(format!("c{g}.expert_gemm1{suffix}"), Stage::ExpertGemm1, pass,
        OpKind::ExpertLinear { x: ein, w: w1, bias: b1, y: h, n_local: el, d_in: m, d_out: f },
        el as u64 * gemm_flops(rows, m, f), 4 * (el * (rows * m + m * f + rows * f)) as u64);
    let a = c.route_buf(b, format!("L{layer}.expert.c{g}.act{suffix}"), el * rows * f, Mc::Activations);
    b.op(format!("c{g}.expert_act{suffix}"), Stage::Act, pass, OpKind::Act { h, a, act: spec.model.activation },
        8 * (el * rows * f) as u64, 8 * (el * rows * f) as u64);
    (h, a)
}

/// The pipelined MoE sublayer forward of `layer` on rank `rank` (also Tutel's r = 1 layers).
pub(super) fn moe_forward(b: &mut RankBuilder, spec: &ExperimentSpec, groups: &DataExpertGroups, rank: usize, layer: usize, x: BufId,
    opts: Pipeline) -> (BufId, MoeSaved) {
    let dims = moe_dims(spec, groups, rank);
    let (t, m, k, f) = (dims.tokens, dims.d_model, dims.top_k, spec.model.d_ffn);
    let ep = dims.ep_peers.len();
    let el = dims.local_experts();
    let c = Chunking::new(&dims, opts);
    let rows = c.rows;
    let routed = blocks::gate_and_route(b, spec, layer, x, &dims, groups.world());
    let (idx, weights, gathered) = (routed.idx, routed.weights, routed.gathered);
    // Capacity and the dispatch layout are decided once over the whole batch (as in top-k);
    // the chunks only split the kept rows, so chunking never changes which tokens drop.
    let send = b.buf(format!("L{layer}.moe.send"), t * k * m, Mc::CommBuffers);
    let send_counts = b.index_buf(format!("L{layer}.moe.send_counts"), ep, Mc::CommBuffers);
    let slots = b.index_buf(format!("L{layer}.moe.slots"), t * k, Mc::Activations);
    b.op("dispatch", Stage::Permute, Pass::Forward,
        OpKind::Dispatch { x: routed.ln.y, idx, gathered, send, send_counts, slots, dims: dims.clone() }, 0, 8 * (t * k * m) as u64);
    let w1 = expert_param(b, layer, "w1", &dims, m * f, 1.0 / (m as f32).sqrt());
    let b1 = expert_param(b, layer, "b1", &dims, f, 0.02);
    let w2 = expert_param(b, layer, "w2", &dims, f * m, 1.0 / (f as f32).sqrt());
    let b2 = expert_param(b, layer, "b2", &dims, m, 0.02);
    let back = b.buf(format!("L{layer}.moe.back"), t * k * m, Mc::CommBuffers);

    let mut recv: Vec<Option<Sent>> = (0..c.n).map(|_| None).collect();
    recv[0] = Some(send_chunk(b, &c, &dims, groups, rank, layer, 0, send, None, gathered, DISPATCH, Pass::Forward));
    let mut chunks = Vec::with_capacity(c.n);
    let mut pending: Option<(usize, Sent)> = None;
    for g in 0..c.n {
        if g + 1 < c.n {
            recv[g + 1] = Some(send_chunk(b, &c, &dims, groups, rank, layer, g + 1, send, None, gathered, DISPATCH, Pass::Forward));
        }
        b.set_chunk(Some(g as u32));
        let r = recv[g].take().expect("chunk dispatched before its compute");
        let ein = layout_chunk(b, &c, layer, g, r, gathered, "in", Mc::Activations, "expert_layout", Pass::Forward);
        let (h, a) = fc1_act(b, spec, &c, layer, g, ein, w1, b1, Pass::Forward, "");
        let y = c.route_buf(b, format!("L{layer}.expert.c{g}.out"), el * rows * m, Mc::Temporaries);
        b.op(format!("c{g}.expert_gemm2"), Stage::ExpertGemm2, Pass::Forward,
            OpKind::ExpertLinear { x: a, w: w2, bias: b2, y, n_local: el, d_in: f, d_out: m },
            el as u64 * gemm_flops(rows, f, m), 4 * (el * (rows * m + m * f + rows * f)) as u64);
        let back_g = return_chunk(b, &c, groups, rank, layer, g, y, gathered, COMBINE, Pass::Forward);
        b.set_chunk(None);
        // Chunk g-1's combine all-to-all had chunk g's experts to overlap with.
        if let Some((pg, part)) = pending.take() {
            merge_chunk(b, &c, &dims, pg, part, gathered, back, "combine_merge", Pass::Forward);
        }
        pending = Some((g, back_g));
        chunks.push(ChunkSaved {
            ein: (!c.reuse.recomm()).then_some(ein),
            h: (!c.reuse.recompute()).then_some(h),
            a: (!c.reuse.recompute()).then_some(a),
        });
    }
    if let Some((pg, part)) = pending {
        merge_chunk(b, &c, &dims, pg, part, gathered, back, "combine_merge", Pass::Forward);
    }
    let out = b.buf(format!("L{layer}.moe.out"), t * m, Mc::Activations);
    b.op("combine", Stage::Combine, Pass::Forward,
        OpKind::Combine { back, slots, weights, residual: x, out, dims: dims.clone() }, 2 * (t * k * m) as u64, 4 * (t * k * m + 2 * t * m) as u64);
    (out, MoeSaved { dims, r: routed, slots, back, w1, b1, w2, b2, chunks })
}

/// Chunk `g`'s first backward communication: its output gradient sent to the experts, and,
/// when the dispatched input is reused, the re-communicated dispatched input.
struct BwdIn {
    dy_recv: Sent,
    x_recv: Option<Sent>,
}

#[allow(clippy::too_many_arguments)]
/// Its backward.
pub(super) fn moe_backward(b: &mut RankBuilder, spec: &ExperimentSpec, groups: &DataExpertGroups, rank: usize, layer: usize, s: &MoeSaved, dout: BufId,
    opts: Pipeline) -> BufId {
    let d = &s.dims;
    let (t, m, k, f) = (d.tokens, d.d_model, d.top_k, spec.model.d_ffn);
    let el = d.local_experts();
    let c = Chunking::new(d, opts);
    let rows = c.rows;
    let dback = b.buf(format!("L{layer}.moe.dback"), t * k * m, Mc::CommBuffers);
    let dweights = b.buf(format!("L{layer}.route.dweights"), t * k, Mc::Activations);
    b.op("combine_bwd", Stage::Combine, Pass::Backward,
        OpKind::CombineBwd { dout, back: s.back, slots: s.slots, weights: s.r.weights, dback, dweights, dims: d.clone() },
        4 * (t * k * m) as u64, 4 * (2 * t * k * m + t * m) as u64);
    let (gw1, gb1, gw2, gb2) = (b.grad(s.w1), b.grad(s.b1), b.grad(s.w2), b.grad(s.b2));
    let dsend = b.buf(format!("L{layer}.moe.dsend"), t * k * m, Mc::CommBuffers);

    let send_in = |b: &mut RankBuilder, g: usize| -> BwdIn {
        let dy_recv = send_chunk(b, &c, d, groups, rank, layer, g, dback, None, s.r.gathered, COMBINE_BWD, Pass::Backward);
        // Re-communication: the chunk's dispatch all-to-all again, from the saved LN output.
        let x_recv = c.reuse.recomm().then(|| {
            send_chunk(b, &c, d, groups, rank, layer, g, s.r.ln.y, Some(s.slots), s.r.gathered, RECOMM, Pass::Backward)
        });
        BwdIn { dy_recv, x_recv }
    };
    let mut inputs: Vec<Option<BwdIn>> = (0..c.n).map(|_| None).collect();
    inputs[0] = Some(send_in(b, 0));
    let mut pending: Option<(usize, Sent)> = None;
    for g in 0..c.n {
        if g + 1 < c.n {
            inputs[g + 1] = Some(send_in(b, g + 1));
        }
        let io = inputs[g].take().expect("chunk's gradient sent before its backward");
        let cs = &s.chunks[g];
        b.set_chunk(Some(g as u32));
        let dy = layout_chunk(b, &c, layer, g, io.dy_recv, s.r.gathered, "dout", Mc::Temporaries, "expert_layout_bwd", Pass::Backward);
        let ein = match (cs.ein, io.x_recv) {
            (Some(ein), _) => ein,
            (None, Some(r)) => layout_chunk(b, &c, layer, g, r, s.r.gathered, "in_recomm", Mc::Activations, "expert_layout_recomm", Pass::Backward),
            (None, None) => unreachable!("a released dispatched input is re-communicated"),
        };
        let (h, a) = match (cs.h, cs.a) {
            (Some(h), Some(a)) => (h, a),
            _ => fc1_act(b, spec, &c, layer, g, ein, s.w1, s.b1, Pass::Backward, "_recompute"),
        };
        let acc = g > 0;
        let da = c.route_buf(b, format!("L{layer}.expert.c{g}.dact"), el * rows * f, Mc::Temporaries);
        b.op(format!("c{g}.expert_gemm2_bwd"), Stage::ExpertGemm2, Pass::Backward,
            OpKind::ExpertLinearBwdAcc { x: a, w: s.w2, dy, dx: da, dw: gw2, dbias: gb2, n_local: el, d_in: f, d_out: m, accumulate: acc },
            2 * el as u64 * gemm_flops(rows, f, m), 8 * (el * (rows * m + m * f + rows * f)) as u64);
        let dh = c.route_buf(b, format!("L{layer}.expert.c{g}.dh"), el * rows * f, Mc::Temporaries);
        b.op(format!("c{g}.expert_act_bwd"), Stage::Act, Pass::Backward, OpKind::ActBwd { h, da, dh, act: spec.model.activation },
            10 * (el * rows * f) as u64, 12 * (el * rows * f) as u64);
        let dein = c.route_buf(b, format!("L{layer}.expert.c{g}.din"), el * rows * m, Mc::Temporaries);
        b.op(format!("c{g}.expert_gemm1_bwd"), Stage::ExpertGemm1, Pass::Backward,
            OpKind::ExpertLinearBwdAcc { x: ein, w: s.w1, dy: dh, dx: dein, dw: gw1, dbias: gb1, n_local: el, d_in: m, d_out: f, accumulate: acc },
            2 * el as u64 * gemm_flops(rows, m, f), 8 * (el * (rows * m + m * f + rows * f)) as u64);
        let dpart = return_chunk(b, &c, groups, rank, layer, g, dein, s.r.gathered, DISPATCH_BWD, Pass::Backward);
        b.set_chunk(None);
        if let Some((pg, part)) = pending.take() {
            merge_chunk(b, &c, d, pg, part, s.r.gathered, dsend, "dispatch_merge_bwd", Pass::Backward);
        }
        pending = Some((g, dpart));
    }
    if let Some((pg, part)) = pending {
        merge_chunk(b, &c, d, pg, part, s.r.gathered, dsend, "dispatch_merge_bwd", Pass::Backward);
    }
    blocks::route_backward(b, spec, layer, &s.r, d, s.slots, dsend, dweights, dout)
}
