//! DeepSpeed-TED (Singh, Ruwase, Awan, Rajbhandari, He, Bhatele, "A Hybrid Tensor-Expert-Data
//! Parallelism Approach to Optimize Mixture-of-Experts Training", ICS 2023, arXiv 2303.06318;
//! code: DeepSpeed `deepspeed/moe/sharded_moe.py`, `mappings.py`): tensor x expert x data
//! parallelism with duplicate-token dropping.
//!
//! Layout: `world = dp * ep * tp`; TP groups are consecutive ranks, the data-parallel
//! dimension is strided by `tp`, and expert-parallel groups are cut from the data-parallel
//! ranks. The `tp` ranks of a TP group hold the same tokens (one data shard), so capacity is
//! computed over the `dp * ep` shards. Dense parameters (gate, LayerNorms, backbone) are
//! replicated on every rank and computed redundantly within a TP group (no tensor-parallel
//! backbone). Each expert is tensor-sliced over its TP group: fc1 column-parallel (H/tp
//! columns of W1 and b1), fc2 row-parallel (H/tp rows of W2; b2 held and added by TP index 0
//! only), and the expert output is all-reduced over the TP group (its input gradient in
//! backward as well).
//!
//! Duplicate-token dropping (`[ted] duplicate_dropping = true`): before each all-to-all every
//! TP rank keeps only its slice `tp_index` of the capacity dimension (rows
//! `[len*i/tp, len*(i+1)/tp)` of every (source shard, expert) block, as DeepSpeed's
//! `drop_tokens(dispatched_input, dim=1)`), the all-to-all runs among the same-TP-index ranks
//! of the expert-parallel group, and an all-gather over the TP group (`gather_tokens`) restores
//! the full set: drop -> a2a -> all-gather -> TP expert -> all-reduce -> drop -> a2a ->
//! all-gather, mirrored in backward. Without it every TP rank sends the full set.
//!
//! Activation checkpointing (`[ted] checkpoint`): `full` keeps only each MoE layer's input and
//! re-runs its forward (communication included) at the start of its backward; `comm_aware`
//! also keeps the outputs of the layer's communication (all-gathered routing statistics,
//! expert input, combined-back rows) and recomputes the compute only. Recomputed ops are
//! ordinary ops in the backward pass ([`RankBuilder::set_recompute`]).

use super::blocks::{self, Routed};
use super::topk::{a2a, a2a_of_bytes, expert_param};
use super::TensorExpertDataGroups as Groups;
use crate::math::linalg::gemm_flops;
use crate::plan::ops::MoeDims;
use crate::plan::{BufId, GroupId, OpKind, ParamInit, ParamSlice, Plan, RankBuilder, RankPlan};
use crate::spec::{Capacity, Checkpoint, ExperimentSpec, Mode};
use crate::taxonomy::{MemCategory as Mc, Pass, Stage};

/// Where this rank sits in the TED layout.
#[derive(Clone, Copy)]
struct Place {
    /// Tensor-parallel degree.
    tp: usize,
    /// Index in the TP group.
    ti: usize,
    /// Whether the all-to-alls drop duplicate tokens.
    drop: bool,
    /// Activation checkpointing of the MoE layers.
    checkpoint: Checkpoint,
    tp_group: GroupId,
    ep_group: GroupId,
}

impl Place {
    /// Dropping applies around an all-to-all between TP-replicated ranks.
    fn dropping(&self, ep: usize) -> bool {
        self.drop && self.tp > 1 && ep > 1
    }
}

/// The params of one MoE layer (this rank's slices).
#[derive(Clone, Copy)]
struct MoeParams {
    gate: blocks::GateParams,
    w1: BufId,
    b1: BufId,
    w2: BufId,
    b2: Option<BufId>,
}

/// The activations the backward of one MoE layer reads.
struct Acts {
    /// The routing front: `ln_moe`, gate, choices, routing statistics.
    r: Routed,
    send_counts: BufId,
    slots: BufId,
    ein: BufId,
    h: BufId,
    a: BufId,
    back: BufId,
}

