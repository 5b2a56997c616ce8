//! PPMoE (Chen, Zhang, Gu, Bi, Xie, Tian, "Pipeline MoE: A Flexible MoE Implementation with Pipeline
//! Parallelism", arXiv 2304.11414): the experts of a layer are spread over the tensor-parallel
//! group, whose ranks hold the same tokens; no all-to-all. The backbone is tensor-parallel
//! (Megatron style) and the blocks are split into pipeline stages.
//!
//! Layout: `world = pp * dp * tp` (ep = 1), rank = (stage * dp + d) * tp + tp index: TP groups
//! are consecutive ranks holding one data shard, the data-parallel dimension is strided by
//! `tp`, and each of the `pp` stages holds `n_layers / pp` consecutive blocks on its own
//! `dp * tp` ranks. TP rank i owns experts `[i * E / tp, (i + 1) * E / tp)`. The gate is
//! replicated and computed redundantly (same top-k on every TP rank, no communication); each
//! rank picks its experts' rows out of its own dispatch layout (index slicing), runs its
//! experts, scatters the weighted rows into a `[T, M]` partial sum (the residual added by TP
//! index 0), and one all-reduce over the TP group gives the layer's output. Backward: the
//! output gradient is replicated; the gate-weight gradients (`[T, k]`) and the
//! LayerNorm-output gradient (`[T, M]`) are partial sums, each all-reduced over the TP group.
//!
//! Backbone ([`super::tensor`]): attention split by heads (QKV column-parallel, the output
//! projection row-parallel + all-reduce), the dense MLP likewise (fc1 column-, fc2
//! row-parallel + all-reduce); in backward the partial gradient of each LayerNorm output is
//! all-reduced. Pipeline ([`super::pipeline`]): each data shard's batch is cut into
//! `ppmoe.micro_batches` micro-batches, each routed on its own (capacity from the
//! micro-batch's tokens), run through the stages in the GPipe or 1F1B order with
//! point-to-point exchanges between neighbouring stages; the last stage computes the loss,
//! gradients accumulate over the micro-batches, and each stage's ranks reduce their gradients
//! over the stage's data-parallel group before one Adam step.

use super::blocks::{self, Routed};
use super::pipeline::{self, Pipe, StageWork};
use super::tensor::TpShard;
use super::topk::expert_param;
use super::TensorExpertDataGroups as Groups;
use crate::plan::ops::MoeDims;
use crate::plan::{BufId, Group, GroupId, OpKind, Plan, RankBuilder, RankPlan};
use crate::spec::{Capacity, ExperimentSpec, Mode};
use crate::taxonomy::{MemCategory as Mc, Pass, Stage};

struct MoeSaved {
    dims: MoeDims,
    /// The routing front: `ln_moe`, gate, choices, routing statistics.
    r: Routed,
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
    let groups = StageGroups::new(spec);
    let ranks = (0..spec.world()).map(|r| build_rank(spec, &groups, r)).collect();
    Plan { spec: spec.clone(), groups: groups.all, ranks }
}

/// The process groups of every stage (each stage's `dp * tp` ranks get the groups of a
/// `dp x tp` layout, ids offset by the stage) and the 2-member groups of stage neighbours.
struct StageGroups {
    /// The groups of stage 0 (ranks `0..dp * tp`); stage s's are the same shifted.
    base: Groups,
    /// Every group of the plan.
    all: Vec<Group>,
    /// Ranks per stage.
    per_stage: usize,
    /// Id of the first neighbour group (stage 0 to 1, local rank 0).
    links: usize,
}

