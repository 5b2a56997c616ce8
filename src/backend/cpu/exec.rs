//! Execution of one [`OpKind`] on one rank with real f32 math.

use super::fabric::Fabric;
use super::store::{OpView, StoreError};
use crate::math::{activation, attention, linalg, norm, rng, routing};
use crate::plan::ops::MoeDims;
use crate::plan::{BufId, Group, OpKind};
use crate::backend::BackendError;

/// What an op needs besides its buffers.
pub struct OpCtx<'a> {
    /// Global rank.
    pub rank: u32,
    /// Experiment seed.
    pub seed: u64,
    /// Data step index (selects the batch).
    pub step: u64,
    /// Optimizer step count, 1-based.
    pub adam_step: u64,
    /// Collectives.
    pub fabric: &'a Fabric,
    /// Process groups of the plan.
    pub groups: &'a [Group],
    /// Name of the op, for errors.
    pub op_name: &'a str,
    /// Routing replay: the choices a `Route` op takes instead of its own top-k.
    pub forced_idx: Option<&'a [i32]>,
    /// The rank plan's buffers, when the op should round what the GPU keeps in bf16 inside
    /// an op (see [`OpCtx::stored_bf16`]); `None` computes everything in f32.
    pub buffers: Option<&'a [crate::plan::BufferDesc]>,
}

impl OpCtx<'_> {
    /// Whether `id` is stored bf16. A bf16 plan's ops then round where the cuda executor
    /// stores bf16 inside the op: a GEMM's product before its bias is added, the attention
    /// probabilities before `ctx` reads them and the score gradients before `dq`/`dk` do.
    pub fn stored_bf16(&self, id: BufId) -> bool {
        self.buffers.is_some_and(|b| b[id.0 as usize].is_bf16())
    }

    /// `v` as buffer `id` would store it: rounded to bf16 when `id` is bf16.
    fn round_as_stored(&self, id: BufId, v: &mut [f32]) {
        if self.stored_bf16(id) {
            crate::math::bf16::round_in_place(v);
        }
    }

    /// Rounding of values a bf16 buffer `id` would hold; identity otherwise.
    fn store_of(&self, id: BufId) -> fn(f32) -> f32 {
        if self.stored_bf16(id) {
            crate::math::bf16::round
        } else {
            |v| v
        }
    }
}

/// Routing facts an op observed, summed into the step report.
#[derive(Debug, Default, Clone, Copy)]
pub struct RouteObs {
    /// Aux loss of the layer (same on every rank).
    pub aux: f64,
    /// Assignments dropped over the whole batch.
    pub dropped: usize,
    /// Assignments over the whole batch.
    pub routed: usize,
    /// Local loss contribution.
    pub loss: f64,
    /// Capacity C (slots per expert) the layer's routing chose.
    pub capacity: usize,
}

/// Result of an op: actual bytes for collectives, routing facts for dispatch.
#[derive(Debug, Default)]
pub struct OpOutcome {
    /// Bytes actually sent (collectives).
    pub bytes: Option<u64>,
    /// Routing or loss observations.
    pub obs: Option<RouteObs>,
}

fn fail(ctx: &OpCtx, e: StoreError) -> BackendError {
    BackendError::OpFailed { rank: ctx.rank, op: ctx.op_name.to_string(), message: e.0 }
}

/// The routing table of a MoE layer from its all-gathered statistics.
pub fn table(dims: &MoeDims, gathered: &[f32]) -> routing::RoutingTable {
    routing::RoutingTable::new(gathered, dims.data_world, dims.top_k, dims.n_experts, dims.tokens, dims.capacity)
}

/// Rows per local expert in the expert buffers: planned, or the largest local load rounded
/// up to a dropless block size ([`MoeDims::dropless_rows`]).
fn rows_per_expert(dims: &MoeDims, t: &routing::RoutingTable) -> usize {
    dims.rows_per_expert.unwrap_or_else(|| {
        let el = dims.local_experts();
        let load = (0..el)
            .map(|i| dims.ep_peers.iter().map(|&s| t.kept_rank_expert(s, dims.ep_index * el + i)).sum::<usize>())
            .max()
            .unwrap_or(0);
        dims.dropless_rows(load)
    })
}

/// A run of rows a layout moves: `n` rows from row `src` of its source to row `dst` of its
/// output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowBlock {
    /// First source row.
    pub src: usize,
    /// First output row.
    pub dst: usize,
    /// Rows.
    pub n: usize,
}

/// What an expert layout moves, known from the routing table alone: its row blocks, its
/// output's rows and, for an unlayout, the rows per expert-parallel peer. The cpu backend
/// copies the blocks; the cuda executor gathers them on the device.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockLayout {
    /// Row blocks, in the order the rows arrive (peer-major, then local expert).
    pub blocks: Vec<RowBlock>,
    /// Rows of the output (rows not in a block are zero).
    pub out_rows: usize,
    /// Rows per expert-parallel peer (unlayouts, which send them).
    pub counts: Option<Vec<i32>>,
}

/// Rows received from the expert-parallel peers (peer-major, then local expert) into the
/// expert buffer `[E_local, rows, M]` (`unlayout` false), or the expert buffer back to
/// peer-major rows (`unlayout` true); `count(peer, expert)` rows per block.
fn expert_row_blocks(dims: &MoeDims, rows: usize, unlayout: bool, count: impl Fn(usize, usize) -> usize) -> BlockLayout {
    let el = dims.local_experts();
    let mut blocks = Vec::with_capacity(dims.ep_peers.len() * el);
    let mut counts = vec![0i32; dims.ep_peers.len()];
    let mut fill = vec![0usize; el];
    let mut flat = 0usize;
    for (p, &peer) in dims.ep_peers.iter().enumerate() {
        for (i, f) in fill.iter_mut().enumerate() {
            let n = count(peer, dims.ep_index * el + i);
            let expert_row = i * rows + *f;
            let (src, dst) = if unlayout { (expert_row, flat) } else { (flat, expert_row) };
            blocks.push(RowBlock { src, dst, n });
            *f += n;
            flat += n;
            counts[p] += n as i32;
        }
    }
    if unlayout {
        BlockLayout { blocks, out_rows: flat, counts: Some(counts) }
    } else {
        BlockLayout { blocks, out_rows: el * rows, counts: None }
    }
}