/// What the forward keeps of one MoE layer, by checkpointing mode.
enum Kept {
    /// Every activation (`checkpoint = "none"`).
    All(Acts),
    /// The layer input only (`"full"`): backward re-runs the forward, communication included.
    Input,
    /// The layer input and the outputs of the communication (`"comm_aware"`): the all-gathered
    /// routing statistics, the expert input (all-to-all and TP all-gather output, in expert
    /// layout) and the combined-back rows (return all-to-all output).
    Comm { gathered: BufId, ein: BufId, back: BufId },
}

struct MoeSaved {
    dims: MoeDims,
    x: BufId,
    prm: MoeParams,
    kept: Kept,
}

/// Build the DeepSpeed-TED plan for every rank.
pub fn build(spec: &ExperimentSpec) -> Plan {
    let l = &spec.layout;
    let groups = Groups::new(l.dp, l.ep, l.tp);
    let ranks = (0..spec.world()).map(|r| build_rank(spec, &groups, r)).collect();
    Plan { spec: spec.clone(), groups: groups.groups.clone(), ranks }
}

/// Routing geometry: the data world is the `dp * ep` shards, not the ranks.
fn moe_dims(spec: &ExperimentSpec, g: &Groups, rank: usize) -> MoeDims {
    let m = &spec.model;
    let t = spec.tokens_per_rank();
    let ep = spec.layout.ep;
    let shards = g.shards();
    let shard = g.shard(rank);
    let rows_per_expert = match spec.capacity() {
        Capacity::Factor(cf) => {
            let c = ((cf * (m.top_k * t * shards) as f64 / m.n_experts as f64).ceil() as usize).max(1);
            Some(c.min(t * ep))
        }
        // Sized at run time: the capacity depends on the step's loads.
        Capacity::Dropless | Capacity::Bounded(_) => None,
    };
    let first = shard - shard % ep;
    MoeDims {
        tokens: t,
        d_model: m.d_model,
        n_experts: m.n_experts,
        top_k: m.top_k,
        data_world: shards,
        data_rank: shard,
        ep_peers: (first..first + ep).collect(),
        ep_index: shard % ep,
        capacity: spec.capacity(),
        rows_per_expert,
    }
}

/// The tensor-sliced MoE sublayer of one rank, for the shared block skeleton.
struct Sublayer<'a> {
    spec: &'a ExperimentSpec,
    groups: &'a Groups,
    rank: usize,
    place: Place,
}

impl blocks::MoeSublayer for Sublayer<'_> {
    type Saved = MoeSaved;
    fn forward(&mut self, b: &mut RankBuilder, layer: usize, x: BufId) -> (BufId, MoeSaved) {
        moe_forward(b, self.spec, self.groups, self.rank, self.place, layer, x)
    }
    fn backward(&mut self, b: &mut RankBuilder, layer: usize, s: &MoeSaved, dout: BufId) -> BufId {
        moe_backward(b, self.spec, self.groups, self.rank, self.place, layer, s, dout)
    }
}

fn build_rank(spec: &ExperimentSpec, groups: &Groups, rank: usize) -> RankPlan {
    let training = spec.run.mode == Mode::Training;
    let mut b = RankBuilder::new(rank as u32, training, spec.model.dtype.size());
    let opts = spec.ted.unwrap_or_default();
    let place = Place {
        tp: spec.layout.tp,
        ti: groups.tp_index(rank),
        drop: opts.duplicate_dropping,
        checkpoint: opts.checkpoint,
        tp_group: groups.tp_group(rank),
        ep_group: groups.ep_group(rank),
    };
    let shards = groups.shards();
    // Every TP rank computes the same loss; TP index 0 reports it, the others are replicas.
    let role = if place.ti == 0 { blocks::LossRole::Counted } else { blocks::LossRole::Replica };
    let mut moe = Sublayer { spec, groups, rank, place };
    if blocks::model(&mut b, spec, groups.shard(rank), spec.tokens_per_rank() * shards, role, &mut moe) {
        // The TP ranks of a shard computed identical dense gradients from identical tokens:
        // sum over the distinct shards only (the same-TP-index ranks), not over the world.
        let dense = (shards > 1).then(|| groups.data_group(rank));
        let expert = (spec.layout.dp > 1).then(|| groups.edp_group(rank));
        blocks::update(&mut b, spec, dense, expert);
    }
    b.finish()
}