impl StageGroups {
    fn new(spec: &ExperimentSpec) -> Self {
        let l = &spec.layout;
        let base = Groups::new(l.dp, 1, l.tp);
        let per_stage = l.dp * l.tp;
        let mut all = Vec::new();
        for p in 0..l.pp {
            for g in &base.groups {
                let name = if l.pp > 1 { format!("pp{p}.{}", g.name) } else { g.name.clone() };
                all.push(Group { name, ranks: g.ranks.iter().map(|r| r + (p * per_stage) as u32).collect() });
            }
        }
        let links = all.len();
        for p in 0..l.pp.saturating_sub(1) {
            for q in 0..per_stage {
                let (a, b) = ((p * per_stage + q) as u32, ((p + 1) * per_stage + q) as u32);
                all.push(Group { name: format!("pp{p}-{}.{q}", p + 1), ranks: vec![a, b] });
            }
        }
        StageGroups { base, all, per_stage, links }
    }
    fn stage(&self, rank: usize) -> usize {
        rank / self.per_stage
    }
    fn local(&self, rank: usize) -> usize {
        rank % self.per_stage
    }
    /// A stage-0 group id moved to `rank`'s stage.
    fn at(&self, rank: usize, g: GroupId) -> GroupId {
        GroupId((self.stage(rank) * self.base.groups.len()) as u32 + g.0)
    }
    /// The group of `rank` and its peer in stage `stage(rank) + 1`.
    fn down(&self, rank: usize) -> GroupId {
        GroupId((self.links + self.stage(rank) * self.per_stage + self.local(rank)) as u32)
    }
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
    /// The micro-batch's spec (its tokens and aux-loss share).
    spec: &'a ExperimentSpec,
    groups: &'a Groups,
    /// Rank within the stage.
    rank: usize,
    tpg: Option<GroupId>,
    /// The stage's data group (routing statistics).
    stats: GroupId,
}

impl blocks::MoeSublayer for Sublayer<'_> {
    type Saved = MoeSaved;
    fn forward(&mut self, b: &mut RankBuilder, layer: usize, x: BufId) -> (BufId, MoeSaved) {
        moe_forward(b, self.spec, self.groups, self.rank, self.tpg, self.stats, layer, x)
    }
    fn backward(&mut self, b: &mut RankBuilder, layer: usize, s: &MoeSaved, dout: BufId) -> BufId {
        moe_backward(b, self.spec, self.tpg, layer, s, dout)
    }
}

fn build_rank(spec: &ExperimentSpec, sg: &StageGroups, rank: usize) -> RankPlan {
    let (l, training) = (&spec.layout, spec.run.mode == Mode::Training);
    let mut b = RankBuilder::new(rank as u32, training, spec.model.dtype.size());
    let groups = &sg.base;
    let (stage, local) = (sg.stage(rank), sg.local(rank));
    let shards = groups.shards();
    let opts = spec.ppmoe.unwrap_or_default();
    let micro = opts.micro();
    // Each micro-batch is a step of T / micro tokens, routed on its own; the aux loss of the
    // step is the mean over micro-batches, so each backward carries 1 / micro of its weight.
    let mut mspec = spec.clone();
    mspec.model.tokens_per_rank = Some(spec.tokens_per_rank() / micro);
    mspec.model.batch = spec.model.batch.map(|x| x / micro);
    mspec.model.aux_loss_coef = spec.model.aux_loss_coef / micro as f64;
    let tpg = (l.tp > 1).then(|| sg.at(rank, groups.tp_group(local)));
    let tp = tpg.map(|group| TpShard { index: groups.tp_index(local), size: l.tp, group });
    let per_stage = spec.model.n_layers / l.pp;
    let moe = Sublayer { spec: &mspec, groups, rank: local, tpg, stats: sg.at(rank, groups.data_group(local)) };
    let mut work = StageModel {
        spec: &mspec,
        layers: stage * per_stage..(stage + 1) * per_stage,
        first: stage == 0,
        last: stage + 1 == l.pp,
        shard: groups.shard(local),
        micro,
        n_global: spec.tokens_per_rank() * shards,
        // Every TP rank computes the same loss; TP index 0 reports it, the others are replicas.
        role: if groups.tp_index(local) == 0 { blocks::LossRole::Counted } else { blocks::LossRole::Replica },
        tp,
        moe,
    };
    let pipe = Pipe {
        stages: l.pp,
        stage,
        micro,
        schedule: opts.schedule,
        training,
        up: (stage > 0).then(|| sg.down(rank - sg.per_stage)),
        down: (stage + 1 < l.pp).then(|| sg.down(rank)),
        act_elems: mspec.tokens_per_rank() * spec.model.d_model,
    };
    pipeline::build(&mut b, &pipe, &mut work);
    if training {
        // Identical dense gradients on the TP ranks of a shard (or each its own slice): sum over
        // the stage's shards only.
        let dense = (shards > 1).then(|| sg.at(rank, groups.data_group(local)));
        let expert = (l.dp > 1).then(|| sg.at(rank, groups.edp_group(local)));
        blocks::update(&mut b, spec, dense, expert);
    }
    b.finish()
}