/// The blocks of an `ExpertLayout` or `ExpertUnlayout` from the all-gathered routing
/// statistics; `None` for other ops.
pub fn block_layout(kind: &OpKind, gathered: &[f32]) -> Option<BlockLayout> {
    let (dims, unlayout) = match kind {
        OpKind::ExpertLayout { dims, .. } => (dims, false),
        OpKind::ExpertUnlayout { dims, .. } => (dims, true),
        _ => return None,
    };
    let tb = table(dims, gathered);
    let rows = rows_per_expert(dims, &tb);
    Some(expert_row_blocks(dims, rows, unlayout, |peer, ex| tb.kept_rank_expert(peer, ex)))
}

/// Copies the blocks of `src` (rows of `m` values) into a zeroed output of `out_rows` rows.
fn apply_blocks(l: &BlockLayout, src: &[f32], m: usize) -> Vec<f32> {
    let mut out = vec![0.0; l.out_rows * m];
    for b in &l.blocks {
        out[b.dst * m..(b.dst + b.n) * m].copy_from_slice(&src[b.src * m..(b.src + b.n) * m]);
    }
    out
}

/// [`expert_row_blocks`] applied: rows into the expert buffer.
fn layout_rows(dims: &MoeDims, recv: &[f32], rows: usize, count: impl Fn(usize, usize) -> usize) -> Vec<f32> {
    apply_blocks(&expert_row_blocks(dims, rows, false, count), recv, dims.d_model)
}

/// The inverse of [`layout_rows`]: the expert buffer back to peer-major rows, with the
/// number of rows for each peer.
fn unlayout_rows(dims: &MoeDims, input: &[f32], rows: usize, count: impl Fn(usize, usize) -> usize) -> (Vec<f32>, Vec<i32>) {
    let l = expert_row_blocks(dims, rows, true, count);
    (apply_blocks(&l, input, dims.d_model), l.counts.unwrap_or_default())
}

/// Execute `kind` on the op's view of the store.
pub fn execute(kind: &OpKind, st: &mut OpView, ctx: &OpCtx) -> Result<OpOutcome, BackendError> {
    exec_inner(kind, st, ctx).map_err(|e| match e {
        Failure::Store(s) => fail(ctx, s),
        Failure::Backend(b) => b,
    })
}

enum Failure {
    Store(StoreError),
    Backend(BackendError),
}
impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Store(e)
    }
}
impl From<BackendError> for Failure {
    fn from(e: BackendError) -> Self {
        Failure::Backend(e)
    }
}

