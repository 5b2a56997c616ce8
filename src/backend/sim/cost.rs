//! Op costs: how long each op of a plan takes on a profile. Compute ops get a duration from
//! their FLOPs and bytes (GEMMs through the fitted efficiency curve at their real shapes,
//! everything else as memory traffic at its kernel class's share of the copy bandwidth, or
//! vector arithmetic, whichever is slower) plus kernel launch overhead and, for ops the
//! executor runs through the host, its host round trips ([`host_traffic`]). Collectives
//! become [`CollectivePart`]s whose time the engine decides, because it depends on when the
//! other members arrive and on who else uses the links.

use super::engine::HostWork;
use crate::backend::cuda::exec::HOST_COPY_MAX_ELEMS;
use super::profile::{CollectiveKind, GemmDtype, GemmPass, GpuProfile, KernelClass};
use crate::plan::ops::ATTN_HEADS_PER_SLICE;
use crate::plan::{BufId, ElemType, GroupId, Op, OpKind, RankPlan};

/// One coupled collective an op performs; an op may perform several in sequence (Tutel's
/// 2D all-to-all: within the node, then across nodes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CollectivePart {
    /// The members.
    pub group: GroupId,
    /// What it does.
    pub kind: CollectiveKind,
    /// The payload per member in bytes (see [`CollectiveKind::wire_bytes`]).
    pub bytes: f64,
    /// Host work before the transfer once every member has arrived (the executor's host
    /// round trips, e.g. the cuda AllToAllV's count exchange), seconds.
    pub host_s: f64,
}

/// What an op costs.
#[derive(Debug, Clone, PartialEq)]
pub enum Cost {
    /// A kernel (or a few) on the compute stream: a fixed duration, seconds.
    Compute(f64),
    /// Collectives, executed in order.
    Collective(Vec<CollectivePart>),
}

/// A GEMM shape: `batch` products of `[m, k] x [k, n]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmShape {
    /// Output rows.
    pub m: usize,
    /// Output columns.
    pub n: usize,
    /// Reduction length.
    pub k: usize,
    /// Independent products (experts, heads).
    pub batch: usize,
}

impl GemmShape {
    fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64 * self.batch as f64
    }
}

/// The GEMMs an op runs (empty for elementwise ops and collectives; for the attention core,
/// one iteration of its loop). Row counts of expert GEMMs come from the planned buffer sizes
/// (capacity, or its upper bound when dropless).
pub fn gemms(kind: &OpKind, plan: &RankPlan) -> Vec<GemmShape> {
    gemms_at(kind, plan, Fill::FULL)
}

/// How full an op's routing-sized (dynamic) buffers are in a step, and how its expert GEMMs
/// run over them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fill {
    /// Share of each dynamic buffer's bound in use (FLOPs, bytes and GEMM rows scale by it).
    pub scale: f64,
    /// Dropless expert GEMMs run one per expert on each expert's rows (rather than one
    /// batched GEMM over whole blocks).
    pub per_expert: bool,
    /// Share of each dynamic buffer's bound the executor allocates: every expert's block as
    /// long as the fullest expert's (`scale` when the blocks are what the op computes over).
    pub block: f64,
}

impl Fill {
    /// Buffers at their bound (capacity plans).
    pub const FULL: Fill = Fill { scale: 1.0, per_expert: false, block: 1.0 };
    /// Dynamic buffers at `scale` of their bound, expert GEMMs per expert below the bound.
    pub fn per_expert(scale: f64) -> Fill {
        Fill { scale, per_expert: scale < 1.0, block: scale }
    }
}