/// One stage of the model for one micro-batch: its blocks (tensor-parallel backbone and the
/// PPMoE layer), the batch on the first stage, the loss on the last.
struct StageModel<'a> {
    spec: &'a ExperimentSpec,
    layers: std::ops::Range<usize>,
    first: bool,
    last: bool,
    shard: usize,
    micro: usize,
    n_global: usize,
    role: blocks::LossRole,
    tp: Option<TpShard>,
    moe: Sublayer<'a>,
}

/// A sublayer's state kept for backward.
enum Sub {
    Attn(blocks::AttnSaved),
    Mlp(blocks::MlpSaved),
    Moe(MoeSaved),
}

/// A micro-batch's forward state on one stage.
struct StageSaved {
    subs: Vec<(usize, Sub)>,
    /// The loss gradient (last stage, training).
    dy: Option<BufId>,
}

impl StageWork for StageModel<'_> {
    type Saved = StageSaved;
    fn forward(&mut self, b: &mut RankBuilder, mb: usize, input: Option<BufId>) -> (Option<BufId>, StageSaved) {
        let spec = self.spec;
        let (t, m) = (spec.tokens_per_rank(), spec.model.d_model);
        let training = spec.run.mode == Mode::Training;
        // The first stage loads the micro-batch; the last loads it too, for its targets.
        let loaded = (self.first || self.last).then(|| {
            let x = b.buf("input.x", t * m, Mc::Inputs);
            let target = b.buf("input.target", t * m, Mc::Inputs);
            let batch = t / spec.seq_len();
            // Micro-batch j of shard s: sequences [s B + j B/micro, ...), as LoadBatch keys them.
            let shard = self.shard * self.micro + mb;
            b.op("load_batch", Stage::Data, Pass::Forward,
                OpKind::LoadBatch { x, target, shard, batch, seq: spec.seq_len(), d_model: m }, 0, 8 * (t * m) as u64);
            (x, target)
        });
        let mut x = match (input, loaded) {
            (Some(x), _) => x,
            (None, Some((x, _))) => x,
            (None, None) => unreachable!("a stage other than the first receives its input"),
        };
        let mut subs = Vec::new();
        for layer in self.layers.clone() {
            b.set_layer(Some(layer as u32));
            if let Some(bb) = &spec.model.backbone {
                if bb.n_heads > 0 {
                    let (out, s) = blocks::attention_tp(b, spec, layer, x, bb.n_heads, self.tp.as_ref());
                    subs.push((layer, Sub::Attn(s)));
                    x = out;
                }
                if bb.d_mlp > 0 {
                    let (out, s) = blocks::dense_mlp_tp(b, spec, layer, x, bb.d_mlp, self.tp.as_ref());
                    subs.push((layer, Sub::Mlp(s)));
                    x = out;
                }
            }
            let (out, s) = blocks::MoeSublayer::forward(&mut self.moe, b, layer, x);
            subs.push((layer, Sub::Moe(s)));
            x = out;
        }
        b.set_layer(None);
        if !self.last {
            return (Some(x), StageSaved { subs, dy: None });
        }
        let target = loaded.expect("the last stage loads its targets").1;
        let loss = b.buf("loss", 1, Mc::Activations);
        let dy = training.then(|| b.buf("loss.dy", t * m, Mc::Activations));
        let (n_global, d_model) = (self.n_global, m);
        let kind = match self.role {
            blocks::LossRole::Counted => OpKind::Loss { y: x, target, loss, dy, n_global, d_model },
            blocks::LossRole::Replica => OpKind::LossReplica { y: x, target, loss, dy, n_global, d_model },
        };
        b.op("loss", Stage::Loss, Pass::Forward, kind, 3 * (t * m) as u64, 12 * (t * m) as u64);
        (None, StageSaved { subs, dy })
    }

    fn backward(&mut self, b: &mut RankBuilder, _mb: usize, saved: StageSaved, dout: Option<BufId>) -> Option<BufId> {
        let spec = self.spec;
        let mut grad = dout.or(saved.dy).expect("a gradient from the next stage or the loss");
        let subs: Vec<&(usize, Sub)> = saved.subs.iter().rev().collect();
        for (i, (layer, s)) in subs.iter().enumerate() {
            b.set_layer(Some(*layer as u32));
            grad = match s {
                Sub::Attn(a) => blocks::attention_bwd(b, spec, *layer, a, grad),
                Sub::Mlp(p) => blocks::dense_mlp_bwd(b, spec, *layer, p, grad),
                Sub::Moe(s) => blocks::MoeSublayer::backward(&mut self.moe, b, *layer, s, grad),
            };
            // A later micro-batch's gradients of this block go into the step's right away.
            if subs.get(i + 1).is_none_or(|n| n.0 != *layer) {
                pipeline::accumulate_grads(b);
            }
        }
        b.set_layer(None);
        (!self.first).then_some(grad)
    }
}

