//! Execution of one [`OpKind`] on one GPU stream. Dense math (GEMMs through cuBLAS, norms,
//! activations, attention, routing, combine, loss, Adam) runs as device kernels; collectives
//! go through NCCL ([`super::comm`]). Routing statistics, dispatch slots and the expert
//! layouts run on the device too (`dispatch_slots`, `block_row_map` and a gather, from the
//! same row blocks the cpu backend computes); chunk and tensor-parallel layouts run the cpu
//! implementation at unit width on row numbers, then one device gather, so both backends
//! share one definition of every layout.
//!
//! bf16 plans (`model.dtype = "bf16"`, [`crate::plan::precision`]): each buffer is stored as
//! its plan says ([`Storage`]); kernels have an f32 and a `_bf16` variant, picked from the
//! storage of the op's activations; GEMMs take bf16 operands (activations, and the bf16
//! shadows of parameters) with f32 accumulation and write f32 or bf16 as their output is
//! stored (weight gradients f32). Where an op meets a buffer of the other storage (the f32
//! routing, LayerNorm-statistics and loss buffers beside bf16 activations), the value is cast
//! through a scratch copy.

mod a2a_2d;
mod attention;

use super::comm::Comms;
use super::gpu::{Gpu, GpuStream, BLOCK, KERNELS};
use super::store::{DevBuf, DevStore, Storage};
use crate::backend::cpu::exec::{self as cpu_exec, OpCtx, OpOutcome, RouteObs};
use crate::backend::cpu::fabric::Fabric;
use crate::backend::cpu::store::{Data, OpView};
use crate::math::{rng, routing};
use crate::plan::{BufId, ElemType, Group, Op, OpKind, RankPlan};
use crate::plan::ops::{aligned_rows, per_expert_pays, DROPLESS_ROW_ALIGN};
use crate::spec::Activation;
use cudarc::driver::{result, LaunchConfig, PushKernelArg};
use moelab_kernels::error::GpuError;
use moelab_kernels::gemm::{bf16_gemm_raw_batched, sgemm_raw, Batch};
use moelab_kernels::{GemmDims, GemmForm};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

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
    /// A bf16 plan: GEMMs take bf16 operands (f32 accumulation), collectives between
    /// pipeline stages carry bf16.
    pub bf16: bool,
    /// When the current op's first synchronising copy returned: the op's host work runs
    /// from here while the stream waits (reset before each op; see `OpEvent::host_ns`).
    pub first_sync: std::cell::Cell<Option<std::time::Instant>>,
    /// cuBLAS GEMM calls the current op made (reset before each op; see `OpEvent::gemm_calls`).
    pub gemm_calls: std::cell::Cell<u32>,
}

/// An input in the storage a kernel wants: the buffer itself, a parameter's bf16 shadow, or a
/// cast scratch copy (freed by [`StreamExec::done`]).
#[derive(Debug, Clone, Copy)]
struct In {
    ptr: u64,
    len: usize,
    scratch: Option<u64>,
}

/// An output written in the storage a kernel produces: the buffer itself, or a scratch that
/// [`StreamExec::commit`] casts into the buffer.
#[derive(Debug, Clone, Copy)]
struct Out {
    /// Where the kernel writes.
    ptr: u64,
    /// The buffer.
    buf: DevBuf,
    /// Its storage.
    buf_st: Storage,
    /// What the kernel writes.
    st: Storage,
    scratch: bool,
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

    /// The storage of a plan buffer.
    fn st(&self, id: BufId) -> Storage {
        Storage::of(lock(self.store).desc(id))
    }

    /// The storage GEMM operands take in this plan.
    fn gemm_st(&self) -> Storage {
        if self.bf16 {
            Storage::Bf16
        } else {
            Storage::F32
        }
    }

    /// The bf16 shadow of a parameter, if it has one.
    fn shadow_of(&self, id: BufId) -> Option<BufId> {
        self.rp.params.iter().find(|p| p.value == id).and_then(|p| p.half)
    }

    /// `dst[..n] = src[..n]` converting storage `from` to `to` (a plain copy when equal).
    fn cast(&self, src: u64, from: Storage, dst: u64, to: Storage, n: usize) -> Result<(), ExecError> {
        if n == 0 {
            return Ok(());
        }
        match (from, to) {
            (a, b) if a == b => self.copy(dst, src, n, a),
            (Storage::F32, Storage::Bf16) => self.launch("f32_to_bf16_kernel", self.grid(n), &[Arg::P(src), Arg::P(dst), Arg::I64(n as i64)]),
            (Storage::Bf16, Storage::F32) => self.launch("cast_bf16_f32", self.grid(n), &[Arg::P(src), Arg::P(dst), Arg::I64(n as i64)]),
            _ => unreachable!("equal storages are copied"),
        }
    }

    /// A live buffer as storage `want`: itself, a parameter's bf16 shadow, or a cast copy.
    fn input_as(&self, id: BufId, want: Storage) -> Result<In, ExecError> {
        let b = self.input(id)?;
        let have = self.st(id);
        if have == want {
            return Ok(In { ptr: b.ptr, len: b.len, scratch: None });
        }
        if want == Storage::Bf16 {
            if let Some(h) = self.shadow_of(id) {
                let hb = self.input(h)?;
                return Ok(In { ptr: hb.ptr, len: hb.len, scratch: None });
            }
        }
        let sc = self.scratch(b.len * want.size())?;
        self.cast(b.ptr, have, sc, want, b.len)?;
        Ok(In { ptr: sc, len: b.len, scratch: Some(sc) })
    }

    /// Releases an input's cast copy (stream-ordered, after the kernels that read it).
    fn done(&self, v: In) -> Result<(), ExecError> {
        match v.scratch {
            Some(p) => self.scratch_free(p),
            None => Ok(()),
        }
    }

    /// Allocates output `id` (`len` elements) for a kernel writing storage `st`.
    fn output_as(&self, id: BufId, len: usize, st: Storage) -> Result<Out, ExecError> {
        let buf = self.output(id, len)?;
        let buf_st = self.st(id);
        if buf_st == st {
            return Ok(Out { ptr: buf.ptr, buf, buf_st, st, scratch: false });
        }
        let ptr = self.scratch(buf.len * st.size())?;
        Ok(Out { ptr, buf, buf_st, st, scratch: true })
    }

    /// Moves a kernel's output into its buffer (a cast when the storages differ).
    fn commit(&self, o: Out) -> Result<(), ExecError> {
        if o.scratch {
            self.cast(o.ptr, o.st, o.buf.ptr, o.buf_st, o.buf.len)?;
            self.scratch_free(o.ptr)?;
        }
        Ok(())
    }

    /// [`StreamExec::launch`] of kernel `name`'s variant for storage `st` (`<name>_bf16`).
    fn launch_st(&self, name: &'static str, st: Storage, cfg: LaunchConfig, args: &[Arg]) -> Result<(), ExecError> {
        let k = match st {
            Storage::F32 => name,
            Storage::Bf16 => KERNELS
                .iter()
                .copied()
                .find(|k| k.strip_suffix("_bf16") == Some(name))
                .ok_or_else(|| ExecError::Plan(format!("kernel {name} has no bf16 variant in KERNELS")))?,
        };
        self.launch(k, cfg, args)
    }

    fn input(&self, id: BufId) -> Result<DevBuf, ExecError> {
        let mut st = lock(self.store);
        st.touch(id, self.si);
        st.get(id).ok_or_else(|| ExecError::Plan(format!("buffer {} read before it was written", st.desc(id).name)))
    }

    fn output(&self, id: BufId, len: usize) -> Result<DevBuf, ExecError> {
        Ok(lock(self.store).alloc(id, len, self.cu(), self.si, false)?)
    }

    /// Allocates output `id` without zeroing it: the caller writes its first `written`
    /// elements and [`StreamExec::zero_tail`] clears the rest (a planned size above the rows
    /// a step produced). Saves a pass over buffers that a row gather fills.
    fn output_unzeroed(&self, id: BufId, len: usize, keep: bool) -> Result<DevBuf, ExecError> {
        Ok(lock(self.store).alloc_unzeroed(id, len, self.cu(), self.si, keep)?)
    }