/// [`gemms`] with expert row counts scaled by `fill.scale` (the expected share of a dynamic
/// buffer's bound, see `sim::expected_dynamic_load`).
pub fn gemms_at(kind: &OpKind, plan: &RankPlan, fill: Fill) -> Vec<GemmShape> {
    let rows_scale = fill.scale;
    use OpKind::*;
    let elems = |b: crate::plan::BufId| plan.buffer(b).elems;
    let g = |m, n, k, batch| GemmShape { m, n, k, batch };
    // Forward [rows, d_in] x [d_in, d_out]; backward dx = dy w^T and dw = x^T dy.
    let fwd = |rows, d_in, d_out, batch| vec![g(rows, d_out, d_in, batch)];
    let bwd = |rows, d_in, d_out, batch, dx: bool| {
        let mut v = vec![g(d_in, d_out, rows, batch)];
        if dx {
            v.push(g(rows, d_in, d_out, batch));
        }
        v
    };
    // Rows of each expert's block (its bound when dropless), and the rows a step is priced at.
    let block_rows = |x, n_local: usize, d_in: usize| elems(x) / (n_local * d_in).max(1);
    let rows_of = |x, n_local: usize, d_in: usize| {
        let rows = block_rows(x, n_local, d_in);
        if rows_scale == 1.0 || rows == 0 { rows } else { ((rows as f64 * rows_scale).round() as usize).max(1) }
    };
    // Dropless expert blocks run one GEMM per expert at its row bucket (`exec::gemm_rows`);
    // their math is priced as the batch (cuBLAS picks tiles that fill the GPU per call, which
    // one fixed tile's wave count would misjudge), their launches per expert (`gemm_calls`).
    let experts = |x: BufId, n_local: usize, d_in: usize, shapes: &dyn Fn(usize, usize) -> Vec<GemmShape>| {
        let rows = rows_of(x, n_local, d_in);
        if per_expert_gemms(x, plan, fill) {
            use crate::plan::ops::{aligned_rows, row_bucket_step, DROPLESS_ROW_ALIGN};
            let bound = block_rows(x, n_local, d_in);
            // Balanced, every expert runs the mean's bucket; with uneven loads (the block
            // longer than the mean) each expert's rows land anywhere in their bucket, which
            // pads them by half a bucket on average.
            let padded = if fill.block > fill.scale { rows + row_bucket_step(rows, DROPLESS_ROW_ALIGN) / 2 } else { aligned_rows(rows, bound, DROPLESS_ROW_ALIGN) };
            shapes(padded.min(bound), n_local)
        } else {
            shapes(rows, n_local)
        }
    };
    if let Some(e) = kind.expert_gemm() {
        return experts(e.x, e.n_local, e.d_in, &|rows, batch| if e.gemms == 1 { fwd(rows, e.d_in, e.d_out, batch) } else { bwd(rows, e.d_in, e.d_out, batch, true) });
    }
    match kind {
        Linear { rows, d_in, d_out, .. } => fwd(*rows, *d_in, *d_out, 1),
        LinearBwd { rows, d_in, d_out, dx, .. } => bwd(*rows, *d_in, *d_out, 1, dx.is_some()),
        // One iteration of the attention core's loop (see `attention_loop`, which prices it).
        AttnCore { .. } | AttnCoreBwd { .. } => attention_loop(kind, plan)
            .map(|(_, body)| body.iter().filter_map(|k| if let LoopKernel::Gemm(s, _) = k { Some(*s) } else { None }).collect())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Calls per GEMM shape of an op: its experts for a dropless expert op (one GEMM per expert),
/// else 1.
fn gemm_calls(kind: &OpKind, plan: &RankPlan, fill: Fill) -> usize {
    match kind.expert_gemm() {
        Some(g) if per_expert_gemms(g.x, plan, fill) => g.n_local,
        _ => 1,
    }
}

/// Whether a dropless expert op runs one GEMM per expert (its input block `x` is routing-sized
/// and the fill says so) rather than one batched GEMM over all experts.
fn per_expert_gemms(x: BufId, plan: &RankPlan, fill: Fill) -> bool {
    fill.per_expert && plan.buffer(x).dynamic
}

/// Kernels an op launches (each pays the launch overhead once).
fn kernels(kind: &OpKind, gemm_count: usize) -> usize {
    use OpKind::*;
    match kind {
        // Softmax and top-k, then the statistics: a memset, the counts and the two-pass
        // column sums of the probabilities.
        Route { .. } => 4,
        RouteBwd { .. } => 3,
        // Mean/variance and normalisation; backward adds the parameter reductions.
        LayerNorm { .. } => 1,
        LayerNormBwd { .. } => 2,
        // The slot ranking (one block per expert) and the row gather.
        Dispatch { .. } => 2,
        // The row map from the blocks, and the row gather.
        ExpertLayout { .. } | ExpertUnlayout { .. } => 2,
        // One kernel per parameter tensor (the cuda executor's loop).
        Adam { params, .. } => params.len().max(1),
        // Row gradients, then the weight gradients.
        CombineBwd { .. } => 2,
        _ => gemm_count.max(1),
    }
}

/// The kernel class of a non-GEMM op (its achieved share of the copy bandwidth comes from
/// the profile's `[kernels]` table).
pub fn kernel_class(kind: &OpKind) -> KernelClass {
    use OpKind::*;
    match kind {
        LayerNorm { .. } => KernelClass::Layernorm,
        LayerNormBwd { .. } => KernelClass::LayernormBwd,
        Act { .. } => KernelClass::Act,
        ActBwd { .. } => KernelClass::ActBwd,
        Dispatch { .. } | DispatchBwd { .. } | ExpertLayout { .. } | ExpertUnlayout { .. } | ChunkSlice { .. } | ChunkMerge { .. }
        | ChunkLayout { .. } | ChunkUnlayout { .. } | TpLayout { .. } | TpUnlayout { .. } | TpMerge { .. } | LocalLayout { .. }
        | LocalUnlayout { .. } | ShardDispatch { .. } | ShardCounts { .. } | ShardCombine { .. } | SwapAxes { .. } | TakeBlock { .. } => {
            KernelClass::Layout
        }
        Combine { .. } | CombinePart { .. } => KernelClass::Combine,
        CombineBwd { .. } => KernelClass::CombineBwd,
        Route { .. } => KernelClass::Route,
        RouteBwd { .. } => KernelClass::RouteBwd,
        Loss { .. } | LossReplica { .. } => KernelClass::Loss,
        Adam { .. } | GradAccum { .. } => KernelClass::Optimizer,
        LoadBatch { .. } => KernelClass::Data,
        _ => KernelClass::Elementwise,
    }
}

/// Host round trips of an op on an executor that reads routing tables on the host.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostTraffic {
    /// Synchronising device-to-host copies (each waits for the stream to drain).
    pub syncs: usize,
    /// Bytes copied between host and device (routing tables down, row maps and counts up).
    pub bytes: f64,
}

/// The host round trips an op costs on the cuda executor (`src/backend/cuda/exec.rs`):
/// Dispatch, the expert layouts, RouteBwd and CombineBwd each download one routing input (the
/// gathered statistics, the slots: 1 round trip each) and place rows on the device; a chunk
/// or tensor-parallel layout op, which runs on the host,
/// downloads each routing input it reads (indices, slots, gathered statistics: one round trip
/// each) and uploads a row map per row output plus its integer outputs; AllToAllV downloads
/// its send counts and all-gathers them through the host before the transfer (2). The
/// profile prices them (`kernels.host_sync_us`, `kernels.host_gbps`; zero where absent), so a
/// profile of an executor without host round trips simply leaves them out.
pub fn host_traffic(kind: &OpKind, plan: &RankPlan, load: f64) -> HostTraffic {
    host_traffic_known(kind, plan, load, &|_| false)
}

/// [`host_traffic`] on an executor that keeps host copies of what it read or uploaded
/// (`known`, see [`HostCopies`]): a routing input known on the host costs no round trip
/// and no copy.
pub fn host_traffic_known(kind: &OpKind, plan: &RankPlan, load: f64, known: &dyn Fn(BufId) -> bool) -> HostTraffic {
    use OpKind::*;
    let bytes = |b: BufId| {
        let d = plan.buffer(b);
        let scale = if d.dynamic { load } else { 1.0 };
        d.elems as f64 * d.elem_bytes as f64 * scale
    };
    let f32_rows = |b: BufId, m: usize| {
        let d = plan.buffer(b);
        let scale = if d.dynamic { load } else { 1.0 };
        if d.elem == ElemType::I32 { d.elems as f64 * d.elem_bytes as f64 * scale } else { (d.elems / m.max(1)) as f64 * 4.0 * scale }
    };
    // Each routing input copied down: a round trip and its bytes, unless known on the host.
    let down: Vec<BufId> = host_reads(kind).into_iter().filter(|b| !known(*b)).collect();
    let reads = HostTraffic { syncs: down.len(), bytes: down.iter().map(|b| bytes(*b)).sum::<f64>() };
    // What goes up (row maps at 4 bytes a row, counts) and further round trips.
    let rows = |outs: &[BufId], m: usize| outs.iter().map(|b| f32_rows(*b, m)).sum::<f64>();
    let (extra_syncs, extra_bytes) = match kind {
        // The send counts down, then the all-gathered count matrix back (two round trips).
        AllToAllV { send_counts, .. } => (1, bytes(*send_counts)),
        // Tutel's 2D all-to-all before its first phase: the counts down, the node's counts
        // all-gathered back, the first row map up (a row each); the second phase's round trip
        // and map are its own ([`two_d_gather_and_host`]).
        AllToAllV2d { send, send_counts, row_len, .. } => (1, bytes(*send_counts) + f32_rows(*send, *row_len)),
        // The slots are ranked on the device; the table of kept counts goes up.
        Dispatch { send_counts, .. } => (0, 2.0 * bytes(*send_counts)),
        // Row blocks from the table; the row map is built on the device.
        ExpertUnlayout { send_counts, .. } => (0, bytes(*send_counts)),
        ChunkLayout { out, dims, .. } | TpLayout { out, dims, .. } | LocalLayout { out, dims, .. } => (0, rows(&[*out], dims.d_model)),
        ChunkUnlayout { send, send_counts, dims, .. } | TpUnlayout { send, send_counts, dims, .. } => (0, rows(&[*send, *send_counts], dims.d_model)),
        LocalUnlayout { full, dims, .. } | TpMerge { full, dims, .. } | ChunkMerge { full, dims, .. } => (0, rows(&[*full], dims.d_model)),
        ChunkSlice { part, part_counts, dims, .. } => (0, rows(&[*part, *part_counts], dims.d_model)),
        _ => (0, 0.0),
    };
    HostTraffic { syncs: reads.syncs + extra_syncs, bytes: reads.bytes + extra_bytes }
}

/// The routing inputs an op copies to the host on the cuda executor, one round trip each
/// ([`host_traffic`]): what an executor with host copies knows afterwards.
pub fn host_reads(kind: &OpKind) -> Vec<BufId> {
    use OpKind::*;
    match kind {
        AllToAllV { send_counts, .. } | AllToAllV2d { send_counts, .. } => vec![*send_counts],
        RouteBwd { gathered, .. } | Dispatch { gathered, .. } | ExpertLayout { gathered, .. } | ExpertUnlayout { gathered, .. } => vec![*gathered],
        CombineBwd { slots, .. } => vec![*slots],
        ChunkLayout { gathered, .. } | TpLayout { gathered, .. } | ChunkUnlayout { gathered, .. } | TpUnlayout { gathered, .. } | LocalUnlayout { gathered, .. }
        | TpMerge { gathered, .. } | ChunkMerge { gathered, .. } | LocalLayout { gathered, .. } => vec![*gathered],
        ChunkSlice { slots, gathered, .. } => slots.iter().copied().chain([*gathered]).collect(),
        _ => Vec::new(),
    }
}

/// The integer outputs an op computes on the host and uploads on the cuda executor (counts;
/// a host layout's integer outputs): known on the host afterwards.
pub fn host_uploads(kind: &OpKind, plan: &RankPlan, writes: &[BufId]) -> Vec<BufId> {
    use OpKind::*;
    match kind {
        Dispatch { send_counts, .. } | ExpertUnlayout { send_counts, .. } => vec![*send_counts],
        ChunkLayout { .. } | TpLayout { .. } | ChunkUnlayout { .. } | TpUnlayout { .. } | LocalUnlayout { .. } | TpMerge { .. } | ChunkMerge { .. }
        | LocalLayout { .. } | ChunkSlice { .. } => writes.iter().copied().filter(|b| plan.buffer(*b).elem == ElemType::I32).collect(),
        _ => Vec::new(),
    }
}

/// What a rank's executor knows on the host while it issues ops in plan order: the routing
/// inputs it copied down or uploaded since they were last written (the cuda executor since
/// 2026-11-24, twelfth session; `run.host_copies`).
#[derive(Debug, Clone, Default)]
pub struct HostCopies {
    known: std::collections::HashSet<BufId>,
}

impl HostCopies {
    /// Whether `b`'s contents are on the host.
    pub fn knows(&self, b: BufId) -> bool {
        self.known.contains(&b)
    }

    /// After `op` was issued: what it writes is stale on the host, what it read or uploaded
    /// is known (buffers up to the executor's [`HOST_COPY_MAX_ELEMS`]).
    pub fn issued(&mut self, op: &Op, plan: &RankPlan) {
        for w in &op.writes {
            self.known.remove(w);
        }
        for b in host_reads(&op.kind).into_iter().chain(host_uploads(&op.kind, plan, &op.writes)) {
            if plan.buffer(b).elems <= HOST_COPY_MAX_ELEMS {
                self.known.insert(b);
            }
        }
    }
}

/// Seconds of host work `traffic` costs at `rate` bytes/s: its round trips and its bytes.
pub fn host_seconds(gpu: &GpuProfile, traffic: HostTraffic, rate: f64) -> f64 {
    traffic.syncs as f64 * gpu.kernels.host_sync_s + traffic.bytes / rate
}

/// The host copy rate of a compute op of `kind`: its class's `host_gbps`, else the table's.
fn class_host_rate(kind: &OpKind, gpu: &GpuProfile) -> f64 {
    gpu.kernels.class(kernel_class(kind)).host_gbps.map_or(gpu.kernels.host_bandwidth, |g| g * 1e9)
}

/// Splits the host work out of `cost` (which holds it as [`op_cost`] prices it: every
/// routing input copied down, synchronising, on the stream) for an executor that knows
/// what `copies` holds: the GPU's cost and the host work before the launch. A collective
/// keeps its host work in its first part, repriced.
pub fn split_host(cost: Cost, op: &Op, plan: &RankPlan, gpu: &GpuProfile, load: f64, copies: &HostCopies) -> (Cost, HostWork) {
    let every = host_traffic(&op.kind, plan, load);
    let known = host_traffic_known(&op.kind, plan, load, &|b| copies.knows(b));
    match cost {
        Cost::Compute(d) => {
            let rate = class_host_rate(&op.kind, gpu);
            let gpu_s = (d - host_seconds(gpu, every, rate)).max(0.0);
            let seconds = host_seconds(gpu, known, rate) + issue_seconds(op, plan, gpu);
            (Cost::Compute(gpu_s), HostWork { seconds, sync: known.syncs > 0 })
        }
        Cost::Collective(mut parts) => {
            // What the first part holds beyond the host traffic (the 2D all-to-all's row
            // gather) stays.
            if let Some(first) = parts.first_mut() {
                let prelude = (first.host_s - host_seconds(gpu, every, gpu.kernels.host_bandwidth)).max(0.0);
                first.host_s = prelude + host_seconds(gpu, known, gpu.kernels.host_bandwidth) + issue_seconds(op, plan, gpu);
            }
            (Cost::Collective(parts), HostWork::default())
        }
    }
}

/// Host time to issue op `op` (`kernels.host_op_us` plus `kernels.host_launch_us` per kernel:
/// an attention core's loop launches its body per iteration; an expert op's per-expert GEMM
/// calls are bounded by `kernels.gemm_call_us` instead; a collective launches one kernel, after
/// its count exchange where it has one).
pub fn issue_seconds(op: &Op, plan: &RankPlan, gpu: &GpuProfile) -> f64 {
    let k = &gpu.kernels;
    if k.host_op_s == 0.0 && k.host_launch_s == 0.0 {
        return 0.0;
    }
    k.host_op_s + k.host_launch_s * launches(op, plan) as f64
}

/// Kernels of op `op` a collective launched beside it waits for one at a time: Adam's, one
/// per parameter tensor, each a short pass. A GEMM op, or the attention loop of GEMMs, holds
/// the collective to its end, as the stored 2-GPU runs show (ScMoE's backward all-to-all beside
/// the dense branch's backward is 29% short when it waits for one kernel only).
pub fn held_kernels(op: &Op, plan: &RankPlan) -> usize {
    if matches!(op.kind, OpKind::Adam { .. }) { launches(op, plan) } else { 1 }
}

/// Kernels op `op` launches one after the other on its stream (an attention core's loop: its
/// body per iteration; Adam: one per parameter tensor).
pub fn launches(op: &Op, plan: &RankPlan) -> usize {
    match attention_loop(&op.kind, plan) {
        Some((iterations, body)) => iterations * body.len(),
        None => kernels(&op.kind, gemms_at(&op.kind, plan, Fill::FULL).len()),
    }
}

/// The collective parts of an op; `None` for compute ops.
pub fn collective(op: &Op) -> Option<Vec<CollectivePart>> {
    collective_sized(op, op.bytes)
}

/// [`collective`] with a payload of `bytes` instead of the plan's.
fn collective_sized(op: &Op, bytes: u64) -> Option<Vec<CollectivePart>> {
    use OpKind::*;
    let bytes = bytes as f64;
    let part = |group, kind| CollectivePart { group, kind, bytes, host_s: 0.0 };
    match &op.kind {
        AllGather { group, .. } => Some(vec![part(*group, CollectiveKind::AllGather)]),
        AllReduce { group, .. } => Some(vec![part(*group, CollectiveKind::AllReduce)]),
        AllToAllV { group, .. } => Some(vec![part(*group, CollectiveKind::AllToAll)]),
        ReduceScatter { group, .. } => Some(vec![part(*group, CollectiveKind::ReduceScatter)]),
        // The plan counts both phases; each phase moves half of that.
        AllToAllV2d { intra, inter, .. } => {
            let half = |group| CollectivePart { group, kind: CollectiveKind::AllToAll, bytes: bytes / 2.0, host_s: 0.0 };
            Some(vec![half(*intra), half(*inter)])
        }
        // Each member puts its payload on the wire to the other once: a 2-member all-gather.
        SendRecv { group, .. } => Some(vec![part(*group, CollectiveKind::AllGather)]),
        _ => None,
    }
}

/// The GEMM dtype an op runs at in a plan whose GEMMs are `dtype`: a bf16 plan's Linear
/// whose product is kept f32 (the router's gate, see `plan::precision`) runs in f32
/// forward and backward, as both executors run it.
fn gemm_dtype(op: &Op, plan: &RankPlan, dtype: GemmDtype) -> GemmDtype {
    let f32_product = match &op.kind {
        OpKind::Linear { y, .. } => !plan.buffer(*y).is_bf16(),
        OpKind::LinearBwd { dy, .. } => !plan.buffer(*dy).is_bf16(),
        _ => false,
    };
    if dtype == GemmDtype::Bf16 && f32_product {
        GemmDtype::F32
    } else {
        dtype
    }
}

/// One kernel of the attention core's loop body (see [`attention_loop`]).
#[derive(Debug, Clone, Copy, PartialEq)]
enum LoopKernel {
    /// A strided-batched GEMM and the bytes it moves (its f32 score output is large).
    Gemm(GemmShape, f64),
    /// A row kernel of `class` moving this many bytes.
    Pass(KernelClass, f64),
}

/// The attention core as the cuda executor runs it (`backend/cuda/exec/attention.rs`): a loop
/// over sequences and slices of [`ATTN_HEADS_PER_SLICE`] heads (f32 forward: all heads at once)
/// of GEMMs with f32 scores (or `dP`) between them and the softmax (backward) as a row kernel.
/// Each kernel is priced on its own, the slower of math and memory, so the score traffic adds
/// to the GEMM time instead of hiding under it. Returns (iterations, loop body).
fn attention_loop(kind: &OpKind, plan: &RankPlan) -> Option<(usize, Vec<LoopKernel>)> {
    let (dims, qkv, forward) = match kind {
        OpKind::AttnCore { dims, qkv, .. } => (dims, *qkv, true),
        OpKind::AttnCoreBwd { dims, qkv, .. } => (dims, *qkv, false),
        _ => return None,
    };
    let q = plan.buffer(qkv);
    let e = q.elem_bytes as f64;
    let (l, h) = (dims.seq, dims.heads.max(1));
    let dh = dims.d_model / h;
    let slice = if forward && !q.is_bf16() { h } else { ATTN_HEADS_PER_SLICE.min(h) };
    let iterations = dims.batch * h.div_ceil(slice);
    // Score elements, and elements of one of q, k, v or ctx, per iteration.
    let (s, t) = ((slice * l * l) as f64, (slice * l * dh) as f64);
    let g = |m, n, k| GemmShape { m, n, k, batch: slice };
    let scores = LoopKernel::Gemm(g(l, l, dh), 2.0 * t * e + 4.0 * s);
    let by_probs = LoopKernel::Gemm(g(dh, l, l), e * s + 2.0 * t * e);
    let body = if forward {
        // Scores (f32), the softmax into probs (f32 in place, or bf16), the context.
        vec![scores, LoopKernel::Pass(KernelClass::Softmax, (4.0 + e) * s), by_probs]
    } else {
        // dv, dP (f32), dS from probs and dP, then dq and dk from dS.
        vec![by_probs, scores, LoopKernel::Pass(KernelClass::SoftmaxBwd, (2.0 * e + 4.0) * s), by_probs, by_probs]
    };
    Some((iterations, body))
}

/// Bytes and launches of the bias pass the cuda executor runs after a GEMM with a bias (the
/// output read and written once more, its rows scaled like the GEMM's), or nothing without one.
fn bias_pass(kind: &OpKind, plan: &RankPlan, fill: Fill) -> (f64, usize) {
    let y = match kind {
        OpKind::Linear { bias: Some(_), y, .. } | OpKind::ExpertLinear { y, .. } | OpKind::ExpertLinearPart { bias: Some(_), y, .. } => *y,
        _ => return (0.0, 0),
    };
    let d = plan.buffer(y);
    let scale = if d.dynamic { fill.scale } else { 1.0 };
    // One launch per GEMM call (per expert where the GEMMs run per expert).
    (2.0 * d.elems as f64 * d.elem_bytes as f64 * scale, gemm_calls(kind, plan, fill))
}

/// Bytes and kernels of the storage casts the cuda executor runs around a bf16 plan's f32
/// Linear (the router's, see [`gemm_dtype`]): a bf16 input is cast to an f32 scratch (2 bytes
/// read, 4 written per element); a bf16 input gradient is produced in f32 and cast back, and
/// cast in first when the product accumulates into it.
fn f32_linear_casts(op: &Op, plan: &RankPlan, dtype: GemmDtype) -> (f64, usize) {
    if dtype != GemmDtype::Bf16 || gemm_dtype(op, plan, dtype) != GemmDtype::F32 {
        return (0.0, 0);
    }
    let cast = |b: BufId| Some(plan.buffer(b)).filter(|d| d.is_bf16()).map(|d| 6.0 * d.elems as f64);
    let mut casts = Vec::new();
    match &op.kind {
        OpKind::Linear { x, .. } => casts.extend(cast(*x)),
        OpKind::LinearBwd { x, dx, accumulate_dx, .. } => {
            casts.extend(cast(*x));
            if let Some(c) = dx.and_then(cast) {
                casts.push(c);
                if *accumulate_dx {
                    casts.push(c);
                }
            }
        }
        _ => {}
    }
    (casts.iter().sum(), casts.len())
}

/// Bytes the f32 weight gradient of a bf16 backward GEMM moves beyond the bf16 output the
/// GEMM points were measured with: 2 per element, 6 when the op adds into it (MPMoE's chunks
/// after the first, the `bool`). Priced by [`KernelProfile::f32_output_seconds`].
///
/// [`KernelProfile::f32_output_seconds`]: crate::backend::sim::profile::KernelProfile::f32_output_seconds
fn f32_output_bytes(op: &Op, plan: &RankPlan, dtype: GemmDtype) -> (f64, bool) {
    if gemm_dtype(op, plan, dtype) != GemmDtype::Bf16 {
        return (0.0, false);
    }
    let (dw, accumulate) = match &op.kind {
        OpKind::LinearBwd { dw, .. } | OpKind::ExpertLinearBwd { dw, .. } | OpKind::ExpertLinearPartBwd { dw, .. } => (*dw, false),
        OpKind::ExpertLinearBwdAcc { dw, accumulate, .. } => (*dw, *accumulate),
        _ => return (0.0, false),
    };
    let d = plan.buffer(dw);
    if d.is_bf16() || d.elem_bytes != 4 {
        return (0.0, false);
    }
    (crate::backend::sim::calibration::F32OutputMeasure::extra_bytes(d.elems, 1, accumulate), accumulate)
}

/// The cost of one op of `plan` on `gpu` with GEMMs in `dtype`.
pub fn op_cost(op: &Op, plan: &RankPlan, gpu: &GpuProfile, dtype: GemmDtype) -> Cost {
    op_cost_at(op, plan, gpu, dtype, 1.0)
}

/// [`op_cost`] of an op whose routing-sized buffers hold `load` of their bound: FLOPs, bytes
/// and expert GEMM rows all scaled by it (dropless expert GEMMs per expert).
pub fn op_cost_at(op: &Op, plan: &RankPlan, gpu: &GpuProfile, dtype: GemmDtype, load: f64) -> Cost {
    op_cost_filled(op, plan, gpu, dtype, Fill::per_expert(load))
}

/// [`op_cost`] of an op whose routing-sized buffers are as full as `fill` says.
pub fn op_cost_filled(op: &Op, plan: &RankPlan, gpu: &GpuProfile, dtype: GemmDtype, fill: Fill) -> Cost {
    let load = fill.scale;
    if load == 1.0 {
        return op_cost_sized(op, plan, gpu, dtype, op.flops, op.bytes, Fill::FULL, 0.0);
    }
    if let Some(bytes) = all_to_all_payload(op, plan, load) {
        return op_cost_sized(op, plan, gpu, dtype, op.flops, bytes, fill, 0.0);
    }
    // A layout into a dropless expert block gathers one row per row it writes (the plan's
    // bytes: the block's bound read and written) and writes each expert's whole block,
    // padding rows as zeros: the real rows read, the block written.
    if let OpKind::ExpertLayout { out, .. } = &op.kind {
        if plan.buffer(*out).dynamic {
            let bytes = op.bytes as f64 * (load + fill.block.max(load)) / 2.0;
            return op_cost_sized(op, plan, gpu, dtype, op.flops, bytes as u64, fill, 0.0);
        }
    }
    // Only the routing-sized buffers shrink: static operands (expert weights) keep their bytes.
    let (mut dynamic, mut total) = (0u64, 0u64);
    for b in op.reads.iter().chain(&op.writes) {
        let d = plan.buffer(*b);
        let bytes = d.elems as u64 * d.elem_bytes as u64;
        total += bytes;
        if d.dynamic {
            dynamic += bytes;
        }
    }
    let share = if total > 0 { dynamic as f64 / total as f64 } else { 1.0 };
    let bytes = (op.bytes as f64 * (1.0 - share * (1.0 - load))) as u64;
    op_cost_sized(op, plan, gpu, dtype, (op.flops as f64 * load) as u64, bytes, fill, 0.0)
}

/// The payload of a variable all-to-all whose routing-sized side holds `load` of its bound:
/// the larger of what the rank sends and what it receives, each side whole when static. A
/// dropless dispatch sends every assignment (static) and receives its experts' rows (dynamic),
/// the return trip the other way round; the wire time follows the busier direction. `None`
/// for other ops.
pub fn all_to_all_payload(op: &Op, plan: &RankPlan, load: f64) -> Option<u64> {
    let (send, recv) = match &op.kind {
        OpKind::AllToAllV { send, recv, .. } | OpKind::AllToAllV2d { send, recv, .. } => (*send, *recv),
        _ => return None,
    };
    let filled = |b: BufId| {
        let d = plan.buffer(b);
        d.elems as f64 * if d.dynamic { load } else { 1.0 }
    };
    let planned = plan.buffer(send).elems.max(1) as f64;
    Some((op.bytes as f64 * filled(send).max(filled(recv)) / planned).round() as u64)
}

/// Which way a routed all-to-all moves rows, from its name (the builders' convention:
/// `dispatch_a2a`, its recomputation `dispatch_a2a_recomm` and `combine_a2a_bwd` carry token
/// rows to the experts; `combine_a2a` and `dispatch_a2a_bwd` bring expert rows back; layer and
/// chunk prefixes before a `.`). `None` for other names.
pub fn to_experts(op: &Op) -> Option<bool> {
    let base = op.name.rsplit('.').next().unwrap_or(&op.name);
    match base {
        "combine_a2a_bwd" => Some(true),
        "dispatch_a2a_bwd" => Some(false),
        b if b.starts_with("dispatch_a2a") => Some(true),
        b if b.starts_with("combine_a2a") => Some(false),
        _ => None,
    }
}

/// The payload of a capacity plan's variable all-to-all. The executors move only the rows
/// routing kept (they exchange the real counts), not the padded capacity blocks: the token
/// side of the exchange (the sender going to the experts, the receiver coming back,
/// [`to_experts`]) holds its `T k` rows (per chunk), the other side the rank's capacity
/// blocks. Each member sends `kept` of its token rows and receives `kept * share` of that
/// (`share`: its experts' rows over the mean rank's, `run.rank_loads`), at most what its
/// blocks hold, so the wire carries `kept * max(1, share)` of the token side, capped by the
/// expert side. `None` for other ops, which keep their planned bytes.
pub fn capacity_all_to_all_payload(op: &Op, plan: &RankPlan, kept: f64, share: f64) -> Option<u64> {
    let (send, recv) = match &op.kind {
        OpKind::AllToAllV { send, recv, .. } | OpKind::AllToAllV2d { send, recv, .. } => (*send, *recv),
        _ => return None,
    };
    let (s, r) = (plan.buffer(send).elems as f64, plan.buffer(recv).elems as f64);
    if s <= 0.0 || r <= 0.0 {
        return None;
    }
    let (token, expert) = if to_experts(op)? { (s, r) } else { (r, s) };
    let sent = token * kept.clamp(0.0, 1.0);
    let rows = (sent * share.max(1.0)).min(expert.max(sent));
    Some((op.bytes as f64 * rows / s).round() as u64)
}

/// Tutel's 2D all-to-all on the cuda executor (`backend/cuda/exec/a2a_2d.rs`) stride-copies
/// its `rows` before each phase (a row gather over the phase's `phase_bytes`, read and
/// written) and, between the phases, all-gathers the counts along the rail and reads them
/// back (a round trip) and uploads the second row map (4 bytes a row): (the GPU seconds of
/// one gather, the host seconds between the phases). The count all-gathers' NCCL time joins
/// in the sim's op list, where the groups are known.
pub fn two_d_gather_and_host(gpu: &GpuProfile, phase_bytes: f64, rows: f64) -> (f64, f64) {
    let layout = gpu.kernels.class(KernelClass::Layout);
    let gather = gpu.launch_s + layout.fixed_us * 1e-6 + 2.0 * phase_bytes / (gpu.mem_bandwidth * layout.share(false));
    (gather, host_seconds(gpu, HostTraffic { syncs: 1, bytes: 4.0 * rows }, gpu.kernels.host_bandwidth))
}

/// [`op_cost`] of a collective `op` carrying `bytes` instead of its planned bytes.
pub fn collective_cost(op: &Op, plan: &RankPlan, gpu: &GpuProfile, dtype: GemmDtype, bytes: u64) -> Cost {
    op_cost_sized(op, plan, gpu, dtype, op.flops, bytes, Fill::FULL, 0.0)
}

/// Share of a routed-row op's bytes that scale with the assignments the capacity keeps: its
/// reads of routed rows (kept rows only); its outputs are written whole, dropped rows as
/// zeros. Reads are 0.44 (layouts at capacity factor 1.25) to 0.5 (combine) of the bytes; the
/// session-9 mixtral-ish runs (H100, H200; 0.35 kept) ran these ops at 0.67 to 0.83 of the
/// time of the same sizes with all kept (mean 0.77: 0.35 of the time scaled), so 0.4.
pub const ROUTED_READ_SHARE: f64 = 0.4;

/// Whether `kind` moves routed rows, reading only the assignments a capacity plan kept: the
/// layout and combine kernel classes ([`kernel_class`]), less the layout ops that count
/// (`ShardCounts`) or copy whole buffers (`SwapAxes`, `TakeBlock`).
pub fn moves_routed_rows(kind: &OpKind) -> bool {
    use OpKind::*;
    matches!(kernel_class(kind), KernelClass::Layout | KernelClass::Combine | KernelClass::CombineBwd)
        && !matches!(kind, ShardCounts { .. } | SwapAxes { .. } | TakeBlock { .. })
}

/// [`op_cost`] of a capacity plan's op when `kept` of the routed assignments survive the
/// capacity (`run.kept_share`) and `zero_rows` of its expert blocks' rows hold no
/// assignment: a routed-row op's reads of routed rows shrink with `kept`
/// ([`ROUTED_READ_SHARE`]); bf16 expert GEMMs run faster over the zero rows
/// (`kernels.zero_row_gain`); other ops are unaffected.
pub fn op_cost_kept(op: &Op, plan: &RankPlan, gpu: &GpuProfile, dtype: GemmDtype, kept: f64, zero_rows: f64) -> Cost {
    let bytes = if kept < 1.0 && moves_routed_rows(&op.kind) { op.bytes as f64 * (1.0 - ROUTED_READ_SHARE * (1.0 - kept.max(0.0))) } else { op.bytes as f64 };
    op_cost_sized(op, plan, gpu, dtype, op.flops, bytes as u64, Fill::FULL, zero_rows.clamp(0.0, 1.0))
}

/// The pass of each shape [`gemms_at`] gives for an expert GEMM op, in its order (forward;
/// or weight gradient, then input gradient); `None` for other ops.
fn expert_gemm_passes(kind: &OpKind) -> Option<&'static [GemmPass]> {
    kind.expert_gemm().map(|e| if e.gemms == 1 { &[GemmPass::Forward][..] } else { &[GemmPass::WeightGrad, GemmPass::InputGrad][..] })
}