fn tp_allreduce(b: &mut RankBuilder, name: &str, pass: Pass, group: Option<GroupId>, buf: BufId) {
    if let Some(g) = group {
        let bytes = b.f32_bytes_of(buf);
        b.op(name, Stage::AllReduce, pass, OpKind::AllReduce { group: g, bufs: vec![buf] }, 0, bytes);
    }
}

#[allow(clippy::too_many_arguments)]
fn moe_forward(b: &mut RankBuilder, spec: &ExperimentSpec, groups: &Groups, rank: usize, tpg: Option<GroupId>, stats: GroupId, layer: usize,
    x: BufId) -> (BufId, MoeSaved) {
    let dims = moe_dims(spec, groups, rank);
    let (t, m, k, f) = (dims.tokens, dims.d_model, dims.top_k, spec.model.d_ffn);
    let el = dims.local_experts();
    let routed = blocks::gate_and_route(b, spec, layer, x, &dims, stats);
    let (idx, weights, gathered) = (routed.idx, routed.weights, routed.gathered);
    let dropless = dims.rows_per_expert.is_none();
    let rows = dims.rows_per_expert.unwrap_or(t);
    let route_buf = |b: &mut RankBuilder, name: String, elems: usize, cat: Mc| {
        if dropless { b.dyn_buf(name, elems, cat) } else { b.buf(name, elems, cat) }
    };
    let send = b.buf(format!("L{layer}.moe.send"), t * k * m, Mc::Activations);
    let send_counts = b.index_buf(format!("L{layer}.moe.send_counts"), dims.ep_peers.len(), Mc::Activations);
    let slots = b.index_buf(format!("L{layer}.moe.slots"), t * k, Mc::Activations);
    b.op("dispatch", Stage::Permute, Pass::Forward,
        OpKind::Dispatch { x: routed.ln.y, idx, gathered, send, send_counts, slots, dims: dims.clone() }, 0, 8 * (t * k * m) as u64);
    let ein = route_buf(b, format!("L{layer}.expert.in"), el * rows * m, Mc::Activations);
    b.op("expert_layout", Stage::Permute, Pass::Forward, OpKind::LocalLayout { send, gathered, out: ein, dims: dims.clone() }, 0,
        8 * (el * rows * m) as u64);
    let w1 = expert_param(b, layer, "w1", &dims, m * f, 1.0 / (m as f32).sqrt());
    let b1 = expert_param(b, layer, "b1", &dims, f, 0.02);
    let w2 = expert_param(b, layer, "w2", &dims, f * m, 1.0 / (f as f32).sqrt());
    let b2 = expert_param(b, layer, "b2", &dims, m, 0.02);
    let blk = blocks::ExpertBlock { n_local: el, rows, m, f, dynamic: dropless };
    let (h, a, y) = blocks::expert_mlp_forward(b, spec, layer, &blk, ein, blocks::ExpertWeights { w1, b1, w2, b2 });
    let back = b.buf(format!("L{layer}.moe.back"), t * k * m, Mc::Activations);
    b.op("expert_unlayout", Stage::Permute, Pass::Forward, OpKind::LocalUnlayout { input: y, gathered, full: back, dims: dims.clone() }, 0,
        8 * (t * k * m) as u64);
    let out = b.buf(format!("L{layer}.moe.out"), t * m, Mc::Activations);
    let residual = (dims.ep_index == 0).then_some(x);
    b.op("combine", Stage::Combine, Pass::Forward,
        OpKind::CombinePart { back, slots, weights, residual, out, dims: dims.clone() }, 2 * (t * k * m) as u64,
        4 * (t * k * m + 2 * t * m) as u64);
    tp_allreduce(b, "moe_allreduce", Pass::Forward, tpg, out);
    (out, MoeSaved { dims, r: routed, slots, ein, h, a, back, w1, b1, w2, b2 })
}

