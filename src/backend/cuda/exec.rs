//! Execution of one [`OpKind`] on one GPU stream. Dense math (GEMMs through cuBLAS, norms,
//! activations, attention, routing, combine, loss, Adam) runs as device kernels; collectives
//! go through NCCL ([`super::comm`]). Ops whose work is index bookkeeping over small routing
//! tables (batch loading, dispatch and the expert layouts) run on the host through the cpu
//! backend's own implementation on downloaded inputs, so both backends share one definition
//! of every layout; they are marked `host` in the op report.

mod a2a_2d;
mod attention;

use super::comm::Comms;
use super::gpu::{Gpu, GpuStream, BLOCK};
use super::store::{DevBuf, DevStore};
use crate::backend::cpu::exec::{self as cpu_exec, OpCtx, OpOutcome, RouteObs};
use crate::backend::cpu::fabric::Fabric;
use crate::backend::cpu::store::{Data, OpView};
use crate::math::{rng, routing};
use crate::plan::{BufId, ElemType, Group, Op, OpKind, RankPlan};
use crate::spec::Activation;
use cudarc::driver::{result, LaunchConfig, PushKernelArg};
use moelab_kernels::error::GpuError;
use moelab_kernels::gemm::{sgemm_raw, Batch};
use moelab_kernels::{GemmDims, GemmForm};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// A kernel argument.
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    /// A device pointer (0 for null).
    P(u64),
    /// 64-bit integer.
    I64(i64),
    /// 32-bit integer.
    I32(i32),
    /// f32 scalar.
    F32(f32),
    /// f64 scalar.
    F64(f64),
}

/// Why an op failed on the GPU.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// A CUDA, cuBLAS or NCCL call failed.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// The plan broke its own contract (a missing input, a wrong size).
    #[error("{0}")]
    Plan(String),
    /// A collective failed.
    #[error(transparent)]
    Comm(#[from] super::comm::CommError),
    /// The host part of an op failed (cpu implementation).
    #[error("{0}")]
    Host(String),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Everything one stream thread needs to execute its ops.
pub struct StreamExec<'a> {
    /// The GPU.
    pub gpu: &'a Gpu,
    /// This plan stream's CUDA stream.
    pub s: &'a GpuStream,
    /// Index of the plan stream (bit in [`DevBuf::used_by`]).
    pub si: usize,
    /// The rank's buffers.
    pub store: &'a Mutex<DevStore>,
    /// Communicators of the rank's groups.
    pub comms: &'a Comms,
    /// The rank's plan.
    pub rp: &'a RankPlan,
    /// Groups of the plan.
    pub groups: &'a [Group],
    /// Seed, data step and Adam step, as the cpu backend gets them.
    pub seed: u64,
    /// Data step (selects the batch).
    pub step: u64,
    /// Optimizer step, 1-based.
    pub adam_step: u64,
    /// Unused by the host-side ops (they never communicate); required by their context.
    pub fabric: &'a Fabric,
}

/// A loss op's partial sums of squared errors on the device (f64 per block of the kernel).
#[derive(Debug, Clone, Copy)]
pub struct LossPending {
    /// Scratch allocation of `blocks` f64.
    pub partial: u64,
    /// Partial sums.
    pub blocks: usize,
    /// `n_global * d_model`.
    pub denom: f64,
    /// Counts toward the step's loss (the reporting rank's loss, not a replica's).
    pub observed: bool,
    /// The op's loss buffer, written with the value after the step.
    pub loss: BufId,
}

/// What one op produced besides its buffers.
#[derive(Debug, Default)]
pub struct GpuOutcome {
    /// Bytes actually sent (collectives).
    pub bytes: Option<u64>,
    /// Routing facts (host dispatch).
    pub obs: Option<RouteObs>,
    /// A loss whose value is read after the step (no sync inside it).
    pub loss: Option<LossPending>,
    /// Ran on the host through the cpu implementation.
    pub host: bool,
}

impl<'a> StreamExec<'a> {
    fn cu(&self) -> cudarc::driver::sys::CUstream {
        self.s.stream.cu_stream()
    }

    fn input(&self, id: BufId) -> Result<DevBuf, ExecError> {
        let mut st = lock(self.store);
        st.touch(id, self.si);
        st.get(id).ok_or_else(|| ExecError::Plan(format!("buffer {} read before it was written", st.desc(id).name)))
    }

    fn output(&self, id: BufId, len: usize) -> Result<DevBuf, ExecError> {
        Ok(lock(self.store).alloc(id, len, self.cu(), self.si, false)?)
    }