/// The cost of `op` doing `flops` and moving `bytes`, its expert GEMM rows filled as `fill`
/// says, `zero_rows` of them zero padding (capacity plans).
#[allow(clippy::too_many_arguments)]
fn op_cost_sized(op: &Op, plan: &RankPlan, gpu: &GpuProfile, dtype: GemmDtype, flops: u64, bytes: u64, fill: Fill, zero_rows: f64) -> Cost {
    let rows_scale = fill.scale;
    if let Some(mut parts) = collective_sized(op, bytes) {
        let host = host_traffic(&op.kind, plan, rows_scale);
        if let Some(first) = parts.first_mut() {
            first.host_s = host_seconds(gpu, host, gpu.kernels.host_bandwidth);
        }
        if let (OpKind::AllToAllV2d { send, row_len, .. }, [first, second]) = (&op.kind, &mut parts[..]) {
            // Rows of the payload (the planned rows, scaled as the payload is).
            let rows = plan.buffer(*send).elems as f64 / (*row_len).max(1) as f64 * bytes as f64 / op.bytes.max(1) as f64;
            let (gather, host) = two_d_gather_and_host(gpu, first.bytes, rows);
            first.host_s += gather;
            second.host_s += gather + host;
        }
        return Cost::Collective(parts);
    }
    if let Some((iterations, body)) = attention_loop(&op.kind, plan) {
        let model = gpu.gemm(dtype);
        let bf16 = dtype == GemmDtype::Bf16;
        let per_iteration: f64 = body
            .iter()
            .map(|k| {
                gpu.launch_s
                    + match *k {
                        LoopKernel::Gemm(s, bytes) => model.seconds(s.flops(), s.m, s.n, s.k, s.batch).max(bytes / gpu.mem_bandwidth),
                        LoopKernel::Pass(class, bytes) => bytes / (gpu.mem_bandwidth * gpu.kernels.class(class).share(bf16)),
                    }
            })
            .sum();
        return Cost::Compute(iterations as f64 * per_iteration);
    }
    let shapes = gemms_at(&op.kind, plan, fill);
    let calls = gemm_calls(&op.kind, plan, fill);
    let launch = kernels(&op.kind, shapes.len() * calls) as f64 * gpu.launch_s;
    let memory = bytes as f64 / gpu.mem_bandwidth;
    if shapes.is_empty() {
        let class = gpu.kernels.class(kernel_class(&op.kind));
        let host_s = host_seconds(gpu, host_traffic(&op.kind, plan, rows_scale), class_host_rate(&op.kind, gpu));
        let arithmetic = flops as f64 / gpu.vector_flops;
        return Cost::Compute(launch + class.fixed_us * 1e-6 + host_s + (memory / class.share(dtype == GemmDtype::Bf16)).max(arithmetic));
    }
    // The plan's FLOPs are authoritative; the shapes say how efficiently they run. Each
    // GEMM gets its share of the op's FLOPs in proportion to its own size.
    let model = gpu.gemm(gemm_dtype(op, plan, dtype));
    let shape_flops: f64 = shapes.iter().map(GemmShape::flops).sum();
    // Per-expert GEMMs compute their padded rows too: their shapes are the work then.
    let per_expert = op.kind.expert_gemm().is_some_and(|g| per_expert_gemms(g.x, plan, fill));
    let scale = if per_expert { 1.0 } else if shape_flops > 0.0 { flops as f64 / shape_flops } else { 0.0 };
    // bf16 expert GEMMs over zero padding rows run faster, per pass (`ZeroRowGain`).
    let gemm_dtype = gemm_dtype(op, plan, dtype);
    let zero_passes = expert_gemm_passes(&op.kind).filter(|p| p.len() == shapes.len() && gemm_dtype == GemmDtype::Bf16 && zero_rows > 0.0);
    let speedup = |i: usize| zero_passes.map_or(1.0, |p| 1.0 + gpu.kernels.zero_row_gain.of(p[i]) * zero_rows);
    let math: f64 = shapes.iter().enumerate().map(|(i, s)| model.seconds(s.flops() * scale, s.m, s.n, s.k, s.batch) / speedup(i)).sum();
    // Passes in their own kernels around the GEMMs: storage casts and the bias add.
    let (cast_bytes, casts) = f32_linear_casts(op, plan, dtype);
    let (bias_bytes, bias_launches) = bias_pass(&op.kind, plan, fill);
    let passes = (casts + bias_launches) as f64 * gpu.launch_s + (cast_bytes + bias_bytes) / gpu.mem_bandwidth;
    // Per-expert GEMMs write each expert's rows only: their output is zeroed first.
    let zeroing = if per_expert { zeroed_output_bytes(&op.kind, plan, fill) / gpu.mem_bandwidth } else { 0.0 };
    // One GEMM per expert: the host's calls bound the op from below.
    let host_floor = if calls > 1 { (shapes.len() * calls) as f64 * gpu.kernels.gemm_call_s } else { 0.0 };
    // An f32 weight gradient's extra output bytes follow the GEMM's main loop, whose
    // reduction length (the weight-gradient GEMM's `k`, the first shape) says how much of
    // them it hides.
    let (f32_bytes, add) = f32_output_bytes(op, plan, dtype);
    let f32_output = if f32_bytes > 0.0 { gpu.kernels.f32_output_seconds(f32_bytes, shapes[0].k, add, gpu.mem_bandwidth) } else { 0.0 };
    Cost::Compute((launch + passes + zeroing + math.max(memory) + f32_output).max(host_floor))
}