/// A TP slice of expert weight `tag`: each expert's full tensor, viewed as `[rows, cols]`,
/// is drawn from top-k's stream and this rank keeps columns `keep`.
#[allow(clippy::too_many_arguments)]
fn sliced_param(b: &mut RankBuilder, layer: usize, tag: &str, dims: &MoeDims, rows: usize, cols: usize, keep: (usize, usize), std: f32)
    -> BufId {
    let el = dims.local_experts();
    let first = (dims.ep_index * el) as u32;
    let init = ParamInit { tag: format!("expert.{tag}"), layer: layer as u32, experts: Some((first, el as u32)), mean: 0.0, std };
    let slice = ParamSlice { rows, cols, keep };
    b.param_sliced(&format!("L{layer}.expert.{tag}"), el * rows * (keep.1 - keep.0), init, true, slice)
}

/// The all-gather of the TP ranks' dropped parts: `send` is sized for the full set but holds
/// this rank's `1/tp` of it (what it received or returns), so the op counts that share: an
/// all-gather's bytes are one member's piece (the sim sends it to the `tp - 1` others).
fn tp_allgather(b: &mut RankBuilder, name: &str, pass: Pass, p: Place, send: BufId, recv: BufId) {
    let bytes = part_bytes(b, p, send);
    b.op(name, Stage::AllGather, pass, OpKind::AllGather { group: p.tp_group, send, recv }, 0, bytes);
}

/// A TP rank's `1/tp` share of `buf`'s planned bytes: what it holds of the dropped set.
fn part_bytes(b: &RankBuilder, p: Place, buf: BufId) -> u64 {
    b.f32_bytes_of(buf).div_ceil(p.tp as u64)
}

fn tp_allreduce(b: &mut RankBuilder, name: &str, pass: Pass, group: GroupId, buf: BufId) {
    let bytes = b.f32_bytes_of(buf);
    b.op(name, Stage::AllReduce, pass, OpKind::AllReduce { group, bufs: vec![buf] }, 0, bytes);
}

/// The all-to-all of a TP rank's dropped slice: `send` is sized for the full set, but each
/// rank sends its `1/tp` of every block, so the op counts that share of the bytes (what the
/// sim prices; the executors move the counts they are given).
#[allow(clippy::too_many_arguments)]
fn dropped_a2a(b: &mut RankBuilder, name: &str, pass: Pass, p: Place, send: BufId, send_counts: BufId, recv: BufId, m: usize) {
    let bytes = part_bytes(b, p, send);
    a2a_of_bytes(b, name, pass, p.ep_group, send, send_counts, recv, m, bytes);
}

/// Rows of the dispatch layout (`src`, with per-peer `counts`) -> this rank's expert buffer
/// `[E_local, R, M]`: all-to-all (with duplicate dropping and the TP all-gather when on).
#[allow(clippy::too_many_arguments)]
fn to_experts(b: &mut RankBuilder, p: Place, dims: &MoeDims, layer: usize, src: BufId, counts: BufId, gathered: BufId, what: &str,
    out: BufId, pass: Pass) {
    let (t, k, m, el, ep) = (dims.tokens, dims.top_k, dims.d_model, dims.local_experts(), dims.ep_peers.len());
    let rows = dims.rows_per_expert.unwrap_or(t * ep);
    let dropless = dims.rows_per_expert.is_none();
    let rb = |b: &mut RankBuilder, name: String, elems: usize| if dropless { b.dyn_buf(name, elems, Mc::CommBuffers) } else { b.buf(name, elems, Mc::CommBuffers) };
    let bwd = if pass == Pass::Backward { "_bwd" } else { "" };
    let (a2a_name, layout_name) = if pass == Pass::Backward { ("combine_a2a_bwd", "expert_layout_bwd") } else { ("dispatch_a2a", "expert_layout") };
    if p.dropping(ep) {
        let part = b.buf(format!("L{layer}.moe.{what}_part"), t * k * m, Mc::CommBuffers);
        let part_counts = b.index_buf(format!("L{layer}.moe.{what}_part_counts"), ep, Mc::CommBuffers);
        b.op(format!("drop_tokens{bwd}"), Stage::Permute, pass,
            OpKind::ChunkSlice { src, slots: None, gathered, part, part_counts, reserve: None, dims: dims.clone(), chunk: (p.ti, p.tp) },
            0, 8 * (t * k * m) as u64);
        // Parts that are all-gathered hold their real size (static buffers are padded).
        let recv_part = b.dyn_buf(format!("L{layer}.moe.{what}_recv_part"), el * rows * m, Mc::CommBuffers);
        dropped_a2a(b, a2a_name, pass, p, part, part_counts, recv_part, m);
        let recv = rb(b, format!("L{layer}.moe.{what}_recv"), el * rows * m);
        tp_allgather(b, &format!("gather_tokens{bwd}"), pass, p, recv_part, recv);
        b.op(layout_name, Stage::Permute, pass, OpKind::TpLayout { recv, gathered, out, dims: dims.clone(), tp: p.tp }, 0,
            8 * (el * rows * m) as u64);
    } else {
        let recv = if ep > 1 {
            let r = rb(b, format!("L{layer}.moe.{what}_recv"), el * rows * m);
            a2a(b, a2a_name, pass, p.ep_group, src, counts, r, m);
            r
        } else {
            src
        };
        b.op(layout_name, Stage::Permute, pass, OpKind::ExpertLayout { recv, gathered, out, dims: dims.clone() }, 0, 8 * (el * rows * m) as u64);
    }
}