    fn launch(&self, name: &'static str, cfg: LaunchConfig, args: &[Arg]) -> Result<(), ExecError> {
        let f = self.gpu.func(name);
        let mut b = self.s.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::P(x) => b.arg(x),
                Arg::I64(x) => b.arg(x),
                Arg::I32(x) => b.arg(x),
                Arg::F32(x) => b.arg(x),
                Arg::F64(x) => b.arg(x),
            };
        }
        // SAFETY: `args` match the kernel's parameter list in plan_ops.cu (each call site
        // passes them in order); pointers are live buffers of the sizes the kernel addresses.
        unsafe { b.launch(cfg) }.map_err(|source| GpuError::Launch { kernel: name, source })?;
        Ok(())
    }

    fn grid(&self, n: usize) -> LaunchConfig {
        self.gpu.grid(n)
    }

    /// One warp per row.
    fn warp_grid(&self, rows: usize) -> LaunchConfig {
        self.gpu.grid(rows * 32)
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm(&self, form: GemmForm, a: u64, b: u64, c: u64, m: usize, k: usize, n: usize, beta: f32, batch: Option<Batch>) -> Result<(), ExecError> {
        // SAFETY: the handle is bound to this stream; the call sites size a, b, c for the form.
        unsafe { sgemm_raw(self.s.blas, form, a, b, c, GemmDims { m, k, n }, beta, batch) }?;
        Ok(())
    }

    fn copy(&self, dst: u64, src: u64, elems: usize) -> Result<(), ExecError> {
        if elems > 0 {
            // SAFETY: both buffers hold at least `elems` 4-byte elements on this device.
            unsafe { result::memcpy_dtod_async(dst, src, elems * 4, self.cu()) }.map_err(GpuError::driver("cuMemcpyDtoDAsync"))?;
        }
        Ok(())
    }

    /// Rows per chunk and chunk count for a two-stage column reduction of `rows x cols`:
    /// enough (chunk, column) threads to fill the device, at least 16 rows per chunk.
    fn row_chunks(&self, rows: usize, cols: usize) -> (usize, usize) {
        let want = (self.gpu.info.sm_count.max(1) as usize * 2048).div_ceil(cols.max(1));
        let chunks = want.clamp(1, rows.div_ceil(16).max(1));
        let chunk = rows.div_ceil(chunks).max(1);
        (chunk, rows.div_ceil(chunk).max(1))
    }

    /// `out[g, c] (+)= sum_r x[g * rows + r, c]` for `groups` groups, deterministic.
    fn col_sums(&self, x: u64, out: u64, rows: usize, cols: usize, groups: usize, accumulate: bool) -> Result<(), ExecError> {
        if groups * cols == 0 {
            return Ok(());
        }
        let (chunk, chunks) = self.row_chunks(rows, cols * groups);
        let part = self.scratch(groups * chunks * cols * 4)?;
        self.launch("col_partials", self.grid(groups * chunks * cols), &[Arg::P(x), Arg::P(part), Arg::I64(rows as i64), Arg::I32(cols as i32), Arg::I32(groups as i32), Arg::I64(chunk as i64)])?;
        self.launch("col_finish", self.grid(groups * cols), &[Arg::P(part), Arg::P(out), Arg::I64(chunks as i64), Arg::I32(cols as i32), Arg::I32(groups as i32), Arg::I32(accumulate as i32)])?;
        self.scratch_free(part)
    }

    fn sync(&self) -> Result<(), ExecError> {
        self.s.stream.synchronize().map_err(GpuError::driver("cuStreamSynchronize"))?;
        Ok(())
    }

    /// Copies a live buffer to the host (waits for this stream).
    pub fn download(&self, id: BufId) -> Result<Data, ExecError> {
        let b = self.input(id)?;
        let elem = lock(self.store).desc(id).elem;
        let data = match elem {
            ElemType::F32 => {
                let mut v = vec![0.0f32; b.len];
                // SAFETY: the buffer holds b.len f32 values; the copy completes before sync returns.
                unsafe { result::memcpy_dtoh_async(&mut v, b.ptr, self.cu()) }.map_err(GpuError::driver("cuMemcpyDtoHAsync"))?;
                self.sync()?;
                Data::F32(v)
            }
            ElemType::I32 => {
                let mut v = vec![0i32; b.len];
                // SAFETY: as above, for i32.
                unsafe { result::memcpy_dtoh_async(&mut v, b.ptr, self.cu()) }.map_err(GpuError::driver("cuMemcpyDtoHAsync"))?;
                self.sync()?;
                Data::I32(v)
            }
        };
        Ok(data)
    }

    fn download_f32(&self, id: BufId) -> Result<Vec<f32>, ExecError> {
        match self.download(id)? {
            Data::F32(v) => Ok(v),
            Data::I32(_) => Err(ExecError::Plan(format!("buffer {} is not f32", lock(self.store).desc(id).name))),
        }
    }

    fn download_i32(&self, id: BufId) -> Result<Vec<i32>, ExecError> {
        match self.download(id)? {
            Data::I32(v) => Ok(v),
            Data::F32(_) => Err(ExecError::Plan(format!("buffer {} is not i32", lock(self.store).desc(id).name))),
        }
    }

    /// Writes host values into a buffer (allocated at the planned size for static buffers).
    pub fn upload(&self, id: BufId, data: &Data) -> Result<(), ExecError> {
        let b = self.output(id, data.len())?;
        // SAFETY: the buffer holds at least data.len() elements; pageable host memory is
        // staged before the call returns, and the caller syncs before freeing anything.
        unsafe {
            match data {
                Data::F32(v) => result::memcpy_htod_async(b.ptr, v, self.cu()),
                Data::I32(v) => result::memcpy_htod_async(b.ptr, v, self.cu()),
            }
        }
        .map_err(GpuError::driver("cuMemcpyHtoDAsync"))?;
        Ok(())
    }

    /// A scratch allocation outside the plan's ledger (a few bytes: routing gradients,
    /// loss partials, count exchanges); freed by [`StreamExec::scratch_free`].
    pub fn scratch(&self, bytes: usize) -> Result<u64, ExecError> {
        // SAFETY: the stream is live; the memory is written before it is read.
        Ok(unsafe { result::malloc_async(self.cu(), bytes.max(8)) }.map_err(GpuError::driver("cuMemAllocAsync"))?)
    }

    /// Releases scratch memory (stream-ordered).
    pub fn scratch_free(&self, ptr: u64) -> Result<(), ExecError> {
        // SAFETY: allocated by scratch() on this stream, freed once.
        unsafe { result::free_async(ptr, self.cu()) }.map_err(GpuError::driver("cuMemFreeAsync"))?;
        Ok(())
    }

    /// A row-moving op (dispatch and the expert layouts). Its cpu implementation runs on the
    /// host at unit row width, on row numbers instead of rows (row i of the first source reads
    /// `i + 1`, of the second `-(i + 1)`) and on the real routing inputs; its outputs are then
    /// the row map of every output, which one device gather applies at the real width. Counts
    /// and slots are uploaded as computed. One definition of every layout serves both backends.
    fn layout(&self, op: &Op) -> Result<GpuOutcome, ExecError> {
        let mut unit = op.kind.clone();
        let (sources, needs, m) = {
            let Some((sources, needs, dims)) = layout_parts(&mut unit) else {
                return Err(ExecError::Plan(format!("{} is not a layout op", op.name)));
            };
            let m = dims.d_model;
            dims.d_model = 1;
            (sources, needs, m)
        };
        let mut inputs = Vec::new();
        let mut names = HashMap::new();
        for &id in op.reads.iter().chain(&op.writes) {
            names.insert(id, lock(self.store).desc(id).name.clone());
        }
        let mut src_bufs: Vec<Option<DevBuf>> = Vec::new();
        for (i, src) in sources.iter().enumerate() {
            let live = src.and_then(|id| lock(self.store).get(id));
            if let (Some(id), Some(b)) = (src, live) {
                let rows = b.len / m.max(1);
                let sign = if i == 0 { 1.0 } else { -1.0 };
                inputs.push((*id, Data::F32((0..rows).map(|r| sign * (r + 1) as f32).collect())));
                self.input(*id)?;
            }
            src_bufs.push(live);
        }
        for &id in &needs {
            if lock(self.store).get(id).is_some() {
                inputs.push((id, self.download(id)?));
            }
        }
        // Everything else the op lists it only holds until here (released after it).
        for &id in &op.reads {
            if !needs.contains(&id) && !sources.contains(&Some(id)) {
                self.input(id).ok();
            }
        }
        let mut view = OpView::detached(inputs, &op.writes, names);
        let ctx = OpCtx {
            rank: self.rp.rank, seed: self.seed, step: self.step, adam_step: self.adam_step, fabric: self.fabric, groups: self.groups,
            op_name: &op.name,
        };
        let out: OpOutcome = cpu_exec::execute(&unit, &mut view, &ctx).map_err(|e| ExecError::Host(e.to_string()))?;
        for (id, data) in view.into_puts() {
            match data {
                Data::I32(_) => self.upload(id, &data)?,
                Data::F32(codes) => {
                    let rows = codes.len();
                    let in_place = sources.get(1).copied().flatten() == Some(id);
                    let ob = lock(self.store).alloc(id, rows * m, self.cu(), self.si, in_place)?;
                    if rows == 0 {
                        continue;
                    }
                    let map: Vec<i32> = codes.iter().map(|&c| c as i32).collect();
                    if in_place && map.iter().enumerate().any(|(r, &c)| c < 0 && (-c - 1) as usize != r) {
                        return Err(ExecError::Plan(format!("{}: an in-place layout moves rows", op.name)));
                    }
                    let scratch = self.scratch(rows * 4)?;
                    // SAFETY: scratch holds rows i32; host memory is staged before return.
                    unsafe { result::memcpy_htod_async(scratch, &map, self.cu()) }.map_err(GpuError::driver("cuMemcpyHtoDAsync"))?;
                    let a = src_bufs.first().copied().flatten().map_or(0, |b| b.ptr);
                    let b = src_bufs.get(1).copied().flatten().map_or(0, |b| b.ptr);
                    self.launch("gather2_rows", self.grid(rows * m), &[Arg::P(a), Arg::P(b), Arg::P(scratch), Arg::P(ob.ptr), Arg::I64(rows as i64), Arg::I32(m as i32)])?;
                    self.scratch_free(scratch)?;
                }
            }
        }
        Ok(GpuOutcome { bytes: out.bytes, obs: out.obs, loss: None, host: false })
    }

    /// Enqueue `op` on this stream.
    pub fn execute(&self, op: &Op) -> Result<GpuOutcome, ExecError> {
        use OpKind::*;
        let p = Arg::P;
        let mut outcome = GpuOutcome::default();
        match &op.kind {
            LoadBatch { x, target, shard, batch, seq, d_model } => {
                // The cpu's data stream, drawn on the device at random access (no host work).
                let per_seq = seq * d_model;
                let n = batch * per_seq;
                let (xb, tb) = (self.output(*x, n)?, self.output(*target, n)?);
                let k = rng::stream_key(self.seed, "data.x", self.step, 0).map(|w| Arg::I32(w as i32));
                let blocks = batch * per_seq.div_ceil(8);
                if n > 0 {
                    let args = [p(xb.ptr), Arg::I64(per_seq as i64), Arg::I32(*batch as i32), k[0], k[1], k[2], k[3], k[4], k[5], Arg::I64((shard * batch) as i64)];
                    self.launch("load_batch_x", self.grid(blocks), &args)?;
                    self.launch("rotate_rows_left", self.grid(n), &[p(xb.ptr), p(tb.ptr), Arg::I64((n / d_model) as i64), Arg::I32(*d_model as i32)])?;
                }
            }
            // Gradient accumulation over micro-batches: dst += src, in place.
            GradAccum { pairs } => {
                for (src, dst) in pairs {
                    let (sb, db) = (self.input(*src)?, self.input(*dst)?);
                    if db.len != sb.len {
                        return Err(ExecError::Plan(format!("{}: gradient of {} elements added into one of {}", op.name, sb.len, db.len)));
                    }
                    if sb.len > 0 {
                        self.launch("add_inplace", self.grid(sb.len), &[p(db.ptr), p(sb.ptr), Arg::I64(sb.len as i64)])?;
                    }
                }
            }
            // Pipeline exchanges: one NCCL group of send and recv with the peer.
            SendRecv { group, send, recv } => {
                let sb = match send {
                    Some(b) => Some(self.input(*b)?),
                    None => None,
                };
                let rb = match recv {
                    Some(r) => {
                        let n = lock(self.store).desc(*r).elems;
                        Some(self.output(*r, n)?)
                    }
                    None => None,
                };
                self.comms.send_recv(*group, sb.map(|b| (b.ptr, b.len)), rb.map(|b| (b.ptr, b.len)), &self.s.stream)?;
                outcome.bytes = Some((sb.map_or(0, |b| b.len) * 4) as u64);
            }
            // Tutel's sharded experts (expert-parallel world above E): spec validation refuses
            // them on this backend before any GPU work; this is the backstop.
            ShardDispatch { .. } | ShardCounts { .. } | ShardCombine { .. } | SwapAxes { .. } | TakeBlock { .. } => {
                return Err(ExecError::Plan(format!(
                    "{}: Tutel's sharded experts (tutel with layout.ep > n_experts) run on the cpu and sim backends only", op.name)))
            }
            Dispatch { .. } | ExpertLayout { .. } | ExpertUnlayout { .. } | ChunkSlice { .. } | ChunkMerge { .. } | ChunkLayout { .. }
            | ChunkUnlayout { .. } | TpLayout { .. } | TpUnlayout { .. } | TpMerge { .. } | LocalLayout { .. } | LocalUnlayout { .. } => {
                return self.layout(op)
            }
            LayerNorm { x, gamma, beta, y, stats } => {
                let (xb, g, b) = (self.input(*x)?, self.input(*gamma)?, self.input(*beta)?);
                let m = g.len;
                let rows = xb.len / m;
                let yb = self.output(*y, xb.len)?;
                let sb = self.output(*stats, 2 * rows)?;
                self.launch("ln_fwd", self.warp_grid(rows), &[p(xb.ptr), p(g.ptr), p(b.ptr), p(yb.ptr), p(sb.ptr), Arg::I64(rows as i64), Arg::I32(m as i32)])?;
            }
            LayerNormBwd { x, gamma, stats, dy, residual, dx, dgamma, dbeta } => {
                let (xb, g, sb, dyb) = (self.input(*x)?, self.input(*gamma)?, self.input(*stats)?, self.input(*dy)?);
                let m = g.len;
                let rows = xb.len / m;
                let res = match residual {
                    Some(r) => self.input(*r)?.ptr,
                    None => 0,
                };
                let dxb = self.output(*dx, xb.len)?;
                let dg = self.output(*dgamma, m)?;
                let db = self.output(*dbeta, m)?;
                self.launch("ln_bwd_dx", self.warp_grid(rows), &[p(xb.ptr), p(g.ptr), p(sb.ptr), p(dyb.ptr), p(res), p(dxb.ptr), Arg::I64(rows as i64), Arg::I32(m as i32)])?;
                let (chunk, chunks) = self.row_chunks(rows, m);
                let part = self.scratch(2 * chunks * m * 4)?;
                let part_b = part + (chunks * m * 4) as u64;
                self.launch("ln_bwd_partials", self.grid(chunks * m), &[p(xb.ptr), p(sb.ptr), p(dyb.ptr), p(part), p(part_b), Arg::I64(rows as i64), Arg::I32(m as i32), Arg::I64(chunk as i64)])?;
                for (src, dst) in [(part, dg.ptr), (part_b, db.ptr)] {
                    self.launch("col_finish", self.grid(m), &[p(src), p(dst), Arg::I64(chunks as i64), Arg::I32(m as i32), Arg::I32(1), Arg::I32(0)])?;
                }
                self.scratch_free(part)?;
            }
            Linear { x, w, bias, residual, y, rows, d_in, d_out } => {
                let (xb, wb) = (self.input(*x)?, self.input(*w)?);
                let rb = match residual {
                    Some(r) => Some(self.input(*r)?),
                    None => None,
                };
                let bb = match bias {
                    Some(b) => Some(self.input(*b)?),
                    None => None,
                };
                let yb = self.output(*y, rows * d_out)?;
                let beta = match rb {
                    Some(r) => {
                        self.copy(yb.ptr, r.ptr, rows * d_out)?;
                        1.0
                    }
                    None => 0.0,
                };
                self.gemm(GemmForm::Nn, xb.ptr, wb.ptr, yb.ptr, *rows, *d_in, *d_out, beta, None)?;
                if let Some(b) = bb {
                    self.launch("add_bias_rows", self.grid(rows * d_out), &[p(yb.ptr), p(b.ptr), Arg::I64(*rows as i64), Arg::I32(*d_out as i32), Arg::I64((*rows).max(1) as i64)])?;
                }
            }
            LinearBwd { x, w, dy, dx, dw, dbias, accumulate_dx, rows, d_in, d_out } => {
                let (xb, wb, dyb) = (self.input(*x)?, self.input(*w)?, self.input(*dy)?);
                let dwb = self.output(*dw, d_in * d_out)?;
                self.gemm(GemmForm::Tn, xb.ptr, dyb.ptr, dwb.ptr, *d_in, *rows, *d_out, 0.0, None)?;
                if let Some(db) = dbias {
                    let dbb = self.output(*db, *d_out)?;
                    self.col_sums(dyb.ptr, dbb.ptr, *rows, *d_out, 1, false)?;
                }
                if let Some(d) = dx {
                    let (dxb, beta) = if *accumulate_dx { (self.input(*d)?, 1.0) } else { (self.output(*d, rows * d_in)?, 0.0) };
                    self.gemm(GemmForm::Nt, dyb.ptr, wb.ptr, dxb.ptr, *rows, *d_out, *d_in, beta, None)?;
                }
            }
            Act { h, a, act } => {
                let hb = self.input(*h)?;
                let ab = self.output(*a, hb.len)?;
                self.launch("act_fwd", self.grid(hb.len), &[p(hb.ptr), p(ab.ptr), Arg::I64(hb.len as i64), Arg::I32(act_kind(*act))])?;
            }
            ActBwd { h, da, dh, act } => {
                let (hb, dab) = (self.input(*h)?, self.input(*da)?);
                let dhb = self.output(*dh, hb.len)?;
                self.launch("act_bwd", self.grid(hb.len), &[p(hb.ptr), p(dab.ptr), p(dhb.ptr), Arg::I64(hb.len as i64), Arg::I32(act_kind(*act))])?;
            }
            AttnCore { qkv, probs, ctx, dims } => {
                let qb = self.input(*qkv)?;
                let pb = self.output(*probs, dims.batch * dims.heads * dims.seq * dims.seq)?;
                let cb = self.output(*ctx, dims.batch * dims.seq * dims.d_model)?;
                self.attention_fwd(qb.ptr, pb.ptr, cb.ptr, dims)?;
            }
            AttnCoreBwd { qkv, probs, dctx, dqkv, dims } => {
                let (qb, pb, dcb) = (self.input(*qkv)?, self.input(*probs)?, self.input(*dctx)?);
                let db = self.output(*dqkv, qb.len)?;
                self.attention_bwd(qb.ptr, pb.ptr, dcb.ptr, db.ptr, dims)?;
            }
            Route { logits, probs, idx, weights, stats, n_experts, top_k, renormalize } => {
                let (e, k) = (*n_experts, *top_k);
                let lb = self.input(*logits)?;
                let t = lb.len / e;
                let pb = self.output(*probs, lb.len)?;
                let ib = self.output(*idx, t * k)?;
                let wb = self.output(*weights, t * k)?;
                self.launch("route_topk", self.grid(t), &[p(lb.ptr), p(pb.ptr), p(ib.ptr), p(wb.ptr), Arg::I64(t as i64), Arg::I32(e as i32), Arg::I32(k as i32), Arg::I32(*renormalize as i32)])?;
                // Counts and probability sums per expert: tiny, exact on the host.
                let (pv, iv) = (self.download_f32(*probs)?, self.download_i32(*idx)?);
                let mut sv = vec![0.0; (k + 1) * e];
                routing::local_stats(&pv, &iv, e, k, &mut sv);
                self.upload(*stats, &Data::F32(sv))?;
                self.sync()?;
            }
            RouteBwd { probs, idx, dweights, gathered, dlogits, dims, renormalize, aux_coef } => {
                let tb = cpu_exec::table(dims, &self.download_f32(*gathered)?);
                let ag = routing::aux_grad(&tb, *aux_coef);
                let (pb, ib, dwb) = (self.input(*probs)?, self.input(*idx)?, self.input(*dweights)?);
                let dl = self.output(*dlogits, dims.tokens * dims.n_experts)?;
                let scratch = self.scratch(ag.len() * 4)?;
                // SAFETY: scratch holds ag.len() f32; host memory is staged before return.
                unsafe { result::memcpy_htod_async(scratch, &ag, self.cu()) }.map_err(GpuError::driver("cuMemcpyHtoDAsync"))?;
                self.launch("route_bwd", self.grid(dims.tokens), &[p(pb.ptr), p(ib.ptr), p(dwb.ptr), p(scratch), p(dl.ptr), Arg::I64(dims.tokens as i64), Arg::I32(dims.n_experts as i32), Arg::I32(dims.top_k as i32), Arg::I32(*renormalize as i32)])?;
                self.scratch_free(scratch)?;
            }
            DispatchBwd { dsend, slots, dx, dims } => {
                let (ds, sl) = (self.input(*dsend)?, self.input(*slots)?);
                let dxb = self.output(*dx, dims.tokens * dims.d_model)?;
                self.launch("token_sum_rows", self.grid(dims.tokens * dims.d_model), &[p(ds.ptr), p(sl.ptr), p(dxb.ptr), Arg::I64(dims.tokens as i64), Arg::I32(dims.top_k as i32), Arg::I32(dims.d_model as i32)])?;
            }
            ExpertLinear { x, w, bias, y, n_local, d_in, d_out } => self.expert_fwd(*x, *w, Some(*bias), *y, *n_local, *d_in, *d_out)?,
            ExpertLinearPart { x, w, bias, y, n_local, d_in, d_out } => self.expert_fwd(*x, *w, *bias, *y, *n_local, *d_in, *d_out)?,
            ExpertLinearBwd { x, w, dy, dx, dw, dbias, n_local, d_in, d_out } => {
                self.expert_bwd(*x, *w, *dy, *dx, *dw, Some(*dbias), *n_local, *d_in, *d_out, false)?
            }
            ExpertLinearBwdAcc { x, w, dy, dx, dw, dbias, n_local, d_in, d_out, accumulate } => {
                self.expert_bwd(*x, *w, *dy, *dx, *dw, Some(*dbias), *n_local, *d_in, *d_out, *accumulate)?
            }
            ExpertLinearPartBwd { x, w, dy, dx, dw, dbias, n_local, d_in, d_out } => {
                self.expert_bwd(*x, *w, *dy, *dx, *dw, *dbias, *n_local, *d_in, *d_out, false)?
            }
            Combine { back, slots, weights, residual, out, dims } => self.combine(*back, *slots, *weights, Some(*residual), *out, dims.tokens, dims.top_k, dims.d_model)?,
            CombinePart { back, slots, weights, residual, out, dims } => self.combine(*back, *slots, *weights, *residual, *out, dims.tokens, dims.top_k, dims.d_model)?,
            CombineBwd { dout, back, slots, weights, dback, dweights, dims } => {
                let (k, m) = (dims.top_k, dims.d_model);
                let used = self.download_i32(*slots)?.iter().filter(|&&s| s >= 0).count();
                let (dob, bb, sb, wb) = (self.input(*dout)?, self.input(*back)?, self.input(*slots)?, self.input(*weights)?);
                let dbk = self.output(*dback, used * m)?;
                let dwt = self.output(*dweights, dims.tokens * k)?;
                let assigns = dims.tokens * k;
                self.launch("combine_bwd_rows", self.grid(assigns * m), &[p(dob.ptr), p(sb.ptr), p(wb.ptr), p(dbk.ptr), Arg::I64(assigns as i64), Arg::I32(k as i32), Arg::I32(m as i32)])?;
                self.launch("combine_bwd_weights", self.warp_grid(assigns), &[p(dob.ptr), p(bb.ptr), p(sb.ptr), p(dwt.ptr), Arg::I64(assigns as i64), Arg::I32(k as i32), Arg::I32(m as i32)])?;
            }
            Loss { y, target, loss, dy, n_global, d_model } | LossReplica { y, target, loss, dy, n_global, d_model } => {
                let (yb, tb) = (self.input(*y)?, self.input(*target)?);
                let denom = (*n_global * *d_model) as f64;
                let dyp = match dy {
                    Some(d) => self.output(*d, yb.len)?.ptr,
                    None => 0,
                };
                let cfg = self.grid(yb.len);
                let blocks = cfg.grid_dim.0 as usize;
                let partial = self.scratch(blocks * 8)?;
                self.launch("mse", cfg, &[p(yb.ptr), p(tb.ptr), p(dyp), p(partial), Arg::I64(yb.len as i64), Arg::F64(denom)])?;
                // The value lands after the step (no sync here); the buffer is written then.
                self.output(*loss, 1)?;
                let observed = matches!(op.kind, Loss { .. });
                outcome.loss = Some(LossPending { partial, blocks, denom, observed, loss: *loss });
            }
            Adam { params, lr, beta1, beta2, eps } => {
                let t = self.adam_step as i32;
                let (c1, c2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
                for (pp, g, m, v) in params {
                    let (pb, gb, mb, vb) = (self.input(*pp)?, self.input(*g)?, self.input(*m)?, self.input(*v)?);
                    self.launch("adam", self.grid(pb.len), &[p(pb.ptr), p(gb.ptr), p(mb.ptr), p(vb.ptr), Arg::I64(pb.len as i64), Arg::F32(*lr), Arg::F32(*beta1), Arg::F32(*beta2), Arg::F32(*eps), Arg::F32(c1), Arg::F32(c2)])?;
                }
            }
            AllGather { group, send, recv } => {
                let sb = self.input(*send)?;
                let n = self.groups[group.0 as usize].ranks.len();
                let rb = self.output(*recv, sb.len * n)?;
                outcome.bytes = Some((sb.len * 4) as u64);
                self.comms.all_gather(*group, sb.ptr, rb.ptr, sb.len, &self.s.stream)?;
            }
            AllReduce { group, bufs } => {
                let mut total = 0;
                for b in bufs {
                    let bb = self.input(*b)?;
                    self.comms.all_reduce(*group, bb.ptr, bb.len, &self.s.stream)?;
                    total += bb.len;
                }
                outcome.bytes = Some((total * 4) as u64);
            }
            ReduceScatter { group, send, recv } => {
                let sb = self.input(*send)?;
                let n = self.groups[group.0 as usize].ranks.len();
                let part = sb.len / n;
                let rb = self.output(*recv, part)?;
                outcome.bytes = Some((sb.len * 4) as u64);
                self.comms.reduce_scatter(*group, sb.ptr, rb.ptr, part, &self.s.stream)?;
            }
            AllToAllV { group, send, send_counts, recv, row_len } => {
                let counts = self.download_i32(*send_counts)?;
                let sb = self.input(*send)?;
                let matrix = self.comms.exchange_counts(*group, &counts, &self.s.stream)?;
                let me = self.comms.index_in(*group)?;
                let recv_rows: usize = matrix.iter().map(|row| row[me] as usize).sum();
                let rb = self.output(*recv, recv_rows * row_len)?;
                let sent: usize = counts.iter().map(|&c| c as usize).sum();
                outcome.bytes = Some((sent * row_len * 4) as u64);
                self.comms.all_to_all_v(*group, sb.ptr, rb.ptr, &matrix, *row_len, &self.s.stream)?;
            }
            AllToAllV2d { intra, inter, send, send_counts, recv, row_len, gpus_per_node } => {
                outcome.bytes = Some(self.all_to_all_2d(*intra, *inter, *send, *send_counts, *recv, *row_len, *gpus_per_node)?);
            }
        }
        Ok(outcome)
    }

    #[allow(clippy::too_many_arguments)]
    fn expert_fwd(&self, x: BufId, w: BufId, bias: Option<BufId>, y: BufId, n_local: usize, d_in: usize, d_out: usize) -> Result<(), ExecError> {
        let (xb, wb) = (self.input(x)?, self.input(w)?);
        let rows = xb.len / (n_local * d_in);
        let yb = self.output(y, n_local * rows * d_out)?;
        let batch = Batch { count: n_local, a_stride: rows * d_in, b_stride: d_in * d_out, c_stride: rows * d_out };
        self.gemm(GemmForm::Nn, xb.ptr, wb.ptr, yb.ptr, rows, d_in, d_out, 0.0, Some(batch))?;
        if let Some(b) = bias {
            let bb = self.input(b)?;
            let n = n_local * rows * d_out;
            if n > 0 {
                self.launch("add_bias_rows", self.grid(n), &[Arg::P(yb.ptr), Arg::P(bb.ptr), Arg::I64((n_local * rows) as i64), Arg::I32(d_out as i32), Arg::I64(rows.max(1) as i64)])?;
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn expert_bwd(&self, x: BufId, w: BufId, dy: BufId, dx: BufId, dw: BufId, dbias: Option<BufId>, n_local: usize, d_in: usize, d_out: usize, accumulate: bool) -> Result<(), ExecError> {
        let (xb, wb, dyb) = (self.input(x)?, self.input(w)?, self.input(dy)?);
        let rows = xb.len / (n_local * d_in);
        let dxb = self.output(dx, xb.len)?;
        let bx = Batch { count: n_local, a_stride: rows * d_out, b_stride: d_in * d_out, c_stride: rows * d_in };
        self.gemm(GemmForm::Nt, dyb.ptr, wb.ptr, dxb.ptr, rows, d_out, d_in, 0.0, Some(bx))?;
        let dwb = if accumulate { self.input(dw)? } else { self.output(dw, n_local * d_in * d_out)? };
        let bw = Batch { count: n_local, a_stride: rows * d_in, b_stride: rows * d_out, c_stride: d_in * d_out };
        self.gemm(GemmForm::Tn, xb.ptr, dyb.ptr, dwb.ptr, d_in, rows, d_out, if accumulate { 1.0 } else { 0.0 }, Some(bw))?;
        if let Some(db) = dbias {
            let dbb = if accumulate { self.input(db)? } else { self.output(db, n_local * d_out)? };
            self.col_sums(dyb.ptr, dbb.ptr, rows, d_out, n_local, accumulate)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn combine(&self, back: BufId, slots: BufId, weights: BufId, residual: Option<BufId>, out: BufId, tokens: usize, k: usize, m: usize) -> Result<(), ExecError> {
        let (bb, sb, wb) = (self.input(back)?, self.input(slots)?, self.input(weights)?);
        let res = match residual {
            Some(r) => self.input(r)?.ptr,
            None => 0,
        };
        let ob = self.output(out, tokens * m)?;
        self.launch("combine_fwd", self.grid(tokens * m), &[Arg::P(bb.ptr), Arg::P(sb.ptr), Arg::P(wb.ptr), Arg::P(res), Arg::P(ob.ptr), Arg::I64(tokens as i64), Arg::I32(k as i32), Arg::I32(m as i32)])
    }
}

/// The parts of a layout op that [`StreamExec::layout`] needs: its row sources (first, and
/// second where it merges into an existing buffer), the small routing inputs its host part
/// reads (never the large buffers a plan lists only to end their lifetime here), and its
/// dimensions.
#[allow(clippy::type_complexity)]
fn layout_parts(kind: &mut OpKind) -> Option<(Vec<Option<BufId>>, Vec<BufId>, &mut crate::plan::ops::MoeDims)> {
    use OpKind::*;
    Some(match kind {
        Dispatch { x, idx, gathered, dims, .. } => (vec![Some(*x)], vec![*idx, *gathered], dims),
        ExpertLayout { recv, gathered, dims, .. } | ChunkLayout { recv, gathered, dims, .. } | TpLayout { recv, gathered, dims, .. } => {
            (vec![Some(*recv)], vec![*gathered], dims)
        }
        ExpertUnlayout { input, gathered, dims, .. }
        | ChunkUnlayout { input, gathered, dims, .. }
        | TpUnlayout { input, gathered, dims, .. }
        | LocalUnlayout { input, gathered, dims, .. } => (vec![Some(*input)], vec![*gathered], dims),
        ChunkSlice { src, slots, gathered, dims, .. } => (vec![Some(*src)], slots.iter().copied().chain([*gathered]).collect(), dims),
        ChunkMerge { part, full, first, gathered, dims, .. } => (vec![Some(*part), if *first { None } else { Some(*full) }], vec![*gathered], dims),
        TpMerge { parts, gathered, dims, .. } => (vec![Some(*parts)], vec![*gathered], dims),
        LocalLayout { send, gathered, dims, .. } => (vec![Some(*send)], vec![*gathered], dims),
        _ => return None,
    })
}

fn act_kind(a: Activation) -> i32 {
    match a {
        Activation::Gelu => 0,
        Activation::Relu => 1,
    }
}


const _: () = assert!(BLOCK == 256, "mse's shared reduction assumes 256 threads");