/// Bytes of the expert blocks a dropless expert op running one GEMM per expert zeroes before
/// its GEMMs (the cuda executor's fresh output: `y`, or `dx`; rows past each expert's rows
/// must read as zeros), at the allocated block length (`fill.block`). The batched form and
/// the weight gradients are written whole and need no zeroing.
fn zeroed_output_bytes(kind: &OpKind, plan: &RankPlan, fill: Fill) -> f64 {
    use OpKind::*;
    let out = match kind {
        ExpertLinear { y, .. } | ExpertLinearPart { y, .. } => *y,
        ExpertLinearBwd { dx, .. } | ExpertLinearBwdAcc { dx, .. } | ExpertLinearPartBwd { dx, .. } => *dx,
        _ => return 0.0,
    };
    let d = plan.buffer(out);
    d.elems as f64 * d.elem_bytes as f64 * if d.dynamic { fill.block } else { 1.0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::sim::profile;
    use crate::plan::{BufId, BufferDesc, ElemType, OpId, RankPlan};
    use crate::taxonomy::{MemCategory, Pass, Stage, Stream};

    fn rank_with(op: Op, buffers: usize) -> RankPlan {
        let b = BufferDesc { name: "b".into(), elems: 1 << 20, elem: ElemType::F32, elem_bytes: 2, category: MemCategory::Activations, persistent: false, dynamic: false };
        RankPlan { rank: 0, buffers: vec![b; buffers], ops: vec![op], params: vec![] }
    }

    fn op(kind: OpKind, flops: u64, bytes: u64) -> Op {
        Op { id: OpId(0), name: "x".into(), stage: Stage::DenseMlp, pass: Pass::Forward, stream: Stream::Compute, layer: None, chunk: None,
            deps: vec![], kind, reads: vec![], writes: vec![], frees: vec![], flops, bytes, collective: None }
    }

    #[test]
    fn a_large_gemm_runs_at_the_measured_rate() {
        let p = profile::resolve("h100-datasheet").expect("parses");
        let n = 8192usize;
        let kind = OpKind::Linear { x: BufId(0), w: BufId(1), bias: None, residual: None, y: BufId(2), rows: n, d_in: n, d_out: n };
        let flops = 2 * (n as u64).pow(3);
        let o = op(kind, flops, 3 * 2 * (n * n) as u64);
        let Cost::Compute(s) = op_cost(&o, &rank_with(o.clone(), 3), &p.gpu, GemmDtype::Bf16) else { panic!("compute") };
        let tflops = flops as f64 / (s - p.gpu.launch_s) / 1e12;
        assert!((tflops - 774.7).abs() < 0.01, "{tflops}");
    }

    #[test]
    fn a_bf16_plans_f32_router_gemm_runs_at_the_f32_rate_and_bf16_kernels_at_their_share() {
        let p = profile::resolve("h200").expect("parses");
        let n = 4096usize;
        let kind = OpKind::Linear { x: BufId(0), w: BufId(1), bias: None, residual: None, y: BufId(2), rows: n, d_in: n, d_out: 64 };
        let o = op(kind, 2 * (n * n * 64) as u64, 1024);
        let mut rp = rank_with(o.clone(), 3);
        let cost = |rp: &RankPlan, d| match op_cost(&o, rp, &p.gpu, d) {
            Cost::Compute(s) => s,
            _ => panic!("compute"),
        };
        let bf16_product = cost(&rp, GemmDtype::Bf16);
        rp.buffers[2].elem_bytes = 4;
        let f32_product = cost(&rp, GemmDtype::Bf16);
        // The same f32 GEMM as in an f32 plan, after casting its bf16 input to f32 (2 bytes
        // read, 4 written per element of rank_with's 1 Mi-element buffer).
        let cast = p.gpu.launch_s + 6.0 * (1 << 20) as f64 / p.gpu.mem_bandwidth;
        assert!((f32_product - cost(&rp, GemmDtype::F32) - cast).abs() < 1e-12, "{f32_product}");
        assert!(f32_product > 2.0 * bf16_product, "{f32_product} vs {bf16_product}");

        let act = op(OpKind::Act { h: BufId(0), a: BufId(1), act: crate::spec::Activation::Gelu }, 1000, 1 << 30);
        let ra = rank_with(act.clone(), 2);
        let at = |d| match op_cost(&act, &ra, &p.gpu, d) {
            Cost::Compute(s) => s - p.gpu.launch_s,
            _ => panic!("compute"),
        };
        let class = p.gpu.kernels.class(KernelClass::Act);
        let bf16_share = class.bf16_bandwidth_share.expect("the h200 profile fits a bf16 share for GELU");
        let ratio = at(GemmDtype::Bf16) / at(GemmDtype::F32);
        assert!((ratio - class.bandwidth_share / bf16_share).abs() < 1e-9, "{ratio}");
    }

    #[test]
    fn the_attention_core_is_priced_as_its_loop_of_kernels_in_sequence() {
        // bf16: 2 sequences x 8 heads in slices of 4 = 4 iterations of scores (f32 out), softmax
        // (4 bytes read, 2 written per score) and context; each kernel the slower of its math
        // and its bytes, their times added (the softmax never hides under a GEMM).
        let p = profile::resolve("h200").expect("parses");
        let (l, dh) = (2048usize, 128usize);
        let dims = crate::plan::AttnDims { batch: 2, seq: l, heads: 8, d_model: 8 * dh };
        let o = op(OpKind::AttnCore { qkv: BufId(0), probs: BufId(1), ctx: BufId(2), dims }, 1, 1);
        let rp = rank_with(o.clone(), 3);
        let Cost::Compute(s) = op_cost(&o, &rp, &p.gpu, GemmDtype::Bf16) else { panic!("compute") };
        let (sc, t) = ((4 * l * l) as f64, (4 * l * dh) as f64);
        let g = &p.gpu.bf16;
        let bw = p.gpu.mem_bandwidth;
        let scores = g.seconds(2.0 * sc * dh as f64, l, l, dh, 4).max((4.0 * t + 4.0 * sc) / bw);
        let softmax = 6.0 * sc / (bw * p.gpu.kernels.class(KernelClass::Softmax).share(true));
        let context = g.seconds(2.0 * sc * dh as f64, dh, l, l, 4).max((2.0 * sc + 4.0 * t) / bw);
        let want = 4.0 * (3.0 * p.gpu.launch_s + scores + softmax + context);
        assert!((s - want).abs() < 1e-12 * want.max(1.0), "{s} vs {want}");
        // The shipped profile times those two GEMM shapes at their measured rates (batch 4).
        for (m, n, k) in [(l, l, dh), (dh, l, l)] {
            let pt = g.points.iter().find(|q| (q.m, q.n, q.k, q.batch) == (m, n, k, 4)).expect("measured");
            let tflops = g.peak_flops * g.efficiency(m, n, k, 4) / 1e12;
            assert!((tflops - pt.tflops).abs() < 1e-6 * pt.tflops, "{tflops} vs {}", pt.tflops);
        }
        // f32 runs the forward with every head of a sequence in one call: 2 iterations, and
        // the backward's five kernels in slices of 4 heads: 4 iterations.
        let (Some((fwd, _)), Some((bwd, body))) = (
            attention_loop(&o.kind, &RankPlan { buffers: vec![BufferDesc { elem_bytes: 4, ..rp.buffers[0].clone() }; 3], ..rp.clone() }),
            attention_loop(&OpKind::AttnCoreBwd { qkv: BufId(0), probs: BufId(1), dctx: BufId(2), dqkv: BufId(0), dims }, &rp),
        ) else { panic!("attention") };
        assert_eq!((fwd, bwd, body.len()), (2, 4, 5));
    }

    #[test]
    fn casts_and_bias_passes_add_their_own_kernels() {
        // A bf16 plan's f32 router Linear backward that accumulates into a bf16 dx: x cast in,
        // dx cast in and back out, 6 bytes per element each, on top of the same op in f32.
        let p = profile::resolve("h200").expect("parses");
        let (rows, d_in, d_out) = (1usize << 14, 64usize, 8usize);
        let kind = OpKind::LinearBwd { x: BufId(0), w: BufId(1), dy: BufId(2), dx: Some(BufId(3)), dw: BufId(1), dbias: None, accumulate_dx: true, rows, d_in, d_out };
        let o = op(kind, 4 * (rows * d_in * d_out) as u64, 1);
        let mut rp = rank_with(o.clone(), 4);
        for b in [1, 2] {
            rp.buffers[b].elem_bytes = 4;
        }
        let cost = |rp: &RankPlan| match op_cost(&o, rp, &p.gpu, GemmDtype::Bf16) {
            Cost::Compute(s) => s,
            _ => panic!("compute"),
        };
        let all_f32 = RankPlan { buffers: rp.buffers.iter().map(|b| BufferDesc { elem_bytes: 4, ..b.clone() }).collect(), ..rp.clone() };
        let extra = cost(&rp) - cost(&all_f32);
        let want = 3.0 * p.gpu.launch_s + 3.0 * 6.0 * (1 << 20) as f64 / p.gpu.mem_bandwidth;
        assert!((extra - want).abs() < 1e-12, "{extra} vs {want}");
        // A Linear's bias is a pass over its output after the GEMM: read and written once more.
        let lin = |bias| OpKind::Linear { x: BufId(0), w: BufId(1), bias, residual: None, y: BufId(2), rows: 1024, d_in: 1024, d_out: 1024 };
        let (with, without) = (op(lin(Some(BufId(3))), 1 << 31, 1), op(lin(None), 1 << 31, 1));
        let rb = rank_with(with.clone(), 4);
        let (Cost::Compute(a), Cost::Compute(b)) = (op_cost(&with, &rb, &p.gpu, GemmDtype::Bf16), op_cost(&without, &rb, &p.gpu, GemmDtype::Bf16)) else { panic!("compute") };
        let want = p.gpu.launch_s + 2.0 * 2.0 * (1 << 20) as f64 / p.gpu.mem_bandwidth;
        assert!((a - b - want).abs() < 1e-12, "{} vs {want}", a - b);
    }

    #[test]
    fn an_f32_weight_gradient_adds_its_extra_output_bytes_at_the_fitted_share() {
        // A bf16 expert backward of 2 experts (512 -> 1,024) into f32 weight gradients:
        // 2 bytes per gradient element more than a bf16 output, 6 when it adds into them.
        let mut p = profile::resolve("h200").expect("parses");
        let kind = |accumulate| OpKind::ExpertLinearBwdAcc {
            x: BufId(0), w: BufId(1), dy: BufId(2), dx: BufId(3), dw: BufId(4), dbias: BufId(5), n_local: 2, d_in: 512, d_out: 1024, accumulate,
        };
        let mut rp = rank_with(op(kind(false), 1 << 30, 1), 6);
        rp.buffers[4].elem_bytes = 4;
        let elems = rp.buffers[4].elems as f64;
        let cost = |acc: bool, p: &profile::Profile, rp: &RankPlan| match op_cost(&op(kind(acc), 1 << 30, 1), rp, &p.gpu, GemmDtype::Bf16) {
            Cost::Compute(s) => s,
            _ => panic!("compute"),
        };
        p.gpu.kernels.f32_output_share = None;
        p.gpu.kernels.f32_output_by_k.clear();
        let base = cost(true, &p, &rp);
        p.gpu.kernels.f32_output_share = Some(0.5);
        let bw = p.gpu.mem_bandwidth * 0.5;
        assert!((cost(false, &p, &rp) - base - 2.0 * elems / bw).abs() < 1e-12);
        assert!((cost(true, &p, &rp) - base - 6.0 * elems / bw).abs() < 1e-12);
        // Points by reduction length take over, read at the weight gradient's rows per expert.
        let rows = rp.buffers[0].elems / (2 * 512);
        let pt = |k, write_share, add_share| profile::F32OutputPoint { k, write_share, add_share };
        p.gpu.kernels.f32_output_by_k = vec![pt(rows, 0.25, 0.2), pt(rows * 4, 2.0, 2.0)];
        let at = |share: f64| elems / (p.gpu.mem_bandwidth * share);
        assert!((cost(false, &p, &rp) - base - 2.0 * at(0.25)).abs() < 1e-12);
        assert!((cost(true, &p, &rp) - base - 6.0 * at(0.2)).abs() < 1e-12);
        // A bf16 gradient has none.
        rp.buffers[4].elem_bytes = 2;
        assert_eq!(cost(true, &p, &rp), base);
    }

    #[test]
    fn dropless_expert_gemms_launch_once_per_expert_at_their_row_bucket() {
        // 4 experts, a routing-sized block of 1,000 rows each at a quarter load: the executor
        // runs 4 GEMMs of aligned_rows(250) = 256 rows (4 launches, and 4 bias launches), not
        // one batched GEMM of 250 rows per expert; at full load (a capacity plan) it is one call.
        let (n_local, d_in, d_out) = (4usize, 64usize, 32usize);
        let kind = OpKind::ExpertLinear { x: BufId(0), w: BufId(1), bias: BufId(2), y: BufId(3), n_local, d_in, d_out };
        let o = op(kind.clone(), 1, 1);
        let mut rp = rank_with(o, 4);
        rp.buffers[0] = BufferDesc { elems: n_local * 1000 * d_in, dynamic: true, ..rp.buffers[0].clone() };
        let (quarter, full) = (Fill::per_expert(0.25), Fill::per_expert(1.0));
        assert_eq!(gemms_at(&kind, &rp, quarter), vec![GemmShape { m: 256, n: d_out, k: d_in, batch: n_local }]);
        assert_eq!((gemm_calls(&kind, &rp, quarter), bias_pass(&kind, &rp, quarter).1), (n_local, n_local));
        assert_eq!(gemms_at(&kind, &rp, full), vec![GemmShape { m: 1000, n: d_out, k: d_in, batch: n_local }]);
        assert_eq!((gemm_calls(&kind, &rp, full), bias_pass(&kind, &rp, full).1), (1, 1));
        // Batched over whole blocks below the bound: one call over the filled rows.
        let batched = Fill { scale: 0.25, per_expert: false, block: 0.25 };
        assert_eq!(gemms_at(&kind, &rp, batched), vec![GemmShape { m: 250, n: d_out, k: d_in, batch: n_local }]);
        assert_eq!((gemm_calls(&kind, &rp, batched), bias_pass(&kind, &rp, batched).1), (1, 1));
        let bwd = OpKind::ExpertLinearBwd { x: BufId(0), w: BufId(1), dy: BufId(3), dx: BufId(0), dw: BufId(1), dbias: BufId(2), n_local, d_in, d_out };
        assert_eq!((gemms_at(&bwd, &rp, quarter).len(), gemm_calls(&bwd, &rp, quarter)), (2, n_local));
        // The host's calls bound such an op from below: 4 experts x 2 GEMMs at 1 ms a call; a
        // batched call (full load) has no floor.
        let mut p = profile::resolve("h200-datasheet").expect("parses");
        p.gpu.kernels.gemm_call_s = 1e-3;
        let ob = op(bwd, 1, 1);
        let Cost::Compute(s) = op_cost_sized(&ob, &rp, &p.gpu, GemmDtype::Bf16, 1, 1, Fill::per_expert(0.25), 0.0) else { panic!("compute") };
        assert!((s - 8e-3).abs() < 1e-12, "{s}");
        let Cost::Compute(s) = op_cost_sized(&ob, &rp, &p.gpu, GemmDtype::Bf16, 1, 1, Fill::per_expert(1.0), 0.0) else { panic!("compute") };
        assert!(s < 1e-4, "{s}");
    }

    #[test]
    fn capacity_expert_gemms_over_zero_rows_run_faster_by_each_passs_gain() {
        // 8 experts of 5,120 capacity rows, 4,096 -> 14,336, bf16: big enough that the math,
        // not the launch or the bytes, sets the time.
        let (n_local, rows, d_in, d_out) = (8usize, 5120usize, 4096usize, 14336usize);
        let fwd = OpKind::ExpertLinear { x: BufId(0), w: BufId(1), bias: BufId(2), y: BufId(3), n_local, d_in, d_out };
        let bwd = OpKind::ExpertLinearBwd { x: BufId(0), w: BufId(1), dy: BufId(3), dx: BufId(0), dw: BufId(1), dbias: BufId(2), n_local, d_in, d_out };
        let flops = 2 * (n_local * rows * d_in * d_out) as u64;
        let mut p = profile::resolve("h200").expect("parses");
        p.gpu.kernels.zero_row_gain = profile::ZeroRowGain { forward: 0.2, input_grad: 0.1, weight_grad: 0.3 };
        for (kind, gemms) in [(fwd, 1u64), (bwd, 2)] {
            let o = op(kind.clone(), gemms * flops, 1);
            let mut rp = rank_with(o.clone(), 4);
            rp.buffers[0] = BufferDesc { elems: n_local * rows * d_in, ..rp.buffers[0].clone() };
            let at = |zero: f64, dtype| match op_cost_kept(&o, &rp, &p.gpu, dtype, 1.0, zero) {
                Cost::Compute(s) => s,
                _ => panic!("compute"),
            };
            // The math of each shape at the profile's rate, over 1 + gain x zero share.
            let model = p.gpu.gemm(GemmDtype::Bf16);
            let math = |zero: f64| -> f64 {
                let passes = expert_gemm_passes(&kind).expect("an expert GEMM");
                let shapes = gemms_at(&kind, &rp, Fill::FULL);
                shapes.iter().zip(passes).map(|(s, pass)| model.seconds(s.flops(), s.m, s.n, s.k, s.batch) / (1.0 + p.gpu.kernels.zero_row_gain.of(*pass) * zero)).sum()
            };
            let overhead = at(0.0, GemmDtype::Bf16) - math(0.0);
            assert!(overhead >= 0.0 && overhead < 0.02 * math(0.0), "{overhead}");
            for zero in [0.2, 0.62, 1.0] {
                assert!((at(zero, GemmDtype::Bf16) - overhead - math(zero)).abs() < 1e-9, "{kind:?} at {zero}");
            }
            assert!(at(0.62, GemmDtype::Bf16) < 0.9 * at(0.0, GemmDtype::Bf16));
            // f32 GEMMs have no measured gain; ops that are not expert GEMMs are untouched.
            assert_eq!(at(0.62, GemmDtype::F32), at(0.0, GemmDtype::F32));
        }
        let act = op(OpKind::Act { h: BufId(0), a: BufId(1), act: crate::spec::Activation::Gelu }, 1000, 1 << 30);
        let ra = rank_with(act.clone(), 2);
        assert_eq!(op_cost_kept(&act, &ra, &p.gpu, GemmDtype::Bf16, 1.0, 0.62), op_cost(&act, &ra, &p.gpu, GemmDtype::Bf16));
    }

    #[test]
    fn elementwise_ops_are_bound_by_memory_bandwidth() {
        let p = profile::resolve("h200-datasheet").expect("parses");
        let kind = OpKind::Act { h: BufId(0), a: BufId(1), act: crate::spec::Activation::Gelu };
        let bytes = 1u64 << 30;
        let o = op(kind, 1000, bytes);
        let Cost::Compute(s) = op_cost(&o, &rank_with(o.clone(), 2), &p.gpu, GemmDtype::Bf16) else { panic!("compute") };
        assert!((s - p.gpu.launch_s - bytes as f64 / p.gpu.mem_bandwidth).abs() < 1e-12);
    }

    #[test]
    fn a_measured_shape_runs_at_its_measured_rate() {
        // The calibrated profile carries cuBLAS measurements; a plan GEMM of a measured shape
        // (the mixtral-ish expert fc1: 16384 x 14336 x 4096 in f32) takes exactly that rate.
        let p = profile::resolve("h200").expect("parses");
        assert!(p.calibrated);
        let pt = p.gpu.f32.points.iter().find(|q| (q.m, q.n, q.k) == (16384, 14336, 4096)).expect("measured");
        let (m, n, k) = (pt.m, pt.n, pt.k);
        let kind = OpKind::Linear { x: BufId(0), w: BufId(1), bias: None, residual: None, y: BufId(2), rows: m, d_in: k, d_out: n };
        let flops = 2 * (m * n * k) as u64;
        let o = op(kind, flops, 0);
        let Cost::Compute(s) = op_cost(&o, &rank_with(o.clone(), 3), &p.gpu, GemmDtype::F32) else { panic!("compute") };
        let tflops = flops as f64 / (s - p.gpu.launch_s) / 1e12;
        assert!((tflops - pt.tflops).abs() < 1e-6, "{tflops} vs {}", pt.tflops);
    }

    #[test]
    fn kernel_classes_and_host_round_trips_are_priced_by_the_profile() {
        // A LayerNorm at bandwidth share 0.25 takes 4x the copy time plus its fixed cost; a
        // CombineBwd pays one host round trip plus its slots at host_gbps.
        let text = include_str!("../../../profiles/h200-datasheet.toml");
        let text = format!("{text}\n[kernels]\nhost_sync_us = 40.0\nhost_gbps = 2.0\n\n[kernels.layernorm]\nbandwidth_share = 0.25\nfixed_us = 5.0\n");
        let p = profile::parse(&text, "t").expect("parses");
        let bytes = 1u64 << 28;
        let ln = OpKind::LayerNorm { x: BufId(0), gamma: BufId(1), beta: BufId(1), y: BufId(0), stats: BufId(1) };
        let o = op(ln, 0, bytes);
        let Cost::Compute(s) = op_cost(&o, &rank_with(o.clone(), 2), &p.gpu, GemmDtype::F32) else { panic!("compute") };
        let want = p.gpu.launch_s + 5e-6 + bytes as f64 / (0.25 * p.gpu.mem_bandwidth);
        assert!((s - want).abs() < 1e-12, "{s} vs {want}");
        let dims = crate::plan::ops::MoeDims {
            tokens: 4, d_model: 4, top_k: 1, n_experts: 2, data_world: 1, data_rank: 0, ep_peers: vec![0], ep_index: 0,
            capacity: crate::spec::Capacity::Factor(1.0), rows_per_expert: Some(2),
        };
        // rank_with's buffers hold 2 MiB each; CombineBwd downloads its slots (one buffer) with
        // one synchronising round trip, around its two kernels.
        let cb = OpKind::CombineBwd { dout: BufId(0), back: BufId(0), slots: BufId(1), weights: BufId(1), dback: BufId(0), dweights: BufId(1), dims: dims.clone() };
        let o = op(cb, 0, 0);
        let plan = rank_with(o.clone(), 2);
        let mib2 = 2.0 * (1 << 20) as f64;
        assert_eq!(host_traffic(&o.kind, &plan, 1.0), HostTraffic { syncs: 1, bytes: mib2 });
        let Cost::Compute(s) = op_cost(&o, &plan, &p.gpu, GemmDtype::F32) else { panic!("compute") };
        let want = 2.0 * p.gpu.launch_s + 40e-6 + mib2 / 2e9;
        assert!((s - want).abs() < 1e-12, "{s} vs {want}");
        // Route runs its statistics on the device: no host traffic, four kernels.
        let route = OpKind::Route { logits: BufId(0), probs: BufId(0), idx: BufId(1), weights: BufId(1), stats: BufId(1), n_experts: 8, top_k: 2, renormalize: false };
        assert_eq!(host_traffic(&route, &plan, 1.0), HostTraffic::default());
        // An AllToAllV exchanges its counts through the host first: two round trips before the
        // transfer, carried by its collective part.
        let a2a = OpKind::AllToAllV { group: crate::plan::GroupId(0), send: BufId(0), send_counts: BufId(1), recv: BufId(0), row_len: 4 };
        let x = op(a2a, 0, 1 << 20);
        let Cost::Collective(parts) = op_cost(&x, &plan, &p.gpu, GemmDtype::F32) else { panic!("collective") };
        assert!((parts[0].host_s - (2.0 * 40e-6 + 2.0 * mib2 / 2e9)).abs() < 1e-12, "{parts:?}");
        // A class's own host_gbps replaces the table's for that class only: an ExpertLayout
        // (class layout) moves its routing table down at 0.5 GB/s.
        let with_layout = format!("{text}\n[kernels.layout]\nbandwidth_share = 1.0\nhost_gbps = 0.5\n");
        let pl = profile::parse(&with_layout, "t").expect("parses");
        let lay = op(OpKind::ExpertLayout { recv: BufId(0), gathered: BufId(1), out: BufId(0), dims }, 0, 0);
        let lp = rank_with(lay.clone(), 2);
        let host = host_traffic(&lay.kind, &lp, 1.0);
        let (Cost::Compute(at_class), Cost::Compute(at_table)) = (op_cost(&lay, &lp, &pl.gpu, GemmDtype::F32), op_cost(&lay, &lp, &p.gpu, GemmDtype::F32)) else { panic!("compute") };
        assert!((at_class - at_table - (host.bytes / 0.5e9 - host.bytes / 2e9)).abs() < 1e-12, "{at_class} vs {at_table}");
        // Without a [kernels] table nothing changes: no host cost, copy bandwidth.
        let ds = profile::resolve("h200-datasheet").expect("parses");
        let Cost::Compute(s) = op_cost(&o, &plan, &ds.gpu, GemmDtype::F32) else { panic!("compute") };
        assert!((s - 2.0 * ds.gpu.launch_s).abs() < 1e-12);
        assert_eq!(issue_seconds(&o, &plan, &ds.gpu), 0.0);
    }

    #[test]
    fn issuing_an_op_costs_the_host_per_op_and_per_kernel_launch() {
        let text = include_str!("../../../profiles/h200-datasheet.toml");
        let p = profile::parse(&format!("{text}\n[kernels]\nhost_op_us = 5.0\nhost_launch_us = 4.0\n"), "t").expect("parses");
        let route = op(OpKind::Route { logits: BufId(0), probs: BufId(0), idx: BufId(1), weights: BufId(1), stats: BufId(1), n_experts: 8, top_k: 2, renormalize: false }, 0, 1 << 20);
        let plan = rank_with(route.clone(), 2);
        // Four kernels: 5 + 4 x 4 us, host work that runs ahead of the GPU (no sync) and
        // leaves the GPU's cost as it was.
        assert!((issue_seconds(&route, &plan, &p.gpu) - 21e-6).abs() < 1e-12);
        let (gpu_cost, host) = split_host(op_cost(&route, &plan, &p.gpu, GemmDtype::F32), &route, &plan, &p.gpu, 1.0, &HostCopies::default());
        assert_eq!(gpu_cost, op_cost(&route, &plan, &profile::resolve("h200-datasheet").unwrap().gpu, GemmDtype::F32));
        assert_eq!(host, HostWork { seconds: 21e-6, sync: false });
        for bad in ["host_op_us = -1.0", "host_launch_us = nan"] {
            let err = profile::parse(&format!("{text}\n[kernels]\n{bad}\n"), "t").expect_err("refused").to_string();
            assert!(err.contains(bad.split(' ').next().unwrap()), "{err}");
        }
    }
}