    /// Zeroes the elements of `b` (buffer `id`) from `written` on.
    fn zero_tail(&self, id: BufId, b: DevBuf, written: usize) -> Result<(), ExecError> {
        if written < b.len {
            let size = self.st(id).size();
            // SAFETY: the buffer holds b.len elements of `size` bytes.
            unsafe { result::memset_d8_async(b.ptr + (written * size) as u64, 0, (b.len - written) * size, self.cu()) }
                .map_err(GpuError::driver("cuMemsetD8Async"))?;
        }
        Ok(())
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

    /// `c = op(a) op(b) + beta c`: SGEMM in f32 plans; in bf16 plans `a` and `b` are bf16
    /// (see [`StreamExec::gemm_st`]) and `c` is stored as `c_st`, accumulated in f32.
    #[allow(clippy::too_many_arguments)]
    fn gemm(&self, form: GemmForm, a: u64, b: u64, c: u64, c_st: Storage, m: usize, k: usize, n: usize, beta: f32, batch: Option<Batch>) -> Result<(), ExecError> {
        self.gemm_in(self.gemm_st(), form, a, b, c, c_st, m, k, n, beta, batch)
    }

    /// [`StreamExec::gemm`] with operands in storage `ab` (f32 operands take SGEMM and an f32
    /// result: the router's GEMMs in bf16 plans).
    #[allow(clippy::too_many_arguments)]
    fn gemm_in(&self, ab: Storage, form: GemmForm, a: u64, b: u64, c: u64, c_st: Storage, m: usize, k: usize, n: usize, beta: f32, batch: Option<Batch>) -> Result<(), ExecError> {
        let dims = GemmDims { m, k, n };
        // The raw GEMMs skip empty products without calling cuBLAS; count only real calls.
        if m > 0 && n > 0 && batch.as_ref().is_none_or(|b| b.count > 0) {
            self.gemm_calls.set(self.gemm_calls.get() + 1);
        }
        if ab == Storage::Bf16 {
            // SAFETY: the handle is bound to this stream; the call sites size a, b (bf16) and c
            // (c_st) for the form.
            unsafe { bf16_gemm_raw_batched(self.s.blas, form, a, b, c, dims, beta, c_st == Storage::F32, batch) }?;
        } else {
            if c_st != Storage::F32 {
                return Err(ExecError::Plan("an f32 GEMM with a bf16 output".into()));
            }
            // SAFETY: the handle is bound to this stream; the call sites size a, b, c for the form.
            unsafe { sgemm_raw(self.s.blas, form, a, b, c, dims, beta, batch) }?;
        }
        Ok(())
    }

    fn copy(&self, dst: u64, src: u64, elems: usize, st: Storage) -> Result<(), ExecError> {
        if elems > 0 && dst != src {
            // SAFETY: both buffers hold at least `elems` elements of `st` on this device.
            unsafe { result::memcpy_dtod_async(dst, src, elems * st.size(), self.cu()) }.map_err(GpuError::driver("cuMemcpyDtoDAsync"))?;
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

    /// `out[g, c] (+)= sum_r x[g * rows + r, c]` for `groups` groups, deterministic; `x` is
    /// stored as `x_st`, `out` is f32.
    #[allow(clippy::too_many_arguments)]
    fn col_sums(&self, x: u64, x_st: Storage, out: u64, rows: usize, cols: usize, groups: usize, accumulate: bool) -> Result<(), ExecError> {
        if groups * cols == 0 {
            return Ok(());
        }
        let (chunk, chunks) = self.row_chunks(rows, cols * groups);
        let part = self.scratch(groups * chunks * cols * 4)?;
        self.launch_st("col_partials", x_st, self.grid(groups * chunks * cols), &[Arg::P(x), Arg::P(part), Arg::I64(rows as i64), Arg::I32(cols as i32), Arg::I32(groups as i32), Arg::I64(chunk as i64)])?;
        self.launch("col_finish", self.grid(groups * cols), &[Arg::P(part), Arg::P(out), Arg::I64(chunks as i64), Arg::I32(cols as i32), Arg::I32(groups as i32), Arg::I32(accumulate as i32)])?;
        self.scratch_free(part)
    }

    fn sync(&self) -> Result<(), ExecError> {
        self.s.stream.synchronize().map_err(GpuError::driver("cuStreamSynchronize"))?;
        self.synced();
        Ok(())
    }

    /// Notes the op's first wait for its stream (its host work is timed from there).
    fn synced(&self) {
        if self.first_sync.get().is_none() {
            self.first_sync.set(Some(std::time::Instant::now()));
        }
    }

    /// Copies `v.len()` values from device address `ptr` into `v` and waits for this stream
    /// (through pinned staging: see [`super::pinned`]).
    ///
    /// # Safety
    /// `ptr` must hold at least `v.len()` values of `T`.
    unsafe fn download_into<T: cudarc::driver::DeviceRepr>(&self, v: &mut [T], ptr: u64) -> Result<(), ExecError> {
        // SAFETY: the caller's contract; this stream's thread has the context current.
        unsafe { super::pinned::download(v, ptr, &self.s.stream) }?;
        self.synced();
        Ok(())
    }

    /// A live buffer's contents on the host; bf16 values come back as f32.
    pub fn download(&self, id: BufId) -> Result<Data, ExecError> {
        Ok((*self.download_shared(id)?).clone())
    }

    /// A live buffer's contents on the host, shared with the store's host copy. The first
    /// read after a write copies it down (waiting for this stream); later reads use that
    /// copy, so the ops that read one routing table leave the stream running.
    fn download_shared(&self, id: BufId) -> Result<Arc<Data>, ExecError> {
        if host_copies() {
            // (The guard must drop before `input` locks the store again.)
            let kept = lock(self.store).host_copy(id);
            if let Some(d) = kept {
                self.input(id)?;
                return Ok(d);
            }
        }
        let version = lock(self.store).version(id);
        let data = Arc::new(self.download_now(id)?);
        if host_copies() && data.len() <= HOST_COPY_MAX_ELEMS {
            lock(self.store).keep_host_copy(id, version, data.clone());
        }
        Ok(data)
    }

    /// Copies a live buffer to the host now (waits for this stream).
    fn download_now(&self, id: BufId) -> Result<Data, ExecError> {
        let b = self.input(id)?;
        let elem = lock(self.store).desc(id).elem;
        let data = match elem {
            ElemType::F32 if self.st(id) == Storage::Bf16 => {
                let mut v = vec![0u16; b.len];
                // SAFETY: the buffer holds b.len bf16 values.
                unsafe { self.download_into(&mut v, b.ptr) }?;
                Data::F32(v.into_iter().map(|x| half::bf16::from_bits(x).to_f32()).collect())
            }
            ElemType::F32 => {
                let mut v = vec![0.0f32; b.len];
                // SAFETY: the buffer holds b.len f32 values.
                unsafe { self.download_into(&mut v, b.ptr) }?;
                Data::F32(v)
            }
            ElemType::I32 => {
                let mut v = vec![0i32; b.len];
                // SAFETY: as above, for i32.
                unsafe { self.download_into(&mut v, b.ptr) }?;
                Data::I32(v)
            }
        };
        Ok(data)
    }

    fn download_f32(&self, id: BufId) -> Result<HostVals<f32>, ExecError> {
        let d = self.download_shared(id)?;
        match *d {
            Data::F32(_) => Ok(HostVals(d, std::marker::PhantomData)),
            Data::I32(_) => Err(ExecError::Plan(format!("buffer {} is not f32", lock(self.store).desc(id).name))),
        }
    }

    fn download_i32(&self, id: BufId) -> Result<HostVals<i32>, ExecError> {
        let d = self.download_shared(id)?;
        match *d {
            Data::I32(_) => Ok(HostVals(d, std::marker::PhantomData)),
            Data::F32(_) => Err(ExecError::Plan(format!("buffer {} is not i32", lock(self.store).desc(id).name))),
        }
    }

    /// Writes host values into a buffer (allocated at the planned size for static buffers);
    /// f32 values into a bf16 buffer are rounded to nearest even.
    pub fn upload(&self, id: BufId, data: &Data) -> Result<(), ExecError> {
        let b = self.output(id, data.len())?;
        let st = self.st(id);
        // SAFETY: the buffer holds at least data.len() elements of its storage; pageable host
        // memory is staged before the call returns, and the caller syncs before freeing anything.
        unsafe {
            match data {
                Data::F32(v) if st == Storage::Bf16 => {
                    let bits: Vec<u16> = v.iter().map(|x| half::bf16::from_f32(*x).to_bits()).collect();
                    result::memcpy_htod_async(b.ptr, &bits, self.cu())
                }
                Data::F32(v) => result::memcpy_htod_async(b.ptr, v, self.cu()),
                Data::I32(v) => result::memcpy_htod_async(b.ptr, v, self.cu()),
            }
        }
        .map_err(GpuError::driver("cuMemcpyHtoDAsync"))?;
        // Counts and slots computed on the host are known there: a later reader (an
        // all-to-all's send counts) need not copy them back down.
        if let Data::I32(v) = data {
            if host_copies() && v.len() == b.len && v.len() <= HOST_COPY_MAX_ELEMS {
                let mut st = lock(self.store);
                let version = st.version(id);
                st.keep_host_copy(id, version, Arc::new(data.clone()));
            }
        }
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

    /// Dispatch on the device: the global routing table (one small download) says how many
    /// of each (choice, expert) stay; `dispatch_slots` ranks the assignments the way the cpu
    /// rule does (per expert, choice-major, then token order) and one row gather fills `send`.
    #[allow(clippy::too_many_arguments)]
    fn dispatch(&self, x: BufId, idx: BufId, gathered: BufId, send: BufId, send_counts: BufId, slots: BufId, dims: &crate::plan::ops::MoeDims) -> Result<GpuOutcome, ExecError> {
        let tb = cpu_exec::table(dims, &self.download_f32(gathered)?);
        let (t, k, e, m) = (dims.tokens, dims.top_k, dims.n_experts, dims.d_model);
        let (tab, per_expert) = routing::dispatch_table(&tb, dims.data_rank);
        let total: usize = per_expert.iter().sum();
        let el = dims.local_experts();
        let mut counts = vec![0i32; dims.ep_peers.len()];
        for (ex, &c) in per_expert.iter().enumerate() {
            counts[ex / el] += c as i32;
        }
        let ib = self.input(idx)?;
        let sl = self.output(slots, t * k)?;
        let tab_dev = self.scratch(tab.len() * 4)?;
        let map = self.scratch(total * 4)?;
        // SAFETY: tab_dev holds tab.len() i32; pageable host memory is staged before return.
        unsafe { result::memcpy_htod_async(tab_dev, &tab, self.cu()) }.map_err(GpuError::driver("cuMemcpyHtoDAsync"))?;
        self.upload(send_counts, &Data::I32(counts))?;
        if t * k > 0 {
            let cfg = LaunchConfig { grid_dim: (e as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
            self.launch("dispatch_slots", cfg, &[Arg::P(ib.ptr), Arg::P(tab_dev), Arg::P(sl.ptr), Arg::P(map), Arg::I64(t as i64), Arg::I32(k as i32), Arg::I32(e as i32)])?;
        }
        let st = self.st(send);
        let xb = self.input_as(x, st)?;
        let sb = self.output_unzeroed(send, total * m, false)?;
        self.zero_tail(send, sb, total * m)?;
        if total > 0 {
            self.launch_st("gather_rows", st, self.grid(total * m), &[Arg::P(xb.ptr), Arg::P(map), Arg::P(sb.ptr), Arg::I64(total as i64), Arg::I32(m as i32)])?;
        }
        self.done(xb)?;
        self.scratch_free(map)?;
        self.scratch_free(tab_dev)?;
        let obs = RouteObs { aux: tb.aux_loss(), dropped: tb.dropped(), routed: tb.n_global * k, loss: 0.0, capacity: tb.capacity };
        Ok(GpuOutcome { bytes: None, obs: Some(obs), loss: None, host: false })
    }

    /// An expert layout on the device: its row blocks come from the routing table alone
    /// (`cpu_exec::block_layout`, the cpu backend's definition), `block_row_map` turns them
    /// into a row map and one gather moves the rows. The host reads only the gathered
    /// statistics; a planned-size output is allocated before that download.
    fn block_layout(&self, op: &Op, src: BufId, gathered: BufId, out: BufId, counts: Option<BufId>) -> Result<GpuOutcome, ExecError> {
        let m = match &op.kind {
            OpKind::ExpertLayout { dims, .. } | OpKind::ExpertUnlayout { dims, .. } => dims.d_model,
            _ => return Err(ExecError::Plan(format!("{} is not an expert layout", op.name))),
        };
        let desc = lock(self.store).desc(out).clone();
        if !desc.dynamic {
            self.output_unzeroed(out, desc.elems, false)?;
        }
        // Rows move in the output's storage; a source stored otherwise is cast first, also
        // before the download (its scratch allocation would wait on the host after it).
        let st = self.st(out);
        let sb = self.input_as(src, st)?;
        let l = cpu_exec::block_layout(&op.kind, &self.download_f32(gathered)?).expect("an expert layout");
        let ob = lock(self.store).alloc_unzeroed(out, l.out_rows * m, self.cu(), self.si, !desc.dynamic)?;
        let rows = ob.len / m.max(1);
        if let Some(c) = &l.counts {
            self.upload(counts.expect("an unlayout has counts"), &Data::I32(c.clone()))?;
        }
        // A dropless expert buffer: the rows that hold tokens, for the per-expert GEMMs.
        if desc.dynamic {
            let mut used = vec![false; rows];
            for b in &l.blocks {
                used[b.dst..b.dst + b.n].iter_mut().for_each(|u| *u = true);
            }
            lock(self.store).set_fill(out, Arc::new(used));
        }
        if rows > 0 {
            let mut tab: Vec<i32> = Vec::with_capacity(3 * l.blocks.len());
            let mut blocks: Vec<_> = l.blocks.iter().filter(|b| b.n > 0).collect();
            blocks.sort_by_key(|b| b.dst);
            for b in &blocks {
                tab.extend([b.dst as i32, b.src as i32, b.n as i32]);
            }
            let tab_dev = self.scratch(tab.len().max(1) * 4)?;
            let map = self.scratch(rows * 4)?;
            if !tab.is_empty() {
                // SAFETY: tab_dev holds tab.len() i32; pageable host memory is staged before return.
                unsafe { result::memcpy_htod_async(tab_dev, &tab, self.cu()) }.map_err(GpuError::driver("cuMemcpyHtoDAsync"))?;
            }
            self.launch("block_row_map", self.grid(rows), &[Arg::P(tab_dev), Arg::I32(blocks.len() as i32), Arg::P(map), Arg::I64(rows as i64)])?;
            self.launch_st("gather2_rows", st, self.grid(rows * m), &[Arg::P(sb.ptr), Arg::P(0), Arg::P(map), Arg::P(ob.ptr), Arg::I64(rows as i64), Arg::I32(m as i32)])?;
            self.scratch_free(map)?;
            self.scratch_free(tab_dev)?;
        }
        self.done(sb)?;
        Ok(GpuOutcome::default())
    }

    /// A row-moving op (chunk and tensor-parallel slices and layouts). Its cpu implementation runs on the
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
        // Outputs of a planned size are allocated before the first download: allocation can
        // take hundreds of microseconds for a large buffer, hidden while the GPU is busy but
        // not once the stream has drained for the download. Dynamic outputs wait for their rows.
        let mut early = Vec::new();
        for &id in &op.writes {
            let d = lock(self.store).desc(id).clone();
            if d.elem == ElemType::F32 && !d.dynamic && !sources.contains(&Some(id)) {
                self.output_unzeroed(id, d.elems, false)?;
                early.push(id);
            }
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
            op_name: &op.name, forced_idx: None, buffers: None,
        };
        let out: OpOutcome = cpu_exec::execute(&unit, &mut view, &ctx).map_err(|e| ExecError::Host(e.to_string()))?;
        let puts = view.into_puts();
        // An early output the op does not put stays zero, as a fresh buffer would be.
        for &id in early.iter().filter(|id| !puts.iter().any(|(p, d)| p == *id && matches!(d, Data::F32(_)))) {
            let live = lock(self.store).get(id);
            if let Some(b) = live {
                self.zero_tail(id, b, 0)?;
            }
        }
        for (id, data) in puts {
            match data {
                Data::I32(_) => self.upload(id, &data)?,
                Data::F32(codes) => {
                    let rows = codes.len();
                    let in_place = sources.get(1).copied().flatten() == Some(id);
                    let ob = lock(self.store).alloc(id, rows * m, self.cu(), self.si, in_place || early.contains(&id))?;
                    // The gather writes rows * m elements (padding rows as zeros).
                    if early.contains(&id) {
                        self.zero_tail(id, ob, rows * m)?;
                    }
                    if rows == 0 {
                        continue;
                    }
                    let map: Vec<i32> = codes.iter().map(|&c| c as i32).collect();
                    // A dropless expert buffer: remember which rows hold tokens (code 0 rows are
                    // zero), so the expert GEMMs can skip the padding up to the busiest expert.
                    if !in_place && lock(self.store).desc(id).dynamic {
                        let rows_used: Vec<bool> = map.iter().map(|&c| c != 0).collect();
                        lock(self.store).set_fill(id, Arc::new(rows_used));
                    }
                    if in_place && map.iter().enumerate().any(|(r, &c)| c < 0 && (-c - 1) as usize != r) {
                        return Err(ExecError::Plan(format!("{}: an in-place layout moves rows", op.name)));
                    }
                    // Rows move in the output's storage; a source stored otherwise is cast first.
                    let st = self.st(id);
                    let mut views = Vec::new();
                    for (src, live) in sources.iter().zip(&src_bufs) {
                        views.push(match (src, live) {
                            (Some(sid), Some(_)) if self.st(*sid) != st => {
                                if *sid == id {
                                    return Err(ExecError::Plan(format!("{}: an in-place layout changes storage", op.name)));
                                }
                                Some(self.input_as(*sid, st)?)
                            }
                            (_, Some(b)) => Some(In { ptr: b.ptr, len: b.len, scratch: None }),
                            _ => None,
                        });
                    }
                    let scratch = self.scratch(rows * 4)?;
                    // SAFETY: scratch holds rows i32; host memory is staged before return.
                    unsafe { result::memcpy_htod_async(scratch, &map, self.cu()) }.map_err(GpuError::driver("cuMemcpyHtoDAsync"))?;
                    let a = views.first().copied().flatten().map_or(0, |b| b.ptr);
                    let b = views.get(1).copied().flatten().map_or(0, |b| b.ptr);
                    self.launch_st("gather2_rows", st, self.grid(rows * m), &[Arg::P(a), Arg::P(b), Arg::P(scratch), Arg::P(ob.ptr), Arg::I64(rows as i64), Arg::I32(m as i32)])?;
                    self.scratch_free(scratch)?;
                    for v in views.into_iter().flatten() {
                        self.done(v)?;
                    }
                }
            }
        }
        Ok(GpuOutcome { bytes: out.bytes, obs: out.obs, loss: None, host: false })
    }

    /// Enqueue `op` on this stream.
    pub fn execute(&self, op: &Op) -> Result<GpuOutcome, ExecError> {
        // What an op writes in place (an all-reduce, an accumulation) loses its row record:
        // only the ops that know their rows (layouts, activations, expert GEMMs) set it again.
        {
            let mut st = lock(self.store);
            for w in &op.writes {
                st.written(*w);
            }
        }
        use OpKind::*;
        let p = Arg::P;
        let mut outcome = GpuOutcome::default();
        match &op.kind {
            LoadBatch { x, target, shard, batch, seq, d_model } => {
                // The cpu's data stream, drawn on the device at random access (no host work).
                let per_seq = seq * d_model;
                let n = batch * per_seq;
                let st = self.st(*x);
                let xb = self.output(*x, n)?;
                // The target is f32 in every plan (the bf16 policy keeps the loss's inputs f32).
                let tb = self.output_as(*target, n, Storage::F32)?;
                let k = rng::stream_key(self.seed, "data.x", self.step, 0).map(|w| Arg::I32(w as i32));
                let blocks = batch * per_seq.div_ceil(8);
                if n > 0 {
                    let args = [p(xb.ptr), Arg::I64(per_seq as i64), Arg::I32(*batch as i32), k[0], k[1], k[2], k[3], k[4], k[5], Arg::I64((shard * batch) as i64)];
                    self.launch_st("load_batch_x", st, self.grid(blocks), &args)?;
                    self.launch_st("rotate_rows_left", st, self.grid(n), &[p(xb.ptr), p(tb.ptr), Arg::I64((n / d_model) as i64), Arg::I32(*d_model as i32)])?;
                }
                self.commit(tb)?;
            }
            // Gradient accumulation over micro-batches: dst += src, in place.
            GradAccum { pairs } => {
                for (src, dst) in pairs {
                    let st = self.st(*dst);
                    let (sb, db) = (self.input_as(*src, st)?, self.input(*dst)?);
                    if db.len != sb.len {
                        return Err(ExecError::Plan(format!("{}: gradient of {} elements added into one of {}", op.name, sb.len, db.len)));
                    }
                    if sb.len > 0 {
                        self.launch_st("add_inplace", st, self.grid(sb.len), &[p(db.ptr), p(sb.ptr), Arg::I64(sb.len as i64)])?;
                    }
                    self.done(sb)?;
                }
            }
            // Pipeline exchanges: one NCCL group of send and recv with the peer. The two peers
            // plan their buffers independently, so the wire type is the plan's (bf16 in bf16
            // plans), each side casting where its buffer is stored otherwise.
            SendRecv { group, send, recv } => {
                let wire = self.gemm_st();
                let sb = match send {
                    Some(b) => Some(self.input_as(*b, wire)?),
                    None => None,
                };
                let rb = match recv {
                    Some(r) => {
                        let n = lock(self.store).desc(*r).elems;
                        Some(self.output_as(*r, n, wire)?)
                    }
                    None => None,
                };
                self.comms.send_recv(*group, sb.map(|b| (b.ptr, b.len)), rb.map(|b| (b.ptr, b.buf.len)), wire, &self.s.stream)?;
                outcome.bytes = Some((sb.map_or(0, |b| b.len) * wire.size()) as u64);
                if let Some(b) = sb {
                    self.done(b)?;
                }
                if let Some(r) = rb {
                    self.commit(r)?;
                }
            }
            // Tutel's sharded experts (expert-parallel world above E): spec validation refuses
            // them on this backend before any GPU work; this is the backstop.
            ShardDispatch { .. } | ShardCounts { .. } | ShardCombine { .. } | SwapAxes { .. } | TakeBlock { .. } => {
                return Err(ExecError::Plan(format!(
                    "{}: Tutel's sharded experts (tutel with layout.ep > n_experts) run on the cpu and sim backends only", op.name)))
            }
            Dispatch { x, idx, gathered, send, send_counts, slots, dims } => return self.dispatch(*x, *idx, *gathered, *send, *send_counts, *slots, dims),
            ExpertLayout { recv, gathered, out, .. } => return self.block_layout(op, *recv, *gathered, *out, None),
            ExpertUnlayout { input, gathered, send, send_counts, .. } => return self.block_layout(op, *input, *gathered, *send, Some(*send_counts)),
            ChunkSlice { .. } | ChunkMerge { .. } | ChunkLayout { .. }
            | ChunkUnlayout { .. } | TpLayout { .. } | TpUnlayout { .. } | TpMerge { .. } | LocalLayout { .. } | LocalUnlayout { .. } => {
                return self.layout(op)
            }
            LayerNorm { x, gamma, beta, y, stats } => {
                let st = self.st(*x);
                let (xb, g, b) = (self.input(*x)?, self.input_as(*gamma, Storage::F32)?, self.input_as(*beta, Storage::F32)?);
                let m = g.len;
                let rows = xb.len / m;
                let yb = self.output_as(*y, xb.len, st)?;
                let sb = self.output_as(*stats, 2 * rows, Storage::F32)?;
                self.launch_st("ln_fwd", st, self.warp_grid(rows), &[p(xb.ptr), p(g.ptr), p(b.ptr), p(yb.ptr), p(sb.ptr), Arg::I64(rows as i64), Arg::I32(m as i32)])?;
                self.commit(yb)?;
                self.commit(sb)?;
                self.done(g)?;
                self.done(b)?;
            }
            LayerNormBwd { x, gamma, stats, dy, residual, dx, dgamma, dbeta } => {
                let st = self.st(*x);
                let (xb, g, sb, dyb) = (self.input(*x)?, self.input_as(*gamma, Storage::F32)?, self.input_as(*stats, Storage::F32)?, self.input_as(*dy, st)?);
                let m = g.len;
                let rows = xb.len / m;
                let res = match residual {
                    Some(r) => Some(self.input_as(*r, st)?),
                    None => None,
                };
                let dxb = self.output_as(*dx, xb.len, st)?;
                let dg = self.output_as(*dgamma, m, Storage::F32)?;
                let db = self.output_as(*dbeta, m, Storage::F32)?;
                let res_ptr = res.map_or(0, |r| r.ptr);
                self.launch_st("ln_bwd_dx", st, self.warp_grid(rows), &[p(xb.ptr), p(g.ptr), p(sb.ptr), p(dyb.ptr), p(res_ptr), p(dxb.ptr), Arg::I64(rows as i64), Arg::I32(m as i32)])?;
                let (chunk, chunks) = self.row_chunks(rows, m);
                let part = self.scratch(2 * chunks * m * 4)?;
                let part_b = part + (chunks * m * 4) as u64;
                self.launch_st("ln_bwd_partials", st, self.grid(chunks * m), &[p(xb.ptr), p(sb.ptr), p(dyb.ptr), p(part), p(part_b), Arg::I64(rows as i64), Arg::I32(m as i32), Arg::I64(chunk as i64)])?;
                for (src, dst) in [(part, dg.ptr), (part_b, db.ptr)] {
                    self.launch("col_finish", self.grid(m), &[p(src), p(dst), Arg::I64(chunks as i64), Arg::I32(m as i32), Arg::I32(1), Arg::I32(0)])?;
                }
                self.scratch_free(part)?;
                for o in [dxb, dg, db] {
                    self.commit(o)?;
                }
                for v in [Some(g), Some(sb), Some(dyb), res].into_iter().flatten() {
                    self.done(v)?;
                }
            }
            Linear { x, w, bias, residual, y, rows, d_in, d_out } => {
                // A Linear with an f32 output (the router's logits in a bf16 plan) runs in f32.
                let gs = if self.st(*y) == Storage::F32 { Storage::F32 } else { self.gemm_st() };
                let (xb, wb) = (self.input_as(*x, gs)?, self.input_as(*w, gs)?);
                let y_st = self.st(*y);
                let rb = match residual {
                    Some(r) => Some(self.input(*r)?),
                    None => None,
                };
                let bb = match bias {
                    Some(b) => Some(self.input_as(*b, Storage::F32)?),
                    None => None,
                };
                let yb = self.output(*y, rows * d_out)?;
                let beta = match (rb, residual) {
                    (Some(r), Some(rid)) => {
                        self.cast(r.ptr, self.st(*rid), yb.ptr, y_st, rows * d_out)?;
                        1.0
                    }
                    _ => 0.0,
                };
                self.gemm_in(gs, GemmForm::Nn, xb.ptr, wb.ptr, yb.ptr, y_st, *rows, *d_in, *d_out, beta, None)?;
                if let Some(b) = bb {
                    self.launch_st("add_bias_rows", y_st, self.grid(rows * d_out), &[p(yb.ptr), p(b.ptr), Arg::I64(*rows as i64), Arg::I32(*d_out as i32), Arg::I64((*rows).max(1) as i64)])?;
                    self.done(b)?;
                }
                self.done(xb)?;
                self.done(wb)?;
            }
            LinearBwd { x, w, dy, dx, dw, dbias, accumulate_dx, rows, d_in, d_out } => {
                // The backward of an f32-output Linear (the router) runs in f32 as well.
                let gs = if self.st(*dy) == Storage::F32 { Storage::F32 } else { self.gemm_st() };
                let (xb, wb, dyb) = (self.input_as(*x, gs)?, self.input_as(*w, gs)?, self.input_as(*dy, gs)?);
                let dwb = self.output(*dw, d_in * d_out)?;
                self.gemm_in(gs, GemmForm::Tn, xb.ptr, dyb.ptr, dwb.ptr, self.st(*dw), *d_in, *rows, *d_out, 0.0, None)?;
                if let Some(db) = dbias {
                    let dbb = self.output_as(*db, *d_out, Storage::F32)?;
                    self.col_sums(dyb.ptr, gs, dbb.ptr, *rows, *d_out, 1, false)?;
                    self.commit(dbb)?;
                }
                if let Some(d) = dx {
                    let n = rows * d_in;
                    let (dxb, beta) = if *accumulate_dx { (self.input(*d)?, 1.0) } else { (self.output(*d, n)?, 0.0) };
                    let d_st = self.st(*d);
                    if gs == Storage::F32 && d_st == Storage::Bf16 {
                        // f32 product into an f32 copy of dx, stored back bf16 once.
                        let sc = self.scratch(n * 4)?;
                        if *accumulate_dx {
                            self.cast(dxb.ptr, d_st, sc, Storage::F32, n)?;
                        }
                        self.gemm_in(gs, GemmForm::Nt, dyb.ptr, wb.ptr, sc, Storage::F32, *rows, *d_out, *d_in, beta, None)?;
                        self.cast(sc, Storage::F32, dxb.ptr, d_st, n)?;
                        self.scratch_free(sc)?;
                    } else {
                        self.gemm_in(gs, GemmForm::Nt, dyb.ptr, wb.ptr, dxb.ptr, d_st, *rows, *d_out, *d_in, beta, None)?;
                    }
                }
                for v in [xb, wb, dyb] {
                    self.done(v)?;
                }
            }
            Act { h, a, act } => {
                let st = self.st(*h);
                let hb = self.input(*h)?;
                let ab = self.output_as(*a, hb.len, st)?;
                self.launch_st("act_fwd", st, self.grid(hb.len), &[p(hb.ptr), p(ab.ptr), Arg::I64(hb.len as i64), Arg::I32(act_kind(*act))])?;
                self.commit(ab)?;
                // act(0) = 0 (GELU, ReLU): the zero rows stay zero.
                self.carry_fill(*h, *a);
            }
            ActBwd { h, da, dh, act } => {
                let st = self.st(*h);
                let (hb, dab) = (self.input(*h)?, self.input_as(*da, st)?);
                let dhb = self.output_as(*dh, hb.len, st)?;
                self.launch_st("act_bwd", st, self.grid(hb.len), &[p(hb.ptr), p(dab.ptr), p(dhb.ptr), Arg::I64(hb.len as i64), Arg::I32(act_kind(*act))])?;
                self.commit(dhb)?;
                self.done(dab)?;
                // Zero output gradient rows stay zero.
                self.carry_fill(*da, *dh);
            }
            AttnCore { qkv, probs, ctx, dims } => {
                let st = self.gemm_st();
                let qb = self.input_as(*qkv, st)?;
                let pb = self.output_as(*probs, dims.batch * dims.heads * dims.seq * dims.seq, st)?;
                let cb = self.output_as(*ctx, dims.batch * dims.seq * dims.d_model, st)?;
                self.attention_fwd(qb.ptr, pb.ptr, cb.ptr, dims)?;
                self.commit(pb)?;
                self.commit(cb)?;
                self.done(qb)?;
            }
            AttnCoreBwd { qkv, probs, dctx, dqkv, dims } => {
                let st = self.gemm_st();
                let (qb, pb, dcb) = (self.input_as(*qkv, st)?, self.input_as(*probs, st)?, self.input_as(*dctx, st)?);
                let db = self.output_as(*dqkv, qb.len, st)?;
                self.attention_bwd(qb.ptr, pb.ptr, dcb.ptr, db.ptr, dims)?;
                self.commit(db)?;
                for v in [qb, pb, dcb] {
                    self.done(v)?;
                }
            }
            // Routing is f32 in every plan (the bf16 policy keeps its buffers f32).
            Route { logits, probs, idx, weights, stats, n_experts, top_k, renormalize } => {
                let (e, k) = (*n_experts, *top_k);
                let lb = self.input_as(*logits, Storage::F32)?;
                let t = lb.len / e;
                let pb = self.output_as(*probs, lb.len, Storage::F32)?;
                let ib = self.output(*idx, t * k)?;
                let wb = self.output_as(*weights, t * k, Storage::F32)?;
                self.launch("route_topk", self.grid(t * 32), &[p(lb.ptr), p(pb.ptr), p(ib.ptr), p(wb.ptr), Arg::I64(t as i64), Arg::I32(e as i32), Arg::I32(k as i32), Arg::I32(*renormalize as i32)])?;
                self.done(lb)?;
                // Counts per (choice, expert), exact, and probability sums per expert (the
                // deterministic column sums): `routing::local_stats` on the device, no host trip.
                let sb = self.output_as(*stats, (k + 1) * e, Storage::F32)?;
                // SAFETY: sb holds (k + 1) * e f32; the kernels below write it after the memset.
                unsafe { result::memset_d8_async(sb.ptr, 0, k * e * 4, self.cu()) }.map_err(GpuError::driver("cuMemsetD8Async"))?;
                // One shared-memory bin per (choice, expert) in each block.
                if k * e * 4 > 48 * 1024 {
                    return Err(ExecError::Plan(format!("{}: top_k x n_experts = {} routing bins exceed 48 KiB of shared memory", op.name, k * e)));
                }
                let cfg = LaunchConfig { shared_mem_bytes: (k * e * 4) as u32, ..self.grid(t * k) };
                self.launch("route_counts", cfg, &[p(ib.ptr), p(sb.ptr), Arg::I64((t * k) as i64), Arg::I32(k as i32), Arg::I32(e as i32)])?;
                self.col_sums(pb.ptr, Storage::F32, sb.ptr + (k * e * 4) as u64, t, e, 1, false)?;
                self.commit(pb)?;
                self.commit(wb)?;
                self.commit(sb)?;
            }
            RouteBwd { probs, idx, dweights, gathered, dlogits, dims, renormalize, aux_coef } => {
                let tb = cpu_exec::table(dims, &self.download_f32(*gathered)?);
                let ag = routing::aux_grad(&tb, *aux_coef);
                let (pb, ib, dwb) = (self.input_as(*probs, Storage::F32)?, self.input(*idx)?, self.input_as(*dweights, Storage::F32)?);
                let dl = self.output_as(*dlogits, dims.tokens * dims.n_experts, Storage::F32)?;
                let scratch = self.scratch(ag.len() * 4)?;
                // SAFETY: scratch holds ag.len() f32; host memory is staged before return.
                unsafe { result::memcpy_htod_async(scratch, &ag, self.cu()) }.map_err(GpuError::driver("cuMemcpyHtoDAsync"))?;
                self.launch("route_bwd", self.warp_grid(dims.tokens), &[p(pb.ptr), p(ib.ptr), p(dwb.ptr), p(scratch), p(dl.ptr), Arg::I64(dims.tokens as i64), Arg::I32(dims.n_experts as i32), Arg::I32(dims.top_k as i32), Arg::I32(*renormalize as i32)])?;
                self.scratch_free(scratch)?;
                self.commit(dl)?;
                self.done(pb)?;
                self.done(dwb)?;
            }
            DispatchBwd { dsend, slots, dx, dims } => {
                let st = self.st(*dx);
                let (ds, sl) = (self.input_as(*dsend, st)?, self.input(*slots)?);
                let dxb = self.output(*dx, dims.tokens * dims.d_model)?;
                self.launch_st("token_sum_rows", st, self.grid(dims.tokens * dims.d_model), &[p(ds.ptr), p(sl.ptr), p(dxb.ptr), Arg::I64(dims.tokens as i64), Arg::I32(dims.top_k as i32), Arg::I32(dims.d_model as i32)])?;
                self.done(ds)?;
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
                let st = self.st(*dback);
                // A planned-size gradient is allocated before the download (see `layout`).
                let planned = lock(self.store).desc(*dback).clone();
                if !planned.dynamic {
                    self.output_unzeroed(*dback, planned.elems, false)?;
                }
                let used = self.download_i32(*slots)?.iter().filter(|&&s| s >= 0).count();
                let (dob, bb, sb, wb) = (self.input_as(*dout, st)?, self.input_as(*back, st)?, self.input(*slots)?, self.input_as(*weights, Storage::F32)?);
                let dbk = lock(self.store).alloc(*dback, used * m, self.cu(), self.si, !planned.dynamic)?;
                // combine_bwd_rows writes the `used` rows (one kept assignment each).
                if !planned.dynamic {
                    self.zero_tail(*dback, dbk, used * m)?;
                }
                let dwt = self.output_as(*dweights, dims.tokens * k, Storage::F32)?;
                let assigns = dims.tokens * k;
                self.launch_st("combine_bwd_rows", st, self.grid(assigns * m), &[p(dob.ptr), p(sb.ptr), p(wb.ptr), p(dbk.ptr), Arg::I64(assigns as i64), Arg::I32(k as i32), Arg::I32(m as i32)])?;
                self.launch_st("combine_bwd_weights", st, self.warp_grid(assigns), &[p(dob.ptr), p(bb.ptr), p(sb.ptr), p(dwt.ptr), Arg::I64(assigns as i64), Arg::I32(k as i32), Arg::I32(m as i32)])?;
                self.commit(dwt)?;
                for v in [dob, bb, wb] {
                    self.done(v)?;
                }
            }
            Loss { y, target, loss, dy, n_global, d_model } | LossReplica { y, target, loss, dy, n_global, d_model } => {
                let st = self.st(*y);
                let (yb, tb) = (self.input(*y)?, self.input_as(*target, Storage::F32)?);
                let denom = (*n_global * *d_model) as f64;
                // The kernel writes dy in f32; a bf16 plan stores it bf16 (one rounding, in commit).
                let dyo = match dy {
                    Some(d) => Some(self.output_as(*d, yb.len, Storage::F32)?),
                    None => None,
                };
                let cfg = self.grid(yb.len);
                let blocks = cfg.grid_dim.0 as usize;
                let partial = self.scratch(blocks * 8)?;
                self.launch_st("mse", st, cfg, &[p(yb.ptr), p(tb.ptr), p(dyo.map_or(0, |d| d.ptr)), p(partial), Arg::I64(yb.len as i64), Arg::F64(denom)])?;
                if let Some(d) = dyo {
                    self.commit(d)?;
                }
                self.done(tb)?;
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
                    let hp = [Arg::F32(*lr), Arg::F32(*beta1), Arg::F32(*beta2), Arg::F32(*eps), Arg::F32(c1), Arg::F32(c2)];
                    match self.shadow_of(*pp) {
                        // bf16 plans: the GEMMs' bf16 copy is rewritten in the same pass.
                        Some(h) => {
                            let hb = self.input(h)?;
                            let mut args = vec![p(pb.ptr), p(gb.ptr), p(mb.ptr), p(vb.ptr), p(hb.ptr), Arg::I64(pb.len as i64)];
                            args.extend(hp);
                            self.launch("adam_shadow", self.grid(pb.len), &args)?;
                        }
                        None => {
                            let mut args = vec![p(pb.ptr), p(gb.ptr), p(mb.ptr), p(vb.ptr), Arg::I64(pb.len as i64)];
                            args.extend(hp);
                            self.launch("adam", self.grid(pb.len), &args)?;
                        }
                    }
                }
            }
            // Collectives carry the receiving buffer's storage (the same on every member: the
            // bf16 policy decides it by op kind); a parameter all-gathered into a bf16 GEMM
            // operand is sent from its bf16 shadow.
            AllGather { group, send, recv } => {
                let st = self.st(*recv);
                let sb = self.input_as(*send, st)?;
                let n = self.groups[group.0 as usize].ranks.len();
                let rb = self.output(*recv, sb.len * n)?;
                outcome.bytes = Some((sb.len * st.size()) as u64);
                self.comms.all_gather(*group, sb.ptr, rb.ptr, sb.len, st, &self.s.stream)?;
                self.done(sb)?;
            }
            AllReduce { group, bufs } => {
                let mut total = 0;
                for b in bufs {
                    let st = self.st(*b);
                    let bb = self.input(*b)?;
                    self.comms.all_reduce(*group, bb.ptr, bb.len, st, &self.s.stream)?;
                    total += bb.len * st.size();
                }
                outcome.bytes = Some(total as u64);
            }
            ReduceScatter { group, send, recv } => {
                let st = self.st(*recv);
                let sb = self.input_as(*send, st)?;
                let n = self.groups[group.0 as usize].ranks.len();
                let part = sb.len / n;
                let rb = self.output(*recv, part)?;
                outcome.bytes = Some((sb.len * st.size()) as u64);
                self.comms.reduce_scatter(*group, sb.ptr, rb.ptr, part, st, &self.s.stream)?;
                self.done(sb)?;
            }
            AllToAllV { group, send, send_counts, recv, row_len } => {
                let st = self.st(*recv);
                let counts = self.download_i32(*send_counts)?;
                let sb = self.input_as(*send, st)?;
                let matrix = self.comms.exchange_counts(*group, &counts, &self.s.stream)?;
                let me = self.comms.index_in(*group)?;
                let recv_rows: usize = matrix.iter().map(|row| row[me] as usize).sum();
                let rb = self.output(*recv, recv_rows * row_len)?;
                let sent: usize = counts.iter().map(|&c| c as usize).sum();
                outcome.bytes = Some((sent * row_len * st.size()) as u64);
                self.comms.all_to_all_v(*group, sb.ptr, rb.ptr, &matrix, *row_len, st, &self.s.stream)?;
                self.done(sb)?;
            }
            AllToAllV2d { intra, inter, send, send_counts, recv, row_len, gpus_per_node, .. } => {
                outcome.bytes = Some(self.all_to_all_2d(*intra, *inter, *send, *send_counts, *recv, *row_len, *gpus_per_node)?);
            }
        }
        Ok(outcome)
    }

    /// Marks `to` as holding data in the rows `from` does (when known).
    fn carry_fill(&self, from: BufId, to: BufId) {
        let mut st = lock(self.store);
        if let Some(f) = st.fill(from) {
            st.set_fill(to, f);
        }
    }

    /// Rows in use per local expert of expert buffers laid out `[n_local, rows, ..]`, when
    /// every one of `ids` records its filled rows (dropless layouts): the highest filled row
    /// of each expert block, plus one. `None` means the GEMMs run over all `rows` of each block.
    fn expert_rows(&self, ids: &[BufId], n_local: usize, rows: usize) -> Option<Vec<usize>> {
        let st = lock(self.store);
        let fills = ids.iter().map(|&id| st.fill(id)).collect::<Option<Vec<_>>>()?;
        rows_in_use(&fills.iter().map(|f| f.as_slice()).collect::<Vec<_>>(), n_local, rows)
    }

    /// Whether a dropless expert op with `used` real rows per expert (blocks of `rows`) runs
    /// one GEMM per expert (`plan::ops::per_expert_pays`; `MOELAB_DROPLESS_GEMMS` =
    /// `per-expert` or `batched` forces either, for A/B runs).
    fn per_expert(&self, used: &[usize], rows: usize, d_in: usize, d_out: usize, gemms: usize, calls: usize) -> bool {
        match dropless_gemms() {
            Some(forced) => forced,
            None => {
                let gemm_rows: Vec<usize> = used.iter().map(|&u| if u == 0 { 0 } else { Self::gemm_rows(u, rows) }).collect();
                per_expert_pays(&gemm_rows, rows, d_in, d_out, gemms, calls, self.gemm_st() == Storage::Bf16, self.gpu.info.sm_count as usize)
            }
        }
    }

    /// Calls once, on scratch operands, every GEMM shape the dropless expert ops of the plan
    /// are likely to meet, since cuBLAS spends 2.5-5 ms of host time on a shape's first call
    /// (seen on H200: small-tokens dropless met a new shape in its tenth step, 3.3 ms more in
    /// one op; fine-grained at ep = 2 met new batched shapes in steps 4-7, up to 8 ms each).
    /// Per-expert calls: every [`aligned_rows`] bucket up to the plan's bound for ops that run
    /// per expert at the expected load (`load` of the bound per expert, the fullest expert
    /// [`WARM_IMBALANCE`] times that), up to [`WARM_BLOCK_MAX`] times the load for the others.
    /// Batched calls over whole blocks: every block bucket from the load to
    /// [`WARM_BLOCK_MAX`] times it. Nothing under `MOELAB_WARM_SHAPES=0` (A/B runs).
    /// Returns the GEMM calls made.
    pub fn warm_expert_shapes(&self, load: f64) -> Result<usize, ExecError> {
        use std::collections::BTreeSet;
        if std::env::var("MOELAB_WARM_SHAPES").is_ok_and(|v| v == "0") {
            return Ok(0);
        }
        let gs = self.gemm_st();
        let mut calls: BTreeSet<WarmCall> = BTreeSet::new();
        let align = expert_row_align();
        for op in &self.rp.ops {
            let Some(g) = op.kind.expert_gemm() else { continue };
            let d = self.rp.buffer(g.x);
            if !d.dynamic || g.n_local == 0 || g.d_in == 0 {
                continue;
            }
            let bound = d.elems / (g.n_local * g.d_in);
            let rows_at = |share: f64| aligned_rows(((bound as f64 * share.min(1.0)).ceil() as usize).max(1), bound, align);
            let (mean, block) = (rows_at(load), rows_at(load * WARM_IMBALANCE));
            let mut used = vec![mean; g.n_local];
            used[0] = block;
            let per_expert_now = self.per_expert(&used, block, g.d_in, g.d_out, g.gemms, g.calls());
            let largest_block = rows_at(load * WARM_BLOCK_MAX);
            // The executor's calls of this op at `rows` rows per call, `batch` calls at once.
            let mut add = |rows: usize, batch: usize| {
                let call = |form, m, k, n, out: BufId, accumulate| WarmCall { form, m, k, n, c_f32: self.st(out) == Storage::F32, accumulate, batch };
                match &op.kind {
                    OpKind::ExpertLinear { y, .. } | OpKind::ExpertLinearPart { y, .. } => {
                        calls.insert(call(0, rows, g.d_in, g.d_out, *y, false));
                    }
                    OpKind::ExpertLinearBwd { dx, dw, .. } | OpKind::ExpertLinearPartBwd { dx, dw, .. } => {
                        calls.insert(call(1, rows, g.d_out, g.d_in, *dx, false));
                        calls.insert(call(2, g.d_in, rows, g.d_out, *dw, false));
                    }
                    OpKind::ExpertLinearBwdAcc { dx, dw, accumulate, .. } => {
                        calls.insert(call(1, rows, g.d_out, g.d_in, *dx, false));
                        calls.insert(call(2, g.d_in, rows, g.d_out, *dw, *accumulate));
                    }
                    _ => {}
                }
            };
            // The row buckets from `from` rows up to `to`.
            let buckets = |from: usize, to: usize| {
                let mut out = Vec::new();
                let mut u = from;
                while u <= to {
                    let r = aligned_rows(u, bound, align);
                    out.push(r);
                    u = r + 1;
                }
                out
            };
            if dropless_gemms() != Some(false) {
                for r in buckets(1, if per_expert_now { bound } else { largest_block }) {
                    add(r, 1);
                }
            }
            if dropless_gemms() != Some(true) {
                for r in buckets(mean, largest_block) {
                    add(r, g.n_local);
                }
            }
        }
        if calls.is_empty() {
            return Ok(0);
        }
        let most = |f: fn(&WarmCall) -> usize| calls.iter().map(f).max().unwrap_or(1);
        let bytes = [most(|c| c.batch * c.m * c.k) * gs.size(), most(|c| c.batch * c.k * c.n) * gs.size(), most(|c| c.batch * c.m * c.n) * 4];
        let bufs = bytes.iter().map(|&b| self.scratch(b)).collect::<Result<Vec<u64>, _>>()?;
        for (&ptr, &b) in bufs.iter().zip(&bytes) {
            // SAFETY: each scratch buffer holds b bytes.
            unsafe { result::memset_d8_async(ptr, 0, b, self.cu()) }.map_err(GpuError::driver("cuMemsetD8Async"))?;
        }
        for c in &calls {
            let c_st = if c.c_f32 { Storage::F32 } else { gs };
            let form = [GemmForm::Nn, GemmForm::Nt, GemmForm::Tn][c.form];
            // Every form's operands are [m, k], [k, n] and [m, n] per product, back to back.
            let batch = (c.batch > 1).then_some(Batch { count: c.batch, a_stride: c.m * c.k, b_stride: c.k * c.n, c_stride: c.m * c.n });
            self.gemm(form, bufs[0], bufs[1], bufs[2], c_st, c.m, c.k, c.n, if c.accumulate { 1.0 } else { 0.0 }, batch)?;
        }
        for ptr in bufs {
            self.scratch_free(ptr)?;
        }
        self.sync()?;
        self.first_sync.set(None);
        Ok(calls.len())
    }

    /// GEMM rows for an expert block with `used` real rows out of `rows`: `used` rounded up
    /// by [`aligned_rows`] to [`expert_row_align`] (at most `rows`). The rows past `used` are zero in every
    /// operand (fresh, zeroed allocations; layouts write zero rows), so the extra rows compute
    /// zeros; the rounding keeps the number of distinct GEMM shapes small, since cuBLAS picks
    /// an algorithm per new shape on the host and routing changes every step.
    fn gemm_rows(used: usize, rows: usize) -> usize {
        aligned_rows(used, rows, expert_row_align())
    }

    /// Records that `id` holds data in the first `used[e]` rows of each expert block.
    fn set_expert_fill(&self, id: BufId, used: &[usize], rows: usize) {
        lock(self.store).set_fill(id, Arc::new(prefix_fill(used, rows)));
    }

    #[allow(clippy::too_many_arguments)]
    fn expert_fwd(&self, x: BufId, w: BufId, bias: Option<BufId>, y: BufId, n_local: usize, d_in: usize, d_out: usize) -> Result<(), ExecError> {
        let gs = self.gemm_st();
        let (xb, wb) = (self.input_as(x, gs)?, self.input_as(w, gs)?);
        let rows = xb.len / (n_local * d_in);
        let y_st = self.st(y);
        let calls = 1 + bias.is_some() as usize;
        let per_expert = self.expert_rows(&[x], n_local, rows).filter(|u| self.per_expert(u, rows, d_in, d_out, 1, calls));
        // The batched GEMM writes every element of y (beta = 0): no zeroing pass.
        let yb = if per_expert.is_some() || zero_expert_outputs() { self.output(y, n_local * rows * d_out)? } else { self.output_unzeroed(y, n_local * rows * d_out, false)? };
        match per_expert {
            // Dropless: each expert's real rows; the rest of y stays zero (fresh allocation),
            // bias included, which no later op reads (the unlayout takes real rows only).
            // Otherwise one batched GEMM over whole blocks (capacity plans, or dropless blocks
            // whose padding costs less than the per-expert calls): y has no fill then, so the
            // ops after it run batched too, and its padded rows (bias) are never read back.
            Some(used) => {
                let (ab, cb) = (gs.size(), y_st.size());
                let bb = match bias {
                    Some(b) => Some(self.input_as(b, Storage::F32)?),
                    None => None,
                };
                for (e, &u) in used.iter().enumerate().filter(|(_, &u)| u > 0) {
                    let (xo, yo) = ((e * rows * d_in * ab) as u64, (e * rows * d_out * cb) as u64);
                    let m = Self::gemm_rows(u, rows);
                    self.gemm(GemmForm::Nn, xb.ptr + xo, wb.ptr + (e * d_in * d_out * ab) as u64, yb.ptr + yo, y_st, m, d_in, d_out, 0.0, None)?;
                    if let Some(bb) = bb {
                        let bo = (e * d_out * 4) as u64;
                        self.launch_st("add_bias_rows", y_st, self.grid(u * d_out), &[Arg::P(yb.ptr + yo), Arg::P(bb.ptr + bo), Arg::I64(u as i64), Arg::I32(d_out as i32), Arg::I64(u as i64)])?;
                    }
                }
                if let Some(bb) = bb {
                    self.done(bb)?;
                }
                self.set_expert_fill(y, &used, rows);
            }
            None => {
                let batch = Batch { count: n_local, a_stride: rows * d_in, b_stride: d_in * d_out, c_stride: rows * d_out };
                self.gemm(GemmForm::Nn, xb.ptr, wb.ptr, yb.ptr, y_st, rows, d_in, d_out, 0.0, Some(batch))?;
                if let Some(b) = bias {
                    let bb = self.input_as(b, Storage::F32)?;
                    let n = n_local * rows * d_out;
                    if n > 0 {
                        self.launch_st("add_bias_rows", y_st, self.grid(n), &[Arg::P(yb.ptr), Arg::P(bb.ptr), Arg::I64((n_local * rows) as i64), Arg::I32(d_out as i32), Arg::I64(rows.max(1) as i64)])?;
                    }
                    self.done(bb)?;
                }
            }
        }
        self.done(xb)?;
        self.done(wb)
    }

    #[allow(clippy::too_many_arguments)]
    fn expert_bwd(&self, x: BufId, w: BufId, dy: BufId, dx: BufId, dw: BufId, dbias: Option<BufId>, n_local: usize, d_in: usize, d_out: usize, accumulate: bool) -> Result<(), ExecError> {
        let gs = self.gemm_st();
        let (xb, wb, dyb) = (self.input_as(x, gs)?, self.input_as(w, gs)?, self.input_as(dy, gs)?);
        let rows = xb.len / (n_local * d_in);
        let per_expert = self.expert_rows(&[x, dy], n_local, rows).filter(|u| self.per_expert(u, rows, d_in, d_out, 2, 2));
        // The batched GEMMs write every element of dx and dw (beta = 0 unless accumulating),
        // the per-expert ones every expert's dw that received rows: no zeroing pass there.
        let dxb = if per_expert.is_some() || zero_expert_outputs() { self.output(dx, xb.len)? } else { self.output_unzeroed(dx, xb.len, false)? };
        let dw_written = rows > 0 && !zero_expert_outputs() && per_expert.as_ref().is_none_or(|u| u.iter().all(|&r| r > 0));
        let dwb = if accumulate {
            self.input(dw)?
        } else if dw_written {
            self.output_unzeroed(dw, n_local * d_in * d_out, false)?
        } else {
            self.output(dw, n_local * d_in * d_out)?
        };
        let beta = if accumulate { 1.0 } else { 0.0 };
        match per_expert {
            // Dropless: rows past each expert's last real row are zero in x and dy, so they
            // add nothing to dw and their dx rows stay zero (fresh allocation).
            Some(used) => {
                let (ab, xs, ws) = (gs.size(), self.st(dx).size(), self.st(dw).size());
                for (e, &u) in used.iter().enumerate().filter(|(_, &u)| u > 0) {
                    let (xo, yo) = ((e * rows * d_in * ab) as u64, (e * rows * d_out * ab) as u64);
                    let (wo, m) = ((e * d_in * d_out * ab) as u64, Self::gemm_rows(u, rows));
                    self.gemm(GemmForm::Nt, dyb.ptr + yo, wb.ptr + wo, dxb.ptr + (e * rows * d_in * xs) as u64, self.st(dx), m, d_out, d_in, 0.0, None)?;
                    self.gemm(GemmForm::Tn, xb.ptr + xo, dyb.ptr + yo, dwb.ptr + (e * d_in * d_out * ws) as u64, self.st(dw), d_in, m, d_out, beta, None)?;
                }
                self.set_expert_fill(dx, &used, rows);
            }
            None => {
                let bx = Batch { count: n_local, a_stride: rows * d_out, b_stride: d_in * d_out, c_stride: rows * d_in };
                self.gemm(GemmForm::Nt, dyb.ptr, wb.ptr, dxb.ptr, self.st(dx), rows, d_out, d_in, 0.0, Some(bx))?;
                let bw = Batch { count: n_local, a_stride: rows * d_in, b_stride: rows * d_out, c_stride: d_in * d_out };
                self.gemm(GemmForm::Tn, xb.ptr, dyb.ptr, dwb.ptr, self.st(dw), d_in, rows, d_out, beta, Some(bw))?;
            }
        }
        if let Some(db) = dbias {
            if self.st(db) != Storage::F32 {
                return Err(ExecError::Plan(format!("bias gradient {} is not stored f32", lock(self.store).desc(db).name)));
            }
            let dbb = if accumulate { self.input(db)? } else { self.output(db, n_local * d_out)? };
            self.col_sums(dyb.ptr, gs, dbb.ptr, rows, d_out, n_local, accumulate)?;
        }
        for v in [xb, wb, dyb] {
            self.done(v)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn combine(&self, back: BufId, slots: BufId, weights: BufId, residual: Option<BufId>, out: BufId, tokens: usize, k: usize, m: usize) -> Result<(), ExecError> {
        let st = self.st(out);
        let (bb, sb, wb) = (self.input_as(back, st)?, self.input(slots)?, self.input_as(weights, Storage::F32)?);
        let res = match residual {
            Some(r) => Some(self.input_as(r, st)?),
            None => None,
        };
        let ob = self.output(out, tokens * m)?;
        self.launch_st("combine_fwd", st, self.grid(tokens * m), &[Arg::P(bb.ptr), Arg::P(sb.ptr), Arg::P(wb.ptr), Arg::P(res.map_or(0, |r| r.ptr)), Arg::P(ob.ptr), Arg::I64(tokens as i64), Arg::I32(k as i32), Arg::I32(m as i32)])?;
        for v in [Some(bb), Some(wb), res].into_iter().flatten() {
            self.done(v)?;
        }
        Ok(())
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
        ChunkLayout { recv, gathered, dims, .. } | TpLayout { recv, gathered, dims, .. } => (vec![Some(*recv)], vec![*gathered], dims),
        ChunkUnlayout { input, gathered, dims, .. }
        | TpUnlayout { input, gathered, dims, .. }
        | LocalUnlayout { input, gathered, dims, .. } => (vec![Some(*input)], vec![*gathered], dims),
        ChunkSlice { src, slots, gathered, dims, .. } => (vec![Some(*src)], slots.iter().copied().chain([*gathered]).collect(), dims),
        ChunkMerge { part, full, first, gathered, dims, .. } => (vec![Some(*part), if *first { None } else { Some(*full) }], vec![*gathered], dims),
        TpMerge { parts, gathered, dims, .. } => (vec![Some(*parts)], vec![*gathered], dims),
        LocalLayout { send, gathered, dims, .. } => (vec![Some(*send)], vec![*gathered], dims),
        _ => return None,
    })
}

/// Rows in use per expert block of `[n_local, rows, ..]` buffers whose filled rows are
/// `fills` (one flag per row each): the highest filled row of each block over all of them,
/// plus one. `None` when a fill does not cover `n_local * rows` rows.
pub fn rows_in_use(fills: &[&[bool]], n_local: usize, rows: usize) -> Option<Vec<usize>> {
    let mut used = vec![0usize; n_local];
    for f in fills {
        if f.len() != n_local * rows {
            return None;
        }
        for (e, u) in used.iter_mut().enumerate() {
            let block = &f[e * rows..(e + 1) * rows];
            *u = (*u).max(block.iter().rposition(|&b| b).map_or(0, |r| r + 1));
        }
    }
    Some(used)
}

/// Smallest row multiple the dropless per-expert GEMMs round their real rows up to:
/// `MOELAB_EXPERT_ROW_ALIGN` when set to a positive integer (1 turns the rounding off, for A/B
/// timing), else [`DROPLESS_ROW_ALIGN`], the multiple the layouts size dropless blocks by.
/// Read once per process.
pub fn expert_row_align() -> usize {
    static ALIGN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *ALIGN.get_or_init(|| {
        std::env::var("MOELAB_EXPERT_ROW_ALIGN").ok().and_then(|v| v.trim().parse().ok()).filter(|&a: &usize| a > 0).unwrap_or(DROPLESS_ROW_ALIGN)
    })
}

/// The fullest expert's load over the mean that [`StreamExec::warm_expert_shapes`] assumes
/// when it asks whether a dropless op runs per expert (the bench plans measured 1.24-1.28).
pub const WARM_IMBALANCE: f64 = 1.25;

/// The fullest expert's load over the mean up to which [`StreamExec::warm_expert_shapes`]
/// warms batched block shapes (and per-expert shapes of ops that run batched at the expected
/// load): the session-10 runs reached 1.52 after ten steps.
pub const WARM_BLOCK_MAX: f64 = 2.0;

/// One GEMM call of [`StreamExec::warm_expert_shapes`], in the executor's argument order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct WarmCall {
    /// Index into `[Nn, Nt, Tn]`.
    form: usize,
    m: usize,
    k: usize,
    n: usize,
    /// The output is stored f32.
    c_f32: bool,
    /// beta = 1 (the output is added to).
    accumulate: bool,
    /// Products per call (1: one expert's rows; else a strided batch over whole blocks).
    batch: usize,
}

/// A buffer's values on the host as `T` (checked when made), shared with the store's copy.
pub(super) struct HostVals<T>(Arc<Data>, std::marker::PhantomData<T>);

impl std::ops::Deref for HostVals<f32> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match &*self.0 {
            Data::F32(v) => v,
            Data::I32(_) => unreachable!("made from f32 data"),
        }
    }
}

impl std::ops::Deref for HostVals<i32> {
    type Target = [i32];
    fn deref(&self) -> &[i32] {
        match &*self.0 {
            Data::I32(v) => v,
            Data::F32(_) => unreachable!("made from i32 data"),
        }
    }
}

/// The largest buffer (elements) whose host copy the store keeps: routing tables, slots and
/// counts are far smaller; a whole activation read back for inspection is not kept.
pub const HOST_COPY_MAX_ELEMS: usize = 1 << 22;

/// Whether [`StreamExec::download`] keeps host copies of what it reads (and uploads of
/// integers keep theirs): on unless `MOELAB_HOST_COPIES=0`, which makes every read of a
/// routing table copy it down and wait for the stream, as executors before 2026-11-24 (the
/// twelfth session) did (same-binary A/B runs).
pub fn host_copies() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MOELAB_HOST_COPIES").map_or(true, |v| v != "0"))
}

/// `MOELAB_ZERO_EXPERT_OUTPUTS=1`: zero every expert GEMM output before the GEMMs write it,
/// as executors before 2026-11-24 did (same-binary A/B runs of the saved passes).
fn zero_expert_outputs() -> bool {
    static ZERO: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| std::env::var("MOELAB_ZERO_EXPERT_OUTPUTS").is_ok_and(|v| v == "1"))
}