fn exec_inner(kind: &OpKind, st: &mut OpView, ctx: &OpCtx) -> Result<OpOutcome, Failure> {
    use OpKind::*;
    let mut outcome = OpOutcome::default();
    match kind {
        LoadBatch { x, target, shard, batch, seq, d_model } => {
            let m = *d_model;
            let mut xs = vec![0.0f32; batch * seq * m];
            for b in 0..*batch {
                let global_seq = (shard * batch + b) as u64;
                let mut r = rng::stream(ctx.seed, "data.x", ctx.step, global_seq);
                rng::fill_normal(&mut r, &mut xs[b * seq * m..(b + 1) * seq * m], 1.0);
            }
            let mut ts = vec![0.0f32; xs.len()];
            for (trow, xrow) in ts.chunks_exact_mut(m).zip(xs.chunks_exact(m)) {
                for i in 0..m {
                    trow[i] = xrow[(i + 1) % m];
                }
            }
            st.put_f32(*x, xs)?;
            st.put_f32(*target, ts)?;
        }
        LayerNorm { x, gamma, beta, y, stats } => {
            let xv = st.f32(*x)?;
            let mut yv = vec![0.0; xv.len()];
            let mut sv = vec![0.0; 2 * xv.len() / st.f32(*gamma)?.len()];
            norm::forward(xv, st.f32(*gamma)?, st.f32(*beta)?, &mut yv, &mut sv);
            st.put_f32(*y, yv)?;
            st.put_f32(*stats, sv)?;
        }
        LayerNormBwd { x, gamma, stats, dy, residual, dx, dgamma, dbeta } => {
            let g = st.f32(*gamma)?;
            let mut dxv = vec![0.0; st.f32(*x)?.len()];
            let mut dg = vec![0.0; g.len()];
            let mut db = vec![0.0; g.len()];
            norm::backward(st.f32(*x)?, g, st.f32(*stats)?, st.f32(*dy)?, &mut dxv, &mut dg, &mut db);
            if let Some(r) = residual {
                for (d, v) in dxv.iter_mut().zip(st.f32(*r)?) {
                    *d += v;
                }
            }
            st.put_f32(*dx, dxv)?;
            st.put_f32(*dgamma, dg)?;
            st.put_f32(*dbeta, db)?;
        }
        Linear { x, w, bias, residual, y, rows, d_in, d_out } => {
            let mut yv = match residual {
                Some(r) => st.f32(*r)?[..rows * d_out].to_vec(),
                None => vec![0.0; rows * d_out],
            };
            linalg::gemm(&st.f32(*x)?[..rows * d_in], st.f32(*w)?, &mut yv, *rows, *d_in, *d_out, true);
            if let Some(b) = bias {
                // bf16: the GEMM stores its product, then the bias is added to it.
                ctx.round_as_stored(*y, &mut yv);
                linalg::add_bias(&mut yv, st.f32(*b)?);
            }
            st.put_f32(*y, yv)?;
        }
        LinearBwd { x, w, dy, dx, dw, dbias, accumulate_dx, rows, d_in, d_out } => {
            let mut dwv = vec![0.0; d_in * d_out];
            linalg::gemm_tn(&st.f32(*x)?[..rows * d_in], &st.f32(*dy)?[..rows * d_out], &mut dwv, *rows, *d_in, *d_out, false);
            if let Some(db) = dbias {
                let mut dbv = vec![0.0; *d_out];
                linalg::col_sums(&st.f32(*dy)?[..rows * d_out], &mut dbv, false);
                st.put_f32(*db, dbv)?;
            }
            if let Some(d) = dx {
                let mut dxv = if *accumulate_dx { st.take_f32(*d)? } else { vec![0.0; rows * d_in] };
                linalg::gemm_nt(&st.f32(*dy)?[..rows * d_out], st.f32(*w)?, &mut dxv[..rows * d_in], *rows, *d_out, *d_in, true);
                st.put_f32(*d, dxv)?;
            }
            st.put_f32(*dw, dwv)?;
        }
        Act { h, a, act } => {
            let hv = st.f32(*h)?;
            let mut av = vec![0.0; hv.len()];
            activation::forward(*act, hv, &mut av);
            st.put_f32(*a, av)?;
        }
        ActBwd { h, da, dh, act } => {
            let hv = st.f32(*h)?;
            let mut dv = vec![0.0; hv.len()];
            activation::backward(*act, hv, st.f32(*da)?, &mut dv);
            st.put_f32(*dh, dv)?;
        }
        AttnCore { qkv, probs, ctx: c, dims } => {
            let s = attention::AttnShape { batch: dims.batch, seq: dims.seq, heads: dims.heads, d_model: dims.d_model };
            let mut p = vec![0.0; s.probs_len()];
            let mut cv = vec![0.0; dims.batch * dims.seq * dims.d_model];
            attention::forward_stored(s, st.f32(*qkv)?, &mut p, &mut cv, ctx.store_of(*probs));
            st.put_f32(*probs, p)?;
            st.put_f32(*c, cv)?;
        }
        AttnCoreBwd { qkv, probs, dctx, dqkv, dims } => {
            let s = attention::AttnShape { batch: dims.batch, seq: dims.seq, heads: dims.heads, d_model: dims.d_model };
            let mut d = vec![0.0; st.f32(*qkv)?.len()];
            // The GPU keeps dS in the storage of dqkv.
            attention::backward_stored(s, st.f32(*qkv)?, st.f32(*probs)?, st.f32(*dctx)?, &mut d, ctx.store_of(*dqkv));
            st.put_f32(*dqkv, d)?;
        }
        Route { logits, probs, idx, weights, stats, n_experts, top_k, renormalize } => {
            let (e, k) = (*n_experts, *top_k);
            let lv = st.f32(*logits)?;
            let t = lv.len() / e;
            let mut pv = vec![0.0; lv.len()];
            routing::softmax_rows(lv, &mut pv, e);
            let mut iv = vec![0i32; t * k];
            let mut wv = vec![0.0; t * k];
            match ctx.forced_idx {
                Some(f) if f.len() == t * k => {
                    // A replayed choice must be a real, distinct expert of its token.
                    let bad = f.chunks(k).position(|c| c.iter().enumerate().any(|(j, &x)| x < 0 || x as usize >= e || c[..j].contains(&x)));
                    if let Some(tok) = bad {
                        return Err(StoreError(format!("replayed routing of token {tok} is not {k} distinct experts of {e}: {:?}", &f[tok * k..(tok + 1) * k])).into());
                    }
                    iv.copy_from_slice(f);
                    routing::weights_of(&pv, &iv, e, k, *renormalize, &mut wv);
                }
                Some(f) => return Err(StoreError(format!("replayed routing has {} choices, the op makes {}", f.len(), t * k)).into()),
                None => routing::top_k(&pv, e, k, *renormalize, &mut iv, &mut wv),
            }
            let mut sv = vec![0.0; (k + 1) * e];
            routing::local_stats(&pv, &iv, e, k, &mut sv);
            st.put_f32(*probs, pv)?;
            st.put_i32(*idx, iv)?;
            st.put_f32(*weights, wv)?;
            st.put_f32(*stats, sv)?;
        }
        RouteBwd { probs, idx, dweights, gathered, dlogits, dims, renormalize, aux_coef } => {
            let tb = table(dims, st.f32(*gathered)?);
            let mut dl = vec![0.0; dims.tokens * dims.n_experts];
            routing::route_backward(st.f32(*probs)?, st.i32(*idx)?, st.f32(*dweights)?, dims.n_experts, dims.top_k, *renormalize,
                *aux_coef, &tb, &mut dl);
            st.put_f32(*dlogits, dl)?;
        }
        Dispatch { x, idx, gathered, send, send_counts, slots, dims } => {
            let tb = table(dims, st.f32(*gathered)?);
            let (t, k, e, m) = (dims.tokens, dims.top_k, dims.n_experts, dims.d_model);
            let iv = st.i32(*idx)?;
            let keep = routing::keep_mask(&tb, dims.data_rank, iv, k, e);
            // Rows grouped by expert; within an expert, choice-major then token order (a
            // counting sort: one pass counts, one places; no division per row, as the cuda
            // executor runs this at unit width on every step).
            let mut per_expert = vec![0usize; e];
            for (a, &ex) in iv.iter().enumerate() {
                if keep[a] {
                    per_expert[ex as usize] += 1;
                }
            }
            let mut next = Vec::with_capacity(e);
            let mut total = 0usize;
            for &c in &per_expert {
                next.push(total);
                total += c;
            }
            let mut token_of = vec![0usize; total];
            let mut slot = vec![-1i32; t * k];
            for j in 0..k {
                for tok in 0..t {
                    let a = tok * k + j;
                    if keep[a] {
                        let r = &mut next[iv[a] as usize];
                        token_of[*r] = tok;
                        slot[a] = *r as i32;
                        *r += 1;
                    }
                }
            }
            let xv = st.f32(*x)?;
            let mut sv = vec![0.0f32; total * m];
            if m == 1 {
                for (o, &tok) in sv.iter_mut().zip(&token_of) {
                    *o = xv[tok];
                }
            } else {
                for (o, &tok) in sv.chunks_exact_mut(m).zip(&token_of) {
                    o.copy_from_slice(&xv[tok * m..(tok + 1) * m]);
                }
            }
            let el = dims.local_experts();
            let mut counts = vec![0i32; dims.ep_peers.len()];
            for (ex, &c) in per_expert.iter().enumerate() {
                counts[ex / el] += c as i32;
            }
            outcome.obs = Some(RouteObs { aux: tb.aux_loss(), dropped: tb.dropped(), routed: tb.n_global * k, loss: 0.0, capacity: tb.capacity });
            st.put_f32(*send, sv)?;
            st.put_i32(*send_counts, counts)?;
            st.put_i32(*slots, slot)?;
        }
        DispatchBwd { dsend, slots, dx, dims } => {
            let (k, m) = (dims.top_k, dims.d_model);
            let ds = st.f32(*dsend)?;
            let mut d = vec![0.0; dims.tokens * m];
            for (a, &s) in st.i32(*slots)?.iter().enumerate() {
                if s >= 0 {
                    let s = s as usize;
                    for (o, v) in d[(a / k) * m..(a / k + 1) * m].iter_mut().zip(&ds[s * m..(s + 1) * m]) {
                        *o += v;
                    }
                }
            }
            st.put_f32(*dx, d)?;
        }
        // The blocks the cuda executor gathers on the device (`block_layout`).
        ExpertLayout { recv, gathered, out, dims } => {
            let l = block_layout(kind, st.f32(*gathered)?).expect("an expert layout");
            st.put_f32(*out, apply_blocks(&l, st.f32(*recv)?, dims.d_model))?;
        }
        ExpertUnlayout { input, gathered, send, send_counts, dims } => {
            let l = block_layout(kind, st.f32(*gathered)?).expect("an expert layout");
            st.put_f32(*send, apply_blocks(&l, st.f32(*input)?, dims.d_model))?;
            st.put_i32(*send_counts, l.counts.unwrap_or_default())?;
        }
        ExpertLinear { x, w, bias, y, n_local, d_in, d_out } => {
            // bf16: the GEMM stores its product, then the bias is added to it.
            let mut yv = linalg::grouped_linear(st.f32(*x)?, st.f32(*w)?, *n_local, *d_in, *d_out);
            ctx.round_as_stored(*y, &mut yv);
            linalg::add_grouped_bias(&mut yv, st.f32(*bias)?, *n_local, *d_out);
            st.put_f32(*y, yv)?;
        }
        ExpertLinearBwd { x, w, dy, dx, dw, dbias, n_local, d_in, d_out } => {
            let (dxv, dwv, dbv) = linalg::grouped_linear_bwd(st.f32(*x)?, st.f32(*w)?, st.f32(*dy)?, *n_local, *d_in, *d_out);
            st.put_f32(*dx, dxv)?;
            st.put_f32(*dw, dwv)?;
            st.put_f32(*dbias, dbv)?;
        }
        Combine { back, slots, weights, residual, out, dims } => {
            let (k, m) = (dims.top_k, dims.d_model);
            let mut o = st.f32(*residual)?.to_vec();
            let (bv, wv) = (st.f32(*back)?, st.f32(*weights)?);
            for (a, &s) in st.i32(*slots)?.iter().enumerate() {
                if s >= 0 {
                    let (s, w) = (s as usize, wv[a]);
                    for (ov, v) in o[(a / k) * m..(a / k + 1) * m].iter_mut().zip(&bv[s * m..(s + 1) * m]) {
                        *ov += w * v;
                    }
                }
            }
            st.put_f32(*out, o)?;
        }
        CombineBwd { dout, back, slots, weights, dback, dweights, dims } => {
            let (k, m) = (dims.top_k, dims.d_model);
            let (dov, bv, wv) = (st.f32(*dout)?, st.f32(*back)?, st.f32(*weights)?);
            let sl = st.i32(*slots)?;
            let used = sl.iter().filter(|&&s| s >= 0).count();
            let mut db = vec![0.0; used * m];
            let mut dw = vec![0.0; dims.tokens * k];
            for (a, &s) in sl.iter().enumerate() {
                if s >= 0 {
                    let s = s as usize;
                    let d = &dov[(a / k) * m..(a / k + 1) * m];
                    dw[a] = d.iter().zip(&bv[s * m..(s + 1) * m]).map(|(x, y)| x * y).sum();
                    for (o, v) in db[s * m..(s + 1) * m].iter_mut().zip(d) {
                        *o = wv[a] * v;
                    }
                }
            }
            st.put_f32(*dback, db)?;
            st.put_f32(*dweights, dw)?;
        }
        Loss { y, target, loss, dy, n_global, d_model } => {
            let (yv, tv) = (st.f32(*y)?, st.f32(*target)?);
            let denom = (*n_global * *d_model) as f64;
            let sq: f64 = yv.iter().zip(tv).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            let l = sq / (2.0 * denom);
            if let Some(d) = dy {
                let g: Vec<f32> = yv.iter().zip(tv).map(|(a, b)| ((a - b) as f64 / denom) as f32).collect();
                st.put_f32(*d, g)?;
            }
            st.put_f32(*loss, vec![l as f32])?;
            outcome.obs = Some(RouteObs { loss: l, ..Default::default() });
        }
        AllGather { group, send, recv } => {
            let g = &ctx.groups[group.0 as usize];
            let mine = st.f32(*send)?.to_vec();
            outcome.bytes = Some((mine.len() * 4) as u64);
            let all = ctx.fabric.collective(group.0, &g.ranks, ctx.rank, ctx.op_name, vec![mine], |deps, _| {
                deps.iter().flat_map(|d| d[0].iter().copied()).collect::<Vec<f32>>()
            })?;
            st.put_f32(*recv, all)?;
        }
        AllReduce { group, bufs } => {
            let g = &ctx.groups[group.0 as usize];
            let mut flat = Vec::new();
            for b in bufs {
                flat.extend_from_slice(st.f32(*b)?);
            }
            outcome.bytes = Some((flat.len() * 4) as u64);
            let sum = ctx.fabric.collective(group.0, &g.ranks, ctx.rank, ctx.op_name, vec![flat], |deps, _| {
                let mut s = deps[0][0].clone();
                for d in &deps[1..] {
                    for (a, b) in s.iter_mut().zip(&d[0]) {
                        *a += b;
                    }
                }
                s
            })?;
            let mut off = 0;
            for b in bufs {
                let n = st.f32(*b)?.len();
                st.put_f32(*b, sum[off..off + n].to_vec())?;
                off += n;
            }
        }
        AllToAllV { group, send, send_counts, recv, row_len } => {
            let g = &ctx.groups[group.0 as usize];
            let sv = st.f32(*send)?;
            let mut parts = Vec::new();
            let mut off = 0usize;
            for &c in st.i32(*send_counts)? {
                let n = c as usize * row_len;
                parts.push(sv[off..off + n].to_vec());
                off += n;
            }
            outcome.bytes = Some((off * 4) as u64);
            let got = ctx.fabric.collective(group.0, &g.ranks, ctx.rank, ctx.op_name, parts, |deps, my| {
                deps.iter().flat_map(|d| d[my].iter().copied()).collect::<Vec<f32>>()
            })?;
            st.put_f32(*recv, got)?;
        }
        ReduceScatter { group, send, recv } => {
            let g = &ctx.groups[group.0 as usize];
            let sv = st.f32(*send)?;
            let n = g.ranks.len();
            let part = sv.len() / n;
            let parts: Vec<Vec<f32>> = sv.chunks_exact(part.max(1)).take(n).map(<[f32]>::to_vec).collect();
            outcome.bytes = Some((sv.len() * 4) as u64);
            let mine = ctx.fabric.collective(group.0, &g.ranks, ctx.rank, ctx.op_name, parts, |deps, my| {
                let mut s = deps[0][my].clone();
                for d in &deps[1..] {
                    for (a, b) in s.iter_mut().zip(&d[my]) {
                        *a += b;
                    }
                }
                s
            })?;
            st.put_f32(*recv, mine)?;
        }
        AllToAllV2d { intra, inter, send, send_counts, recv, row_len, gpus_per_node, .. } => {
            let got = all_to_all_2d(st.f32(*send)?, st.i32(*send_counts)?, ctx, *intra, *inter, *row_len, *gpus_per_node, &mut outcome)?;
            st.put_f32(*recv, got)?;
        }
        Adam { params, lr, beta1, beta2, eps } => {
            let t = ctx.adam_step as i32;
            let (c1, c2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
            for (p, g, m, v) in params {
                let mut pv = st.take_f32(*p)?;
                let mut mv = st.take_f32(*m)?;
                let mut vv = st.take_f32(*v)?;
                let gv = st.f32(*g)?;
                for i in 0..pv.len() {
                    mv[i] = beta1 * mv[i] + (1.0 - beta1) * gv[i];
                    vv[i] = beta2 * vv[i] + (1.0 - beta2) * gv[i] * gv[i];
                    pv[i] -= lr * (mv[i] / c1) / ((vv[i] / c2).sqrt() + eps);
                }
                st.put_f32(*p, pv)?;
                st.put_f32(*m, mv)?;
                st.put_f32(*v, vv)?;
            }
        }
        ChunkSlice { src, slots, gathered, part, part_counts, reserve, dims, chunk } => {
            let tb = table(dims, st.f32(*gathered)?);
            let m = dims.d_model;
            let (rows, counts, total) = chunk_send_rows(dims, &tb, *chunk);
            let source: Vec<usize> = match slots {
                Some(sl) => {
                    // Dispatch-layout row -> token, from the slots of every kept assignment.
                    let mut token = vec![0usize; total];
                    for (a, &s) in st.i32(*sl)?.iter().enumerate() {
                        if s >= 0 {
                            token[s as usize] = a / dims.top_k;
                        }
                    }
                    rows.iter().map(|&r| token[r]).collect()
                }
                None => rows,
            };
            let sv = st.f32(*src)?;
            let mut p = Vec::with_capacity(source.len() * m);
            for r in source {
                p.extend_from_slice(&sv[r * m..(r + 1) * m]);
            }
            st.put_f32(*part, p)?;
            st.put_i32(*part_counts, counts)?;
            if let Some(r) = reserve {
                // Static buffers are held at their planned size from here on.
                st.put_f32(*r, Vec::new())?;
            }
        }
        ShardDispatch { src, gathered, send, send_counts, dims, s, r } => {
            let tb = table(dims, st.f32(*gathered)?);
            let m = dims.d_model;
            let sv = st.f32(*src)?;
            let (blocks, _) = expert_blocks(dims, &tb);
            let g = s / r;
            let mut out = Vec::new();
            let mut counts = vec![0i32; dims.n_experts * s];
            for (p, c) in counts.iter_mut().enumerate() {
                let (off, len) = blocks[p / s];
                let rows = routing::chunk_range(len, p % g, g);
                *c = rows.len() as i32;
                out.extend_from_slice(&sv[(off + rows.start) * m..(off + rows.end) * m]);
            }
            st.put_f32(*send, out)?;
            st.put_i32(*send_counts, counts)?;
        }
        ShardCounts { gathered, counts, dims, peers, expert, chunk } => {
            let tb = table(dims, st.f32(*gathered)?);
            let c = peers.iter().map(|&d| routing::chunk_range(tb.kept_rank_expert(d, *expert), chunk.0, chunk.1).len() as i32).collect();
            st.put_i32(*counts, c)?;
        }
        ShardCombine { recv, gathered, full, dims, s, r } => {
            let tb = table(dims, st.f32(*gathered)?);
            let m = dims.d_model;
            let rv = st.f32(*recv)?;
            let (blocks, total) = expert_blocks(dims, &tb);
            let g = s / r;
            let mut f = vec![0.0f32; total * m];
            let mut at = 0usize;
            for p in 0..dims.n_experts * s {
                let (off, len) = blocks[p / s];
                for row in routing::chunk_range(len, p % g, g) {
                    let dst = &mut f[(off + row) * m..(off + row + 1) * m];
                    for (d, x) in dst.iter_mut().zip(&rv[at * m..(at + 1) * m]) {
                        *d += x;
                    }
                    at += 1;
                }
            }
            if at * m != rv.len() {
                return Err(StoreError(format!("received {} rows, the routing table accounts for {at}", rv.len() / m.max(1))).into());
            }
            st.put_f32(*full, f)?;
        }
        SwapAxes { src, dst, shape: (n, a, b, c) } => {
            let sv = st.f32(*src)?;
            let blk = a * b * c;
            let mut out = vec![0.0f32; n * blk];
            for x in 0..*n {
                let (s, o) = (&sv[x * blk..(x + 1) * blk], &mut out[x * blk..(x + 1) * blk]);
                for i in 0..*a {
                    for j in 0..*b {
                        o[(j * a + i) * c..(j * a + i + 1) * c].copy_from_slice(&s[(i * b + j) * c..(i * b + j + 1) * c]);
                    }
                }
            }
            st.put_f32(*dst, out)?;
        }
        TakeBlock { src, dst, shape: (n, a, c), index } => {
            let sv = st.f32(*src)?;
            let out = (0..*n).flat_map(|x| sv[(x * a + index) * c..(x * a + index + 1) * c].iter().copied()).collect();
            st.put_f32(*dst, out)?;
        }
        ChunkMerge { part, gathered, full, dims, chunk, first, .. } => {
            let tb = table(dims, st.f32(*gathered)?);
            let m = dims.d_model;
            let (rows, _, total) = chunk_send_rows(dims, &tb, *chunk);
            let mut f = if *first { vec![0.0; total * m] } else { st.take_f32(*full)? };
            let pv = st.f32(*part)?;
            for (i, r) in rows.iter().enumerate() {
                f[r * m..(r + 1) * m].copy_from_slice(&pv[i * m..(i + 1) * m]);
            }
            st.put_f32(*full, f)?;
        }
        ChunkLayout { recv, gathered, out, dims, chunk, .. } => {
            let tb = table(dims, st.f32(*gathered)?);
            let rows = chunk_rows_per_expert(dims, &tb, *chunk);
            let o = layout_rows(dims, st.f32(*recv)?, rows, |peer, ex| chunk_rows(&tb, peer, ex, *chunk).len());
            st.put_f32(*out, o)?;
        }
        ChunkUnlayout { input, gathered, send, send_counts, reserve, dims, chunk } => {
            let tb = table(dims, st.f32(*gathered)?);
            let rows = chunk_rows_per_expert(dims, &tb, *chunk);
            let (sv, counts) = unlayout_rows(dims, st.f32(*input)?, rows, |peer, ex| chunk_rows(&tb, peer, ex, *chunk).len());
            st.put_f32(*send, sv)?;
            st.put_i32(*send_counts, counts)?;
            if let Some(r) = reserve {
                st.put_f32(*r, Vec::new())?;
            }
        }
        ExpertLinearBwdAcc { x, w, dy, dx, dw, dbias, n_local, d_in, d_out, accumulate } => {
            let (dxv, mut dwv, mut dbv) = linalg::grouped_linear_bwd(st.f32(*x)?, st.f32(*w)?, st.f32(*dy)?, *n_local, *d_in, *d_out);
            if *accumulate {
                for (id, v) in [(*dw, &mut dwv), (*dbias, &mut dbv)] {
                    for (a, b) in v.iter_mut().zip(st.take_f32(id)?) {
                        *a += b;
                    }
                }
            }
            st.put_f32(*dx, dxv)?;
            st.put_f32(*dw, dwv)?;
            st.put_f32(*dbias, dbv)?;
        }
        TpLayout { recv, gathered, out, dims, tp } => {
            let tb = table(dims, st.f32(*gathered)?);
            let rows = rows_per_expert(dims, &tb);
            let (m, el) = (dims.d_model, dims.local_experts());
            let rv = st.f32(*recv)?;
            let mut o = vec![0.0; el * rows * m];
            let mut src_row = 0usize;
            for j in 0..*tp {
                // Start of each (peer, expert) block within the expert's rows.
                let mut start = vec![0usize; el];
                for &peer in &dims.ep_peers {
                    for (i, s0) in start.iter_mut().enumerate() {
                        let len = tb.kept_rank_expert(peer, dims.ep_index * el + i);
                        let r = routing::chunk_range(len, j, *tp);
                        let dst = (i * rows + *s0 + r.start) * m;
                        o[dst..dst + r.len() * m].copy_from_slice(&rv[src_row * m..(src_row + r.len()) * m]);
                        src_row += r.len();
                        *s0 += len;
                    }
                }
            }
            st.put_f32(*out, o)?;
        }
        TpUnlayout { input, gathered, send, send_counts, dims, chunk } => {
            let tb = table(dims, st.f32(*gathered)?);
            let rows = rows_per_expert(dims, &tb);
            let (m, el) = (dims.d_model, dims.local_experts());
            let iv = st.f32(*input)?;
            let mut s = Vec::new();
            let mut counts = vec![0i32; dims.ep_peers.len()];
            let mut start = vec![0usize; el];
            for (p, &peer) in dims.ep_peers.iter().enumerate() {
                for (i, s0) in start.iter_mut().enumerate() {
                    let len = tb.kept_rank_expert(peer, dims.ep_index * el + i);
                    let r = routing::chunk_range(len, chunk.0, chunk.1);
                    let src = (i * rows + *s0 + r.start) * m;
                    s.extend_from_slice(&iv[src..src + r.len() * m]);
                    counts[p] += r.len() as i32;
                    *s0 += len;
                }
            }
            st.put_f32(*send, s)?;
            st.put_i32(*send_counts, counts)?;
        }
        TpMerge { parts, gathered, full, dims, tp } => {
            let tb = table(dims, st.f32(*gathered)?);
            let m = dims.d_model;
            let pv = st.f32(*parts)?;
            let mut f = Vec::new();
            let mut at = 0usize;
            for j in 0..*tp {
                let (rows, _, total) = chunk_send_rows(dims, &tb, (j, *tp));
                if f.is_empty() {
                    f = vec![0.0; total * m];
                }
                for r in rows {
                    f[r * m..(r + 1) * m].copy_from_slice(&pv[at * m..(at + 1) * m]);
                    at += 1;
                }
            }
            st.put_f32(*full, f)?;
        }
        ExpertLinearPart { x, w, bias, y, n_local, d_in, d_out } => {
            let bv = match bias {
                Some(b) => Some(st.f32(*b)?),
                None => None,
            };
            let mut yv = linalg::grouped_linear(st.f32(*x)?, st.f32(*w)?, *n_local, *d_in, *d_out);
            if let Some(b) = bv {
                // bf16: the GEMM stores its product, then the bias is added to it.
                ctx.round_as_stored(*y, &mut yv);
                linalg::add_grouped_bias(&mut yv, b, *n_local, *d_out);
            }
            st.put_f32(*y, yv)?;
        }
        ExpertLinearPartBwd { x, w, dy, dx, dw, dbias, n_local, d_in, d_out } => {
            let (dxv, dwv, dbv) = linalg::grouped_linear_bwd(st.f32(*x)?, st.f32(*w)?, st.f32(*dy)?, *n_local, *d_in, *d_out);
            st.put_f32(*dx, dxv)?;
            st.put_f32(*dw, dwv)?;
            if let Some(db) = dbias {
                st.put_f32(*db, dbv)?;
            }
        }
        LossReplica { y, target, loss, dy, n_global, d_model } => {
            let (yv, tv) = (st.f32(*y)?, st.f32(*target)?);
            let denom = (*n_global * *d_model) as f64;
            let sq: f64 = yv.iter().zip(tv).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            if let Some(d) = dy {
                let g: Vec<f32> = yv.iter().zip(tv).map(|(a, b)| ((a - b) as f64 / denom) as f32).collect();
                st.put_f32(*d, g)?;
            }
            // A replica: no observation, so the step's loss counts the reporting rank only.
            st.put_f32(*loss, vec![(sq / (2.0 * denom)) as f32])?;
        }
        LocalLayout { send, gathered, out, dims } => {
            let tb = table(dims, st.f32(*gathered)?);
            let (m, el) = (dims.d_model, dims.local_experts());
            let (offsets, rows) = local_rows(dims, &tb);
            let sv = st.f32(*send)?;
            let mut o = vec![0.0; el * rows * m];
            for (i, (off, len)) in offsets.into_iter().enumerate() {
                o[i * rows * m..(i * rows + len) * m].copy_from_slice(&sv[off * m..(off + len) * m]);
            }
            st.put_f32(*out, o)?;
        }
        LocalUnlayout { input, gathered, full, dims } => {
            let tb = table(dims, st.f32(*gathered)?);
            let m = dims.d_model;
            let (offsets, rows) = local_rows(dims, &tb);
            let total: usize = (0..dims.n_experts).map(|e| tb.kept_rank_expert(dims.data_rank, e)).sum();
            let iv = st.f32(*input)?;
            let mut f = vec![0.0; total * m];
            for (i, (off, len)) in offsets.into_iter().enumerate() {
                f[off * m..(off + len) * m].copy_from_slice(&iv[i * rows * m..(i * rows + len) * m]);
            }
            st.put_f32(*full, f)?;
        }
        CombinePart { back, slots, weights, residual, out, dims } => {
            let (k, m) = (dims.top_k, dims.d_model);
            let mut o = match residual {
                Some(r) => st.f32(*r)?.to_vec(),
                None => vec![0.0; dims.tokens * m],
            };
            let (bv, wv) = (st.f32(*back)?, st.f32(*weights)?);
            for (a, &s) in st.i32(*slots)?.iter().enumerate() {
                if s >= 0 {
                    let (s, w) = (s as usize, wv[a]);
                    for (ov, v) in o[(a / k) * m..(a / k + 1) * m].iter_mut().zip(&bv[s * m..(s + 1) * m]) {
                        *ov += w * v;
                    }
                }
            }
            st.put_f32(*out, o)?;
        }
        SendRecv { group, send, recv } => {
            let g = &ctx.groups[group.0 as usize];
            let mine = match send {
                Some(b) => st.f32(*b)?.to_vec(),
                None => Vec::new(),
            };
            outcome.bytes = Some((mine.len() * 4) as u64);
            let theirs = ctx.fabric.collective(group.0, &g.ranks, ctx.rank, ctx.op_name, vec![mine], |deps, my| {
                deps.iter().enumerate().filter(|(i, _)| *i != my).flat_map(|(_, d)| d[0].iter().copied()).collect::<Vec<f32>>()
            })?;
            // The store checks the received length against the planned buffer.
            if let Some(r) = recv {
                st.put_f32(*r, theirs)?;
            }
        }
        GradAccum { pairs } => {
            for (src, dst) in pairs {
                let mut d = st.f32(*dst)?.to_vec();
                for (a, b) in d.iter_mut().zip(st.f32(*src)?) {
                    *a += b;
                }
                st.put_f32(*dst, d)?;
            }
        }
    }
    Ok(outcome)
}

/// Rows of chunk `chunk` in the block source rank `src` sends to expert `e`.
fn chunk_rows(t: &routing::RoutingTable, src: usize, e: usize, chunk: (usize, usize)) -> std::ops::Range<usize> {
    routing::chunk_range(t.kept_rank_expert(src, e), chunk.0, chunk.1)
}

/// Rows per local expert in a chunk's expert buffers: planned, or the chunk's largest local load.
fn chunk_rows_per_expert(dims: &MoeDims, t: &routing::RoutingTable, chunk: (usize, usize)) -> usize {
    dims.rows_per_expert.unwrap_or_else(|| {
        let el = dims.local_experts();
        (0..el)
            .map(|i| dims.ep_peers.iter().map(|&s| chunk_rows(t, s, dims.ep_index * el + i, chunk).len()).sum::<usize>())
            .max()
            .unwrap_or(0)
    })
}

/// This rank's dispatch-layout rows that belong to a chunk (expert-major), the chunk's rows
/// per expert-parallel peer, and the layout's total rows.
/// (offset, kept rows) of every expert's block in this data rank's dispatch layout, and the
/// layout's total rows.
fn expert_blocks(dims: &MoeDims, t: &routing::RoutingTable) -> (Vec<(usize, usize)>, usize) {
    let mut offset = 0usize;
    let blocks = (0..dims.n_experts)
        .map(|e| {
            let len = t.kept_rank_expert(dims.data_rank, e);
            offset += len;
            (offset - len, len)
        })
        .collect();
    (blocks, offset)
}

fn chunk_send_rows(dims: &MoeDims, t: &routing::RoutingTable, chunk: (usize, usize)) -> (Vec<usize>, Vec<i32>, usize) {
    let el = dims.local_experts();
    let mut rows = Vec::new();
    let mut counts = vec![0i32; dims.ep_peers.len()];
    let mut offset = 0usize;
    for e in 0..dims.n_experts {
        let len = t.kept_rank_expert(dims.data_rank, e);
        let r = routing::chunk_range(len, chunk.0, chunk.1);
        counts[e / el] += r.len() as i32;
        rows.extend(r.map(|i| offset + i));
        offset += len;
    }
    (rows, counts, offset)
}

/// Tutel's 2D hierarchical all-to-all over `nodes x gpn` expert-parallel members. Phase 1
/// (within the node): local peer g gets, for every node n in order, `[count, rows...]` of the
/// rows destined for member `n * gpn + g` (the stride copy). Phase 2 (same local index, across
/// nodes): node n gets, for every local source s in order, what s sent for member `(n, me)`.
/// The result is ordered by (source node, source local index), i.e. member-major as the flat
/// all-to-all delivers it. Counts travel as f32 headers (exact below 2^24 rows).
#[allow(clippy::too_many_arguments)]
fn all_to_all_2d(sv: &[f32], counts: &[i32], ctx: &OpCtx, intra: crate::plan::GroupId, inter: crate::plan::GroupId, row_len: usize,
    gpn: usize, outcome: &mut OpOutcome) -> Result<Vec<f32>, BackendError> {
    let nodes = counts.len() / gpn;
    let mut offsets = Vec::with_capacity(counts.len());
    let mut off = 0usize;
    for &c in counts {
        offsets.push(off);
        off += c as usize * row_len;
    }
    // Phase 0: stride copy, grouping the rows by destination local index.
    let parts: Vec<Vec<f32>> = (0..gpn)
        .map(|g| {
            let mut p = Vec::new();
            for n in 0..nodes {
                let dst = n * gpn + g;
                let len = counts[dst] as usize * row_len;
                p.push(counts[dst] as f32);
                p.extend_from_slice(&sv[offsets[dst]..offsets[dst] + len]);
            }
            p
        })
        .collect();
    let mut sent = off as u64 * 4;
    // Phase 1: all-to-all within the node; from each local source s: per node n, its block.
    let gi = &ctx.groups[intra.0 as usize];
    let from_locals: Vec<Vec<f32>> = ctx.fabric.collective(intra.0, &gi.ranks, ctx.rank, ctx.op_name, parts, |deps, my| {
        deps.iter().map(|d| d[my].clone()).collect::<Vec<Vec<f32>>>()
    })?;
    // Phase 2: stride copy by destination node, then all-to-all across nodes.
    let mut blocks: Vec<Vec<f32>> = vec![Vec::new(); nodes];
    for src in &from_locals {
        let mut at = 0usize;
        for blk in blocks.iter_mut() {
            let len = src[at] as usize * row_len;
            blk.extend_from_slice(&src[at..at + 1 + len]);
            at += 1 + len;
        }
    }
    sent += blocks.iter().map(|b| b.len() as u64 * 4).sum::<u64>();
    let ge = &ctx.groups[inter.0 as usize];
    let from_nodes: Vec<Vec<f32>> = ctx.fabric.collective(inter.0, &ge.ranks, ctx.rank, ctx.op_name, blocks, |deps, my| {
        deps.iter().map(|d| d[my].clone()).collect::<Vec<Vec<f32>>>()
    })?;
    let mut out = Vec::new();
    for src in &from_nodes {
        let mut at = 0usize;
        while at < src.len() {
            let len = src[at] as usize * row_len;
            out.extend_from_slice(&src[at + 1..at + 1 + len]);
            at += 1 + len;
        }
    }
    outcome.bytes = Some(sent);
    Ok(out)
}

/// For the local experts of `dims` (index slicing over the data rank's own dispatch layout):
/// each one's (first row, rows) in the layout, and rows per expert in the expert buffer.
fn local_rows(dims: &MoeDims, t: &routing::RoutingTable) -> (Vec<(usize, usize)>, usize) {
    let el = dims.local_experts();
    let first = dims.ep_index * el;
    let mut off = 0usize;
    let mut out = Vec::with_capacity(el);
    for e in 0..dims.n_experts {
        let len = t.kept_rank_expert(dims.data_rank, e);
        if (first..first + el).contains(&e) {
            out.push((off, len));
        }
        off += len;
    }
    let rows = dims.rows_per_expert.unwrap_or_else(|| out.iter().map(|x| x.1).max().unwrap_or(0));
    (out, rows)
}