/// This rank's expert buffer (full, identical over the TP group) -> rows in dispatch-layout
/// order on the source ranks (`full`, `[T*k, M]`).
#[allow(clippy::too_many_arguments)]
fn from_experts(b: &mut RankBuilder, p: Place, dims: &MoeDims, layer: usize, input: BufId, gathered: BufId, what: &str, full: BufId,
    pass: Pass) {
    let (t, k, m, el, ep) = (dims.tokens, dims.top_k, dims.d_model, dims.local_experts(), dims.ep_peers.len());
    let rows = dims.rows_per_expert.unwrap_or(t * ep);
    let dropless = dims.rows_per_expert.is_none();
    let rb = |b: &mut RankBuilder, name: String, elems: usize| if dropless { b.dyn_buf(name, elems, Mc::CommBuffers) } else { b.buf(name, elems, Mc::CommBuffers) };
    let bwd = if pass == Pass::Backward { "_bwd" } else { "" };
    let (a2a_name, unlayout_name) = if pass == Pass::Backward { ("dispatch_a2a_bwd", "expert_unlayout_bwd") } else { ("combine_a2a", "expert_unlayout") };
    let counts = b.index_buf(format!("L{layer}.moe.{what}_counts"), ep, Mc::CommBuffers);
    if p.dropping(ep) {
        let send = rb(b, format!("L{layer}.moe.{what}_send"), el * rows * m);
        b.op(unlayout_name, Stage::Permute, pass,
            OpKind::TpUnlayout { input, gathered, send, send_counts: counts, dims: dims.clone(), chunk: (p.ti, p.tp) }, 0,
            8 * (el * rows * m) as u64);
        let part = b.dyn_buf(format!("L{layer}.moe.{what}_part"), t * k * m, Mc::CommBuffers);
        dropped_a2a(b, a2a_name, pass, p, send, counts, part, m);
        let parts = b.buf(format!("L{layer}.moe.{what}_parts"), t * k * m, Mc::CommBuffers);
        tp_allgather(b, &format!("gather_tokens_back{bwd}"), pass, p, part, parts);
        b.op(format!("merge_tokens{bwd}"), Stage::Permute, pass, OpKind::TpMerge { parts, gathered, full, dims: dims.clone(), tp: p.tp }, 0,
            8 * (t * k * m) as u64);
    } else if ep > 1 {
        let send = rb(b, format!("L{layer}.moe.{what}_send"), el * rows * m);
        b.op(unlayout_name, Stage::Permute, pass,
            OpKind::ExpertUnlayout { input, gathered, send, send_counts: counts, dims: dims.clone() }, 0, 8 * (el * rows * m) as u64);
        a2a(b, a2a_name, pass, p.ep_group, send, counts, full, m);
    } else {
        b.op(unlayout_name, Stage::Permute, pass,
            OpKind::ExpertUnlayout { input, gathered, send: full, send_counts: counts, dims: dims.clone() }, 0, 8 * (el * rows * m) as u64);
    }
}