/// `MOELAB_DROPLESS_GEMMS`: `per-expert` (Some(true)), `batched` (Some(false)), else the
/// cost rule (None).
fn dropless_gemms() -> Option<bool> {
    static FORCED: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| match std::env::var("MOELAB_DROPLESS_GEMMS").as_deref() {
        Ok("per-expert") => Some(true),
        Ok("batched") => Some(false),
        _ => None,
    })
}

/// Row flags of a `[blocks, rows, ..]` buffer whose block `e` holds data in its first
/// `used[e]` rows.
pub fn prefix_fill(used: &[usize], rows: usize) -> Vec<bool> {
    used.iter().flat_map(|&u| (0..rows).map(move |r| r < u)).collect()
}

fn act_kind(a: Activation) -> i32 {
    match a {
        Activation::Gelu => 0,
        Activation::Relu => 1,
    }
}


const _: () = assert!(BLOCK == 256, "mse's shared reduction assumes 256 threads");

#[cfg(test)]
mod tests {
    use super::{prefix_fill, rows_in_use};

    #[test]
    fn rows_in_use_take_each_blocks_last_filled_row_over_every_buffer() {
        // Two experts of 4 rows: expert 0 holds rows 0-1, expert 1 rows 0 and 2 (a hole).
        let x = [true, true, false, false, true, false, true, false];
        assert_eq!(rows_in_use(&[&x], 2, 4), Some(vec![2, 3]));
        // A second operand filled further in expert 0 widens it; empty experts give 0.
        let dy = [true, true, true, false, false, false, false, false];
        assert_eq!(rows_in_use(&[&x, &dy], 2, 4), Some(vec![3, 3]));
        assert_eq!(rows_in_use(&[&[false; 8]], 2, 4), Some(vec![0, 0]));
        // A fill of another shape is not used.
        assert_eq!(rows_in_use(&[&x[..6]], 2, 4), None);
        assert_eq!(prefix_fill(&[2, 3], 4), vec![true, true, false, false, true, true, true, false]);
        assert_eq!(rows_in_use(&[&prefix_fill(&[2, 3], 4)], 2, 4), Some(vec![2, 3]));
    }
}