fn moe_backward(b: &mut RankBuilder, spec: &ExperimentSpec, tpg: Option<GroupId>, layer: usize, s: &MoeSaved, dout: BufId) -> BufId {
    let d = &s.dims;
    let (t, m, k, f) = (d.tokens, d.d_model, d.top_k, spec.model.d_ffn);
    let el = d.local_experts();
    let dropless = d.rows_per_expert.is_none();
    let rows = d.rows_per_expert.unwrap_or(t);
    let route_buf = |b: &mut RankBuilder, name: String, elems: usize, cat: Mc| {
        if dropless { b.dyn_buf(name, elems, cat) } else { b.buf(name, elems, cat) }
    };
    let dback = b.buf(format!("L{layer}.moe.dback"), t * k * m, Mc::Activations);
    let dweights = b.buf(format!("L{layer}.route.dweights"), t * k, Mc::Activations);
    b.op("combine_bwd", Stage::Combine, Pass::Backward,
        OpKind::CombineBwd { dout, back: s.back, slots: s.slots, weights: s.r.weights, dback, dweights, dims: d.clone() },
        4 * (t * k * m) as u64, 4 * (2 * t * k * m + t * m) as u64);
    // Each rank knows the weight gradients of its own experts' assignments only.
    tp_allreduce(b, "dweights_allreduce", Pass::Backward, tpg, dweights);
    let dy = route_buf(b, format!("L{layer}.expert.dout"), el * rows * m, Mc::Temporaries);
    b.op("expert_layout_bwd", Stage::Permute, Pass::Backward, OpKind::LocalLayout { send: dback, gathered: s.r.gathered, out: dy, dims: d.clone() },
        0, 8 * (el * rows * m) as u64);
    let blk = blocks::ExpertBlock { n_local: el, rows, m, f, dynamic: dropless };
    let w = blocks::ExpertWeights { w1: s.w1, b1: s.b1, w2: s.w2, b2: s.b2 };
    let g = blocks::ExpertWeights { w1: b.grad(s.w1), b1: b.grad(s.b1), w2: b.grad(s.w2), b2: b.grad(s.b2) };
    let dein = blocks::expert_mlp_backward(b, spec, layer, &blk, s.ein, s.h, s.a, w, g, dy);
    let dsend = b.buf(format!("L{layer}.moe.dsend"), t * k * m, Mc::Activations);
    b.op("expert_unlayout_bwd", Stage::Permute, Pass::Backward,
        OpKind::LocalUnlayout { input: dein, gathered: s.r.gathered, full: dsend, dims: d.clone() }, 0, 8 * (t * k * m) as u64);
    let dxm = blocks::dispatch_backward(b, layer, d, s.slots, dsend);
    // Partial over the local experts: sum over the TP group before the replicated gate's share.
    tp_allreduce(b, "dx_allreduce", Pass::Backward, tpg, dxm);
    blocks::gate_backward(b, spec, layer, &s.r, d, dweights, dxm, dout)
}