/// A buffer whose size depends on routing when the layer is dropless.
fn route_buf(b: &mut RankBuilder, dims: &MoeDims, name: String, elems: usize, cat: Mc) -> BufId {
    if dims.rows_per_expert.is_none() { b.dyn_buf(name, elems, cat) } else { b.buf(name, elems, cat) }
}

/// Create the params of one MoE layer: the routing front, then this rank's expert slices.
fn moe_params(b: &mut RankBuilder, spec: &ExperimentSpec, p: Place, layer: usize, dims: &MoeDims) -> MoeParams {
    let (m, f) = (dims.d_model, spec.model.d_ffn);
    let fs = f / p.tp;
    let gate = blocks::gate_params(b, layer, m, dims.n_experts);
    let keep = (p.ti * fs, (p.ti + 1) * fs);
    let w1 = sliced_param(b, layer, "w1", dims, m, f, keep, 1.0 / (m as f32).sqrt());
    let b1 = sliced_param(b, layer, "b1", dims, 1, f, keep, 0.02);
    let w2 = sliced_param(b, layer, "w2", dims, 1, f * m, (keep.0 * m, keep.1 * m), 1.0 / (f as f32).sqrt());
    let b2 = (p.ti == 0).then(|| expert_param(b, layer, "b2", dims, m, 0.02));
    MoeParams { gate, w1, b1, w2, b2 }
}

/// `dispatch`: capacity, then this rank's kept rows packed per expert-parallel peer;
/// returns (send, send_counts, slots).
fn dispatch(b: &mut RankBuilder, layer: usize, dims: &MoeDims, x: BufId, idx: BufId, gathered: BufId) -> (BufId, BufId, BufId) {
    let (t, k, m, ep) = (dims.tokens, dims.top_k, dims.d_model, dims.ep_peers.len());
    let send = b.buf(format!("L{layer}.moe.send"), t * k * m, Mc::CommBuffers);
    let send_counts = b.index_buf(format!("L{layer}.moe.send_counts"), ep, Mc::CommBuffers);
    let slots = b.index_buf(format!("L{layer}.moe.slots"), t * k, Mc::Activations);
    b.op("dispatch", Stage::Permute, Pass::Forward,
        OpKind::Dispatch { x, idx, gathered, send, send_counts, slots, dims: dims.clone() }, 0, 8 * (t * k * m) as u64);
    (send, send_counts, slots)
}

/// fc1 (column-parallel slice) and the activation on the expert buffer `ein`; returns (h, a).
fn expert_fc1(b: &mut RankBuilder, spec: &ExperimentSpec, p: Place, layer: usize, dims: &MoeDims, prm: MoeParams, ein: BufId)
    -> (BufId, BufId) {
    let (t, m, el, ep) = (dims.tokens, dims.d_model, dims.local_experts(), dims.ep_peers.len());
    let fs = spec.model.d_ffn / p.tp;
    let rows = dims.rows_per_expert.unwrap_or(t * ep);
    let h = route_buf(b, dims, format!("L{layer}.expert.h"), el * rows * fs, Mc::Activations);
    b.op("expert_gemm1", Stage::ExpertGemm1, Pass::Forward,
        OpKind::ExpertLinear { x: ein, w: prm.w1, bias: prm.b1, y: h, n_local: el, d_in: m, d_out: fs },
        el as u64 * gemm_flops(rows, m, fs), 4 * (el * (rows * m + m * fs + rows * fs)) as u64);
    let a = route_buf(b, dims, format!("L{layer}.expert.act"), el * rows * fs, Mc::Activations);
    b.op("expert_act", Stage::Act, Pass::Forward, OpKind::Act { h, a, act: spec.model.activation }, 8 * (el * rows * fs) as u64,
        8 * (el * rows * fs) as u64);
    (h, a)
}

/// The forward of one MoE layer up to the expert outputs back at their source rank
/// (`back`, in dispatch layout): routing, dispatch, all-to-all, TP experts, all-to-all.
#[allow(clippy::too_many_arguments)]
fn moe_core(b: &mut RankBuilder, spec: &ExperimentSpec, groups: &Groups, rank: usize, p: Place, layer: usize, x: BufId, dims: &MoeDims,
    prm: MoeParams) -> Acts {
    let (t, m, k) = (dims.tokens, dims.d_model, dims.top_k);
    let (el, ep) = (dims.local_experts(), dims.ep_peers.len());
    let fs = spec.model.d_ffn / p.tp;
    let rows = dims.rows_per_expert.unwrap_or(t * ep);
    let routed = blocks::route_with(b, spec, layer, x, dims, groups.data_group(rank), prm.gate, None);
    let gathered = routed.gathered;
    let (send, send_counts, slots) = dispatch(b, layer, dims, routed.ln.y, routed.idx, gathered);
    let ein = route_buf(b, dims, format!("L{layer}.expert.in"), el * rows * m, Mc::Activations);
    to_experts(b, p, dims, layer, send, send_counts, gathered, "dispatch", ein, Pass::Forward);
    let (h, a) = expert_fc1(b, spec, p, layer, dims, prm, ein);
    let y = route_buf(b, dims, format!("L{layer}.expert.out"), el * rows * m, Mc::Temporaries);
    b.op("expert_gemm2", Stage::ExpertGemm2, Pass::Forward,
        OpKind::ExpertLinearPart { x: a, w: prm.w2, bias: prm.b2, y, n_local: el, d_in: fs, d_out: m },
        el as u64 * gemm_flops(rows, fs, m), 4 * (el * (rows * m + m * fs + rows * fs)) as u64);
    if p.tp > 1 {
        tp_allreduce(b, "expert_allreduce", Pass::Forward, p.tp_group, y);
    }
    let back = b.buf(format!("L{layer}.moe.back"), t * k * m, Mc::CommBuffers);
    from_experts(b, p, dims, layer, y, gathered, "back", back, Pass::Forward);
    Acts { r: routed, send_counts, slots, ein, h, a, back }
}

fn moe_forward(b: &mut RankBuilder, spec: &ExperimentSpec, groups: &Groups, rank: usize, p: Place, layer: usize, x: BufId) -> (BufId, MoeSaved) {
    let dims = moe_dims(spec, groups, rank);
    let (t, m, k) = (dims.tokens, dims.d_model, dims.top_k);
    let prm = moe_params(b, spec, p, layer, &dims);
    let acts = moe_core(b, spec, groups, rank, p, layer, x, &dims, prm);
    let out = b.buf(format!("L{layer}.moe.out"), t * m, Mc::Activations);
    b.op("combine", Stage::Combine, Pass::Forward,
        OpKind::Combine { back: acts.back, slots: acts.slots, weights: acts.r.weights, residual: x, out, dims: dims.clone() },
        2 * (t * k * m) as u64, 4 * (t * k * m + 2 * t * m) as u64);
    // What backward does not read is released after its last forward use.
    let kept = match p.checkpoint {
        Checkpoint::None => Kept::All(acts),
        Checkpoint::Full => Kept::Input,
        Checkpoint::CommAware => Kept::Comm { gathered: acts.r.gathered, ein: acts.ein, back: acts.back },
    };
    (out, MoeSaved { dims, x, prm, kept })
}

/// The activations of a checkpointed layer, recomputed at the start of its backward (ops in
/// the backward pass, named `recompute.*`). `Full` re-runs [`moe_core`] with its all-to-alls
/// and all-gathers; `Comm` recomputes routing, dispatch (for the slots and counts) and fc1 +
/// activation on the kept expert input, with no communication.
fn recompute(b: &mut RankBuilder, spec: &ExperimentSpec, groups: &Groups, rank: usize, p: Place, layer: usize, s: &MoeSaved) -> Acts {
    b.set_recompute(true);
    let acts = match s.kept {
        Kept::All(_) => unreachable!("a layer that kept its activations is not recomputed"),
        Kept::Input => moe_core(b, spec, groups, rank, p, layer, s.x, &s.dims, s.prm),
        Kept::Comm { gathered, ein, back } => {
            let routed = blocks::route_with(b, spec, layer, s.x, &s.dims, groups.data_group(rank), s.prm.gate, Some(gathered));
            let (_send, send_counts, slots) = dispatch(b, layer, &s.dims, routed.ln.y, routed.idx, gathered);
            let (h, a) = expert_fc1(b, spec, p, layer, &s.dims, s.prm, ein);
            Acts { r: routed, send_counts, slots, ein, h, a, back }
        }
    };
    b.set_recompute(false);
    acts
}

#[allow(clippy::too_many_arguments)]
fn moe_backward(b: &mut RankBuilder, spec: &ExperimentSpec, groups: &Groups, rank: usize, p: Place, layer: usize, s: &MoeSaved,
    dout: BufId) -> BufId {
    let fresh;
    let acts = match &s.kept {
        Kept::All(acts) => acts,
        _ => {
            fresh = recompute(b, spec, groups, rank, p, layer, s);
            &fresh
        }
    };
    let (d, prm) = (&s.dims, s.prm);
    let (t, m, k, f) = (d.tokens, d.d_model, d.top_k, spec.model.d_ffn);
    let ep = d.ep_peers.len();
    let el = d.local_experts();
    let fs = f / p.tp;
    let rows = d.rows_per_expert.unwrap_or(t * ep);
    let dback = b.buf(format!("L{layer}.moe.dback"), t * k * m, Mc::CommBuffers);
    let dweights = b.buf(format!("L{layer}.route.dweights"), t * k, Mc::Activations);
    b.op("combine_bwd", Stage::Combine, Pass::Backward,
        OpKind::CombineBwd { dout, back: acts.back, slots: acts.slots, weights: acts.r.weights, dback, dweights, dims: d.clone() },
        4 * (t * k * m) as u64, 4 * (2 * t * k * m + t * m) as u64);
    let dy = route_buf(b, d, format!("L{layer}.expert.dout"), el * rows * m, Mc::Temporaries);
    to_experts(b, p, d, layer, dback, acts.send_counts, acts.r.gathered, "dback", dy, Pass::Backward);
    let da = route_buf(b, d, format!("L{layer}.expert.dact"), el * rows * fs, Mc::Temporaries);
    let (gw2, gb2) = (b.grad(prm.w2), prm.b2.map(|x| b.grad(x)));
    b.op("expert_gemm2_bwd", Stage::ExpertGemm2, Pass::Backward,
        OpKind::ExpertLinearPartBwd { x: acts.a, w: prm.w2, dy, dx: da, dw: gw2, dbias: gb2, n_local: el, d_in: fs, d_out: m },
        2 * el as u64 * gemm_flops(rows, fs, m), 8 * (el * (rows * m + m * fs + rows * fs)) as u64);
    let dh = route_buf(b, d, format!("L{layer}.expert.dh"), el * rows * fs, Mc::Temporaries);
    b.op("expert_act_bwd", Stage::Act, Pass::Backward, OpKind::ActBwd { h: acts.h, da, dh, act: spec.model.activation },
        10 * (el * rows * fs) as u64, 12 * (el * rows * fs) as u64);
    let dein = route_buf(b, d, format!("L{layer}.expert.din"), el * rows * m, Mc::Temporaries);
    let (gw1, gb1) = (b.grad(prm.w1), b.grad(prm.b1));
    b.op("expert_gemm1_bwd", Stage::ExpertGemm1, Pass::Backward,
        OpKind::ExpertLinearBwd { x: acts.ein, w: prm.w1, dy: dh, dx: dein, dw: gw1, dbias: gb1, n_local: el, d_in: m, d_out: fs },
        2 * el as u64 * gemm_flops(rows, m, fs), 8 * (el * (rows * m + m * fs + rows * fs)) as u64);
    // Column-parallel fc1: each TP rank's input gradient is a partial sum.
    if p.tp > 1 {
        tp_allreduce(b, "expert_allreduce_bwd", Pass::Backward, p.tp_group, dein);
    }
    let dsend = b.buf(format!("L{layer}.moe.dsend"), t * k * m, Mc::CommBuffers);
    from_experts(b, p, d, layer, dein, acts.r.gathered, "dsend", dsend, Pass::Backward);
    blocks::route_backward(b, spec, layer, &acts.r, d, acts.slots, dsend, dweights, dout)
}
