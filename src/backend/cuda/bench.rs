//! `moelab bench`: one MoE layer's forward and backward on one GPU in bf16 (f32 accumulation),
//! expert GEMMs through cuBLAS, one call per expert or one grouped call per stage
//! ([`ExpertGemm`]; both are measured in the same run), against a dense 8192^3 bf16 cuBLAS GEMM measured in
//! the same run. Reports the expert GEMMs' TFLOP/s over the whole layer's time (gate, routing,
//! permutation, both expert GEMMs, activation, combine and all their gradients included), its
//! ratio to the dense GEMM, and the time per stage.
//!
//! Routing runs on the device (softmax and top-k); the per-expert offsets and the slot of
//! every assignment are computed on the host from the downloaded choices (a few hundred KB),
//! inside the timed region. Capacity follows moelab's rule: per expert, first choices before
//! second choices, in token order; assignments beyond the capacity drop.

use super::gpu::{Gpu, GpuStream};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{result, CudaEvent, LaunchConfig, PushKernelArg};
use moelab_kernels::error::GpuError;
use moelab_kernels::gemm::bf16_gemm_raw;
use moelab_kernels::grouped::{bf16_grouped_gemm_raw, grouped_scratch_bytes, GroupedProblem};
use moelab_kernels::lt_gemm::{Epilogue, LtGemm};
use std::cell::RefCell;
use moelab_kernels::{GemmDims, GemmForm};
use serde::Serialize;

/// One benchmark configuration (tokens per GPU T).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BenchConfig {
    /// Name, e.g. `mixtral-ish`.
    pub name: &'static str,
    /// Model width d.
    pub d: usize,
    /// Expert hidden size f.
    pub f: usize,
    /// Experts E.
    pub e: usize,
    /// Experts per token k.
    pub k: usize,
    /// Tokens T.
    pub tokens: usize,
}

/// The three configurations.
pub const CONFIGS: [BenchConfig; 3] = [
    BenchConfig { name: "mixtral-ish", d: 4096, f: 14336, e: 8, k: 2, tokens: 16384 },
    BenchConfig { name: "fine-grained", d: 2048, f: 1408, e: 64, k: 6, tokens: 16384 },
    BenchConfig { name: "small-tokens", d: 4096, f: 14336, e: 8, k: 2, tokens: 2048 },
];

/// The stages of the layer, in order.
pub const STAGES: [&str; 13] = [
    "gate", "route", "permute", "expert_gemm1", "act", "expert_gemm2", "combine", "combine_bwd", "expert_gemm2_bwd", "act_bwd",
    "expert_gemm1_bwd", "unpermute_bwd", "gate_bwd",
];

/// How the expert GEMMs of a stage are issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExpertGemm {
    /// One `cublasGemmEx` per expert with rows (cuBLAS picks a kernel per shape).
    PerExpert,
    /// One `cublasGemmGroupedBatchedEx` over all experts with rows (one launch per stage).
    Grouped,
    /// Per expert through cuBLASLt, each shape's algorithm picked by timing the heuristic's
    /// candidates at its first call (during warm-up).
    LtTuned,
    /// As [`ExpertGemm::LtTuned`], with GELU fused into the first GEMM's epilogue (which also
    /// stores the pre-activation) and its gradient into the epilogue of `dy w2^T`.
    FusedGelu,
    /// As [`ExpertGemm::PerExpert`], the experts of a stage alternating between two streams
    /// (each with its own cuBLAS handle), so one expert's last wave of tiles overlaps the
    /// next expert's first.
    TwoStreams,
}

impl ExpertGemm {
    /// Every mode, in the order the benchmark measures them.
    pub const ALL: [ExpertGemm; 5] = [ExpertGemm::PerExpert, ExpertGemm::TwoStreams, ExpertGemm::Grouped, ExpertGemm::LtTuned, ExpertGemm::FusedGelu];

    /// `per-expert`, `two-streams`, `grouped`, `lt-tuned` or `fused-gelu`.
    pub fn name(self) -> &'static str {
        match self {
            ExpertGemm::PerExpert => "per-expert",
            ExpertGemm::Grouped => "grouped",
            ExpertGemm::LtTuned => "lt-tuned",
            ExpertGemm::FusedGelu => "fused-gelu",
            ExpertGemm::TwoStreams => "two-streams",
        }
    }
}

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    /// The configuration.
    pub config: BenchConfig,
    /// How the expert GEMMs were issued.
    pub gemm: ExpertGemm,
    /// `dropless` or the capacity factor.
    pub capacity: String,
    /// Kept assignments (rows through the experts).
    pub rows: usize,
    /// Dropped assignments.
    pub dropped: usize,
    /// Median layer time (forward + backward), ms.
    pub layer_ms: f64,
    /// Expert GEMM FLOPs per step (12 rows d f).
    pub expert_flops: f64,
    /// Expert GEMM FLOPs over the layer time.
    pub tflops: f64,
    /// `tflops` over [`BenchRow::dense_tflops`].
    pub ratio: f64,
    /// The dense GEMM's TFLOP/s this row is held against: the higher of the run's first
    /// measurement and one taken right before the row.
    pub dense_tflops: f64,
    /// Mean time per stage, ms, in [`STAGES`] order.
    pub stages_ms: Vec<(String, f64)>,
}

/// The whole benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The benchmark's bf16 kernels against the cpu definition (fresh inputs every run).
    pub kernel_checks: Vec<KernelCheck>,
    /// Configurations whose alternative expert-GEMM path failed (the error), e.g. a cuBLAS
    /// without grouped GEMM or without the GELU epilogue for a shape.
    pub failures: Vec<String>,
    /// GPU name.
    pub device: String,
    /// When it ran (UTC).
    pub date: String,
    /// Dense bf16 8192^3 GEMM, TFLOP/s (median of the reps).
    pub dense_tflops: f64,
    /// Timed repetitions per configuration (after warm-up).
    pub reps: usize,
    /// One row per configuration and capacity.
    pub rows: Vec<BenchRow>,
}

/// A stream-ordered device allocation (pointer, stream), freed on drop.
pub(super) struct Buf(pub(super) u64, u64);

impl Buf {
    /// `bytes` on stream `s`.
    pub(super) fn new(s: &GpuStream, bytes: usize) -> Result<Buf, GpuError> {
        let cu = s.stream.cu_stream();
        // SAFETY: the stream is live; the buffer is freed in Drop on the same stream.
        let p = unsafe { result::malloc_async(cu, bytes.max(16)) }.map_err(GpuError::driver("cuMemAllocAsync"))?;
        Ok(Buf(p, cu as u64))
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_async on this stream, freed once.
        unsafe {
            let _ = result::free_async(self.0, self.1 as _);
        }
    }
}

/// A kernel argument of [`launch`].
#[derive(Clone, Copy)]
pub(super) enum A {
    P(u64),
    I64(i64),
    I32(i32),
    U32(u32),
    F32(f32),
}

/// Launches a kernel of the executor's module on `s`.
pub(super) fn launch(gpu: &Gpu, s: &GpuStream, name: &'static str, cfg: LaunchConfig, args: &[A]) -> Result<(), GpuError> {
    let f = gpu.func(name);
    let mut b = s.stream.launch_builder(f);
    for a in args {
        match a {
            A::P(x) => b.arg(x),
            A::I64(x) => b.arg(x),
            A::I32(x) => b.arg(x),
            A::U32(x) => b.arg(x),
            A::F32(x) => b.arg(x),
        };
    }
    // SAFETY: each call site passes the kernel's parameters in order, with live buffers of
    // the sizes the kernel addresses.
    unsafe { b.launch(cfg) }.map_err(|source| GpuError::Launch { kernel: name, source })?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn gemm(s: &GpuStream, form: GemmForm, a: u64, b: u64, c: u64, m: usize, k: usize, n: usize, beta: f32, c_f32: bool) -> Result<(), GpuError> {
    // SAFETY: call sites size a, b, c for the form (bf16 operands, bf16 or f32 result).
    unsafe { bf16_gemm_raw(s.blas, form, a, b, c, GemmDims { m, k, n }, beta, c_f32) }
}

/// Workspace of the cuBLASLt calls (fused mode).
const LT_WORKSPACE: usize = 32 << 20;

/// One block of 128 threads per row (rows > 0).
fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.clamp(1, i32::MAX as usize) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }
}

/// Median TFLOP/s of a dense bf16 `n^3` GEMM over `reps` after warm-up.
pub fn dense_gemm_tflops(gpu: &Gpu, s: &GpuStream, n: usize, reps: usize) -> Result<f64, GpuError> {
    let (a, b, c) = (Buf::new(s, n * n * 2)?, Buf::new(s, n * n * 2)?, Buf::new(s, n * n * 2)?);
    for buf in [&a, &b] {
        launch(gpu, s, "bf16_fill_hash", gpu.grid(n * n), &[A::P(buf.0), A::I64((n * n) as i64), A::U32(7), A::F32(0.05)])?;
    }
    let ev = |gpu: &Gpu| gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(GpuError::driver("cuEventCreate"));
    for _ in 0..3 {
        gemm(s, GemmForm::Nn, a.0, b.0, c.0, n, n, n, 0.0, false)?;
    }
    let mut times = Vec::new();
    for _ in 0..reps {
        let (e0, e1) = (ev(gpu)?, ev(gpu)?);
        e0.record(&s.stream).map_err(GpuError::driver("cuEventRecord"))?;
        gemm(s, GemmForm::Nn, a.0, b.0, c.0, n, n, n, 0.0, false)?;
        e1.record(&s.stream).map_err(GpuError::driver("cuEventRecord"))?;
        e1.synchronize().map_err(GpuError::driver("cuEventSynchronize"))?;
        times.push(e0.elapsed_ms(&e1).map_err(GpuError::driver("cuEventElapsedTime"))? as f64);
    }
    times.sort_by(f64::total_cmp);
    let ms = times[times.len() / 2];
    Ok(2.0 * (n as f64).powi(3) / (ms * 1e-3) / 1e12)
}

/// Slots of every assignment (`-1` dropped) into `slots` and the source token of every expert
/// row into `map`, computed on the device from the choices `idx[T, k]` (`route_hist`,
/// `route_slots`: the rule of [`route_rows`]); returns the kept rows per expert, the one
/// download the per-expert GEMM sizes need.
#[allow(clippy::too_many_arguments)]
fn device_slots(gpu: &Gpu, s: &GpuStream, idx: &Buf, cnt: &Buf, slots: &Buf, map: &Buf, t: usize, k: usize, e: usize, capacity: Option<usize>) -> Result<Vec<usize>, GpuError> {
    let cu = s.stream.cu_stream();
    // SAFETY: cnt holds e i32.
    unsafe { result::memset_d8_async(cnt.0, 0, e * 4, cu) }.map_err(GpuError::driver("cuMemsetD8Async"))?;
    let hist = LaunchConfig { shared_mem_bytes: (e * 4) as u32, ..gpu.grid(t * k) };
    launch(gpu, s, "route_hist", hist, &[A::P(idx.0), A::P(cnt.0), A::I64((t * k) as i64), A::I32(e as i32)])?;
    let cap = capacity.map_or(-1, |c| c.min(i32::MAX as usize) as i32);
    let cfg = LaunchConfig { grid_dim: (e as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
    launch(gpu, s, "route_slots", cfg, &[A::P(idx.0), A::P(cnt.0), A::P(slots.0), A::P(map.0), A::I64(t as i64), A::I32(k as i32), A::I32(cap)])?;
    let counts: Vec<i32> = down(s, cnt, e)?;
    Ok(counts.into_iter().map(|c| (c.max(0) as usize).min(capacity.unwrap_or(usize::MAX))).collect())
}

/// Slots of every assignment (`-1` dropped), the source token of every expert row, and the
/// rows per expert, from the choices `idx[T, k]` (host reference of `route_slots`).
pub fn route_rows(idx: &[i32], e: usize, k: usize, capacity: Option<usize>) -> (Vec<i32>, Vec<i32>, Vec<usize>) {
    let t = idx.len() / k;
    let cap = capacity.unwrap_or(usize::MAX);
    // Pass 1: kept rows per expert, choice-major then token order.
    let mut counts = vec![0usize; e];
    let mut keep = vec![false; idx.len()];
    for j in 0..k {
        for tok in 0..t {
            let a = tok * k + j;
            let x = idx[a] as usize;
            if counts[x] < cap {
                counts[x] += 1;
                keep[a] = true;
            }
        }
    }
    // Pass 2: slots in the same order, from each expert's offset.
    let mut next: Vec<usize> = counts.iter().scan(0, |o, &c| {
        let start = *o;
        *o += c;
        Some(start)
    }).collect();
    let total: usize = counts.iter().sum();
    let mut slots = vec![-1i32; idx.len()];
    let mut map = vec![0i32; total];
    for j in 0..k {
        for tok in 0..t {
            let a = tok * k + j;
            if keep[a] {
                let x = idx[a] as usize;
                slots[a] = next[x] as i32;
                map[next[x]] = tok as i32;
                next[x] += 1;
            }
        }
    }
    (slots, map, counts)
}

/// Measures one configuration: `warmup` untimed steps, then `reps` timed ones.
#[allow(clippy::too_many_arguments)]
pub fn bench_config(gpu: &Gpu, s: &GpuStream, cfg: BenchConfig, capacity_factor: Option<f64>, gemm_mode: ExpertGemm, reps: usize, warmup: usize, dense_tflops: f64) -> Result<BenchRow, GpuError> {
    let BenchConfig { d, f, e, k, tokens: t, .. } = cfg;
    let capacity = capacity_factor.map(|cf| ((cf * (k * t) as f64 / e as f64).ceil() as usize).max(1));
    let nmax = t * k;
    let bf = 2usize;
    let x = Buf::new(s, t * d * bf)?;
    let wg = Buf::new(s, d * e * bf)?;
    let w1 = Buf::new(s, e * d * f * bf)?;
    let w2 = Buf::new(s, e * f * d * bf)?;
    let dout = Buf::new(s, t * d * bf)?;
    let fill = |b: &Buf, n: usize, seed: u32, scale: f32| launch(gpu, s, "bf16_fill_hash", gpu.grid(n), &[A::P(b.0), A::I64(n as i64), A::U32(seed), A::F32(scale)]);
    fill(&x, t * d, 1, 1.0)?;
    fill(&wg, d * e, 2, 0.02)?;
    fill(&w1, e * d * f, 3, 0.02)?;
    fill(&w2, e * f * d, 4, 0.02)?;
    fill(&dout, t * d, 5, 1e-3)?;
    let logits = Buf::new(s, t * e * 4)?;
    let probs = Buf::new(s, t * e * 4)?;
    let idx = Buf::new(s, t * k * 4)?;
    let wts = Buf::new(s, t * k * 4)?;
    let slots = Buf::new(s, t * k * 4)?;
    let map = Buf::new(s, nmax * 4)?;
    let cnt = Buf::new(s, e * 4)?;
    let xp = Buf::new(s, nmax * d * bf)?;
    let h = Buf::new(s, nmax * f * bf)?;
    let act = Buf::new(s, nmax * f * bf)?;
    let y = Buf::new(s, nmax * d * bf)?;
    let out = Buf::new(s, t * d * bf)?;
    let dy = Buf::new(s, nmax * d * bf)?;
    let dact = Buf::new(s, nmax * f * bf)?;
    let dh = Buf::new(s, nmax * f * bf)?;
    let dw1 = Buf::new(s, e * d * f * bf)?;
    let dw2 = Buf::new(s, e * f * d * bf)?;
    let dxp = Buf::new(s, nmax * d * bf)?;
    let dx = Buf::new(s, t * d * bf)?;
    let dwts = Buf::new(s, t * k * 4)?;
    let dlogits = Buf::new(s, t * e * 4)?;
    let dlogits16 = Buf::new(s, t * e * bf)?;
    let dwg = Buf::new(s, d * e * bf)?;
    let zeros = Buf::new(s, e * 4)?;
    let ptr_scratch = Buf::new(s, grouped_scratch_bytes(e))?;
    let lt_ws = Buf::new(s, LT_WORKSPACE)?;
    let lt = RefCell::new(LtGemm::new(lt_ws.0, LT_WORKSPACE, true)?);
    let fused = gemm_mode == ExpertGemm::FusedGelu;
    let s2 = if gemm_mode == ExpertGemm::TwoStreams { Some(gpu.new_stream(false)?) } else { None };
    // SAFETY: zeros holds e f32 (the aux-loss gradient is left out of the benchmark).
    unsafe { result::memset_d8_async(zeros.0, 0, e * 4, s.stream.cu_stream()) }.map_err(GpuError::driver("cuMemsetD8Async"))?;
    let ev = || gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(GpuError::driver("cuEventCreate"));
    let mut totals = Vec::new();
    let mut stage_sum = vec![0.0f64; STAGES.len()];
    let mut rows = 0;
    for rep in 0..warmup + reps {
        let events: Vec<CudaEvent> = (0..=STAGES.len()).map(|_| ev()).collect::<Result<_, _>>()?;
        let mark = |i: usize| events[i].record(&s.stream).map_err(GpuError::driver("cuEventRecord"));
        mark(0)?;
        // gate: logits[T,E] (f32) = x wg
        gemm(s, GemmForm::Nn, x.0, wg.0, logits.0, t, d, e, 0.0, true)?;
        mark(1)?;
        // route: softmax + top-k on the device, slots on the host.
        launch(gpu, s, "route_topk", gpu.grid(t * 32), &[A::P(logits.0), A::P(probs.0), A::P(idx.0), A::P(wts.0), A::I64(t as i64), A::I32(e as i32), A::I32(k as i32), A::I32(1)])?;
        let counts = device_slots(gpu, s, &idx, &cnt, &slots, &map, t, k, e, capacity)?;
        let n: usize = counts.iter().sum();
        rows = n;
        mark(2)?;
        launch(gpu, s, "bf16_gather_rows", rows_cfg(n), &[A::P(x.0), A::P(map.0), A::P(xp.0), A::I64(n as i64), A::I32(d as i32)])?;
        mark(3)?;
        // The expert GEMMs of one stage: per expert with rows, or one grouped call; `epi`
        // (fused mode only) with its pre-activation rows at `aux` (row width f).
        let experts = |form: GemmForm, epi: Epilogue, aux: u64, each: &dyn Fn(usize, usize, usize) -> GroupedProblem| -> Result<(), GpuError> {
            let mut probs = Vec::with_capacity(e);
            let mut offs = Vec::with_capacity(e);
            let mut off = 0;
            for (ex, &c) in counts.iter().enumerate() {
                if c > 0 {
                    probs.push(each(ex, off, c));
                    offs.push(off);
                }
                off += c;
            }
            match gemm_mode {
                ExpertGemm::PerExpert => probs.iter().try_for_each(|p| gemm(s, form, p.a, p.b, p.c, p.dims.m, p.dims.k, p.dims.n, 0.0, false)),
                ExpertGemm::TwoStreams => {
                    // Fork: the second stream starts after everything issued so far on s;
                    // join: s goes on once the second stream's experts are done.
                    let s2 = s2.as_ref().expect("two-streams mode has a second stream");
                    let fork = ev()?;
                    fork.record(&s.stream).map_err(GpuError::driver("cuEventRecord"))?;
                    s2.stream.wait(&fork).map_err(GpuError::driver("cuStreamWaitEvent"))?;
                    for (i, p) in probs.iter().enumerate() {
                        gemm(if i % 2 == 0 { s } else { s2 }, form, p.a, p.b, p.c, p.dims.m, p.dims.k, p.dims.n, 0.0, false)?;
                    }
                    let join = ev()?;
                    join.record(&s2.stream).map_err(GpuError::driver("cuEventRecord"))?;
                    s.stream.wait(&join).map_err(GpuError::driver("cuStreamWaitEvent"))
                }
                // SAFETY: every problem addresses rows inside the stage's buffers (offsets from
                // counts); ptr_scratch holds 3e pointers; the handle is bound to s.
                ExpertGemm::Grouped => unsafe { bf16_grouped_gemm_raw(s.blas, s.stream.cu_stream(), form, &probs, 0.0, ptr_scratch.0) },
                ExpertGemm::LtTuned | ExpertGemm::FusedGelu => probs.iter().zip(&offs).try_for_each(|(p, &o)| {
                    // SAFETY: as above; aux rows o.. of width f lie inside h.
                    unsafe { lt.borrow_mut().gemm(s.stream.cu_stream(), form, p.a, p.b, p.c, p.dims, epi, aux + (o * f * bf) as u64) }
                }),
            }
        };
        let at = |base: u64, row: usize, width: usize| base + (row * width * bf) as u64;
        let dims = |m: usize, k: usize, n: usize| GemmDims { m, k, n };
        let none = Epilogue::None;
        if fused {
            // act = gelu(xp w1), h = xp w1 kept for the backward.
            experts(GemmForm::Nn, Epilogue::GeluAux, h.0, &|ex, off, c| GroupedProblem { a: at(xp.0, off, d), b: at(w1.0, ex * d, f), c: at(act.0, off, f), dims: dims(c, d, f) })?;
            mark(4)?;
        } else {
            experts(GemmForm::Nn, none, 0, &|ex, off, c| GroupedProblem { a: at(xp.0, off, d), b: at(w1.0, ex * d, f), c: at(h.0, off, f), dims: dims(c, d, f) })?;
            mark(4)?;
            launch(gpu, s, "act_fwd_bf16", gpu.grid(n * f / 8), &[A::P(h.0), A::P(act.0), A::I64((n * f) as i64), A::I32(0)])?;
        }
        mark(5)?;
        experts(GemmForm::Nn, none, 0, &|ex, off, c| GroupedProblem { a: at(act.0, off, f), b: at(w2.0, ex * f, d), c: at(y.0, off, d), dims: dims(c, f, d) })?;
        mark(6)?;
        launch(gpu, s, "bf16_combine", rows_cfg(t), &[A::P(y.0), A::P(slots.0), A::P(wts.0), A::P(out.0), A::I64(t as i64), A::I32(k as i32), A::I32(d as i32)])?;
        mark(7)?;
        launch(gpu, s, "bf16_combine_bwd_rows", rows_cfg(t * k), &[A::P(dout.0), A::P(slots.0), A::P(wts.0), A::P(dy.0), A::I64((t * k) as i64), A::I32(k as i32), A::I32(d as i32)])?;
        launch(gpu, s, "bf16_combine_bwd_weights", gpu.grid(t * k * 32), &[A::P(dout.0), A::P(y.0), A::P(slots.0), A::P(dwts.0), A::I64((t * k) as i64), A::I32(k as i32), A::I32(d as i32)])?;
        mark(8)?;
        if fused {
            // dh = gelu'(h) * (dy w2^T) in the epilogue.
            experts(GemmForm::Nt, Epilogue::DGelu, h.0, &|ex, off, c| GroupedProblem { a: at(dy.0, off, d), b: at(w2.0, ex * f, d), c: at(dh.0, off, f), dims: dims(c, d, f) })?;
        } else {
            experts(GemmForm::Nt, none, 0, &|ex, off, c| GroupedProblem { a: at(dy.0, off, d), b: at(w2.0, ex * f, d), c: at(dact.0, off, f), dims: dims(c, d, f) })?;
        }
        experts(GemmForm::Tn, none, 0, &|ex, off, c| GroupedProblem { a: at(act.0, off, f), b: at(dy.0, off, d), c: at(dw2.0, ex * f, d), dims: dims(f, c, d) })?;
        mark(9)?;
        if !fused {
            launch(gpu, s, "act_bwd_bf16", gpu.grid(n * f / 8), &[A::P(h.0), A::P(dact.0), A::P(dh.0), A::I64((n * f) as i64), A::I32(0)])?;
        }
        mark(10)?;
        experts(GemmForm::Nt, none, 0, &|ex, off, c| GroupedProblem { a: at(dh.0, off, f), b: at(w1.0, ex * d, f), c: at(dxp.0, off, d), dims: dims(c, f, d) })?;
        experts(GemmForm::Tn, none, 0, &|ex, off, c| GroupedProblem { a: at(xp.0, off, d), b: at(dh.0, off, f), c: at(dw1.0, ex * d, f), dims: dims(d, c, f) })?;
        mark(11)?;
        launch(gpu, s, "bf16_token_sum", rows_cfg(t), &[A::P(dxp.0), A::P(slots.0), A::P(dx.0), A::I64(t as i64), A::I32(k as i32), A::I32(d as i32)])?;
        mark(12)?;
        launch(gpu, s, "route_bwd", gpu.grid(t * 32), &[A::P(probs.0), A::P(idx.0), A::P(dwts.0), A::P(zeros.0), A::P(dlogits.0), A::I64(t as i64), A::I32(e as i32), A::I32(k as i32), A::I32(1)])?;
        launch(gpu, s, "f32_to_bf16_kernel", gpu.grid(t * e), &[A::P(dlogits.0), A::P(dlogits16.0), A::I64((t * e) as i64)])?;
        gemm(s, GemmForm::Tn, x.0, dlogits16.0, dwg.0, d, t, e, 0.0, false)?;
        gemm(s, GemmForm::Nt, dlogits16.0, wg.0, dx.0, t, e, d, 1.0, false)?;
        mark(13)?;
        events[13].synchronize().map_err(GpuError::driver("cuEventSynchronize"))?;
        if rep >= warmup {
            totals.push(events[0].elapsed_ms(&events[13]).map_err(GpuError::driver("cuEventElapsedTime"))? as f64);
            for (i, acc) in stage_sum.iter_mut().enumerate() {
                *acc += events[i].elapsed_ms(&events[i + 1]).map_err(GpuError::driver("cuEventElapsedTime"))? as f64;
            }
        }
    }
    s.stream.synchronize().map_err(GpuError::driver("cuStreamSynchronize"))?;
    totals.sort_by(f64::total_cmp);
    let layer_ms = totals[totals.len() / 2];
    let expert_flops = 12.0 * rows as f64 * d as f64 * f as f64;
    let tflops = expert_flops / (layer_ms * 1e-3) / 1e12;
    Ok(BenchRow {
        config: cfg,
        gemm: gemm_mode,
        capacity: capacity_factor.map_or("dropless".into(), |c| format!("{c}")),
        rows,
        dropped: t * k - rows,
        layer_ms,
        expert_flops,
        tflops,
        ratio: tflops / dense_tflops,
        dense_tflops,
        stages_ms: STAGES.iter().zip(&stage_sum).map(|(n, v)| (n.to_string(), v / reps as f64)).collect(),
    })
}

/// Runs every configuration in `names` (all when empty), dropless and with capacity 1.25,
/// once per expert-GEMM mode in `modes`.
pub fn run(ordinal: usize, names: &[String], modes: &[ExpertGemm], reps: usize, on_row: &mut dyn FnMut(&BenchRow)) -> Result<BenchReport, GpuError> {
    let gpu = Gpu::open(ordinal)?;
    gpu.ctx.bind_to_thread().map_err(GpuError::driver("cuCtxSetCurrent"))?;
    let s = gpu.new_stream(false)?;
    let kernel_checks = check_kernels(&gpu, &s, crate::backend::cuda::check::fresh_seed())?;
    let dense_tflops = dense_gemm_tflops(&gpu, &s, 8192, reps.max(5))?;
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for cfg in CONFIGS.iter().filter(|c| names.is_empty() || names.iter().any(|n| n == c.name)) {
        for cap in [None, Some(1.25)] {
            for &mode in modes {
                // The dense reference again right before the row; the ratio takes the higher of
                // it and the first measurement (clocks drift as the GPU warms: never flatter).
                let dense_here = dense_gemm_tflops(&gpu, &s, 8192, reps.max(5))?.max(dense_tflops);
                match bench_config(&gpu, &s, *cfg, cap, mode, reps, 2, dense_here) {
                    Ok(row) => {
                        on_row(&row);
                        rows.push(row);
                    }
                    // The alternative paths may be unsupported by this cuBLAS; say so and go on.
                    Err(err) if mode != ExpertGemm::PerExpert => {
                        s.stream.synchronize().map_err(GpuError::driver("cuStreamSynchronize"))?;
                        failures.push(format!("{} {} {}: {err}", cfg.name, cap.map_or("dropless".into(), |c| c.to_string()), mode.name()));
                    }
                    Err(err) => return Err(err),
                }
            }
        }
    }
    Ok(BenchReport { kernel_checks, failures, device: gpu.info.name.clone(), date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(), dense_tflops, reps, rows })
}

#[cfg(test)]
mod tests {
    use super::route_rows;

    #[test]
    fn routing_rows_follow_the_capacity_rule() {
        // 3 tokens, k = 2, 2 experts: choices (0,1), (0,1), (1,0).
        let idx = [0, 1, 0, 1, 1, 0];
        let (slots, map, counts) = route_rows(&idx, 2, 2, None);
        assert_eq!(counts, vec![3, 3]);
        assert_eq!(map.len(), 6);
        assert!(slots.iter().all(|&s| s >= 0));
        // Capacity 2: expert 0 keeps the first choices of tokens 0 and 1 and drops token 2's
        // second choice; expert 1 keeps token 2's first choice and token 0's second choice.
        let (slots, map, counts) = route_rows(&idx, 2, 2, Some(2));
        assert_eq!(counts, vec![2, 2]);
        assert_eq!(map, vec![0, 1, 2, 0]);
        assert_eq!(slots, vec![0, 3, 1, -1, 2, -1]);
    }
}

/// One bf16 kernel of the benchmark checked against the cpu semantics.
#[derive(Debug, Clone, Serialize)]
pub struct KernelCheck {
    /// `kernel[cols]` and the output's name.
    pub name: String,
    /// `||gpu - cpu|| / ||cpu||` (NaN fails).
    pub rel_err: f64,
    /// Below the bf16 tolerance (1e-2) and finite.
    pub passed: bool,
}

fn up<T: cudarc::driver::DeviceRepr>(s: &GpuStream, v: &[T]) -> Result<Buf, GpuError> {
    let b = Buf::new(s, std::mem::size_of_val(v))?;
    // SAFETY: b holds the bytes of v; pageable memory is staged before return.
    unsafe { result::memcpy_htod_async(b.0, v, s.stream.cu_stream()) }.map_err(GpuError::driver("cuMemcpyHtoDAsync"))?;
    Ok(b)
}

fn down<T: cudarc::driver::DeviceRepr + Default + Clone>(s: &GpuStream, b: &Buf, n: usize) -> Result<Vec<T>, GpuError> {
    let mut v = vec![T::default(); n];
    // SAFETY: b holds at least n values of T; synchronised right after.
    unsafe { result::memcpy_dtoh_async(&mut v, b.0, s.stream.cu_stream()) }.map_err(GpuError::driver("cuMemcpyDtoHAsync"))?;
    s.stream.synchronize().map_err(GpuError::driver("cuStreamSynchronize"))?;
    Ok(v)
}

/// Checks every bf16 kernel of the benchmark on fresh random inputs (from `seed`) against the
/// cpu definition, for a row width on the vector path (24) and one off it (20).
pub fn check_kernels(gpu: &Gpu, s: &GpuStream, seed: u64) -> Result<Vec<KernelCheck>, GpuError> {
    use crate::backend::cuda::check::compare;
    use crate::math::{activation, linalg, rng};
    use half::bf16;
    let round = |v: Vec<f32>| -> Vec<f32> { v.into_iter().map(|x| bf16::from_f32(x).to_f32()).collect() };
    let to16 = |v: &[f32]| -> Vec<u16> { v.iter().map(|x| bf16::from_f32(*x).to_bits()).collect() };
    let from16 = |v: Vec<u16>| -> Vec<f32> { v.into_iter().map(|x| bf16::from_bits(x).to_f32()).collect() };
    let normal = |tag: &str, n: usize| {
        let mut v = vec![0.0f32; n];
        rng::fill_normal(&mut rng::stream(seed, tag, n as u64, 0), &mut v, 1.0);
        round(v)
    };
    let mut out = Vec::new();
    // Integer outputs (routing slots) must match exactly; kept apart from the float checks.
    let mut exact = Vec::new();
    let mut push = |name: String, got: &[f32], want: &[f32]| {
        let (rel, _) = compare(got, want);
        out.push(KernelCheck { name, rel_err: rel, passed: rel.is_finite() && rel < 1e-2 });
    };
    let (t, k, e) = (37usize, 2usize, 5usize);
    for cols in [24usize, 20] {
        // Routing: random choices, capacity 12 so some assignments drop.
        let mut r = rng::stream(seed, "bench.check.idx", cols as u64, 0);
        let idx: Vec<i32> = (0..t * k).map(|_| (rand::RngExt::random::<u32>(&mut r) % e as u32) as i32).collect();
        let (slots, map, _) = route_rows(&idx, e, k, Some(12));
        let n = map.len();
        // Device slots against the host rule, with the capacity and dropless.
        for cap in [Some(12), None] {
            let (want_slots, want_map, want_counts) = route_rows(&idx, e, k, cap);
            let (ib, cb) = (up(s, &idx)?, Buf::new(s, e * 4)?);
            let (sb, mb) = (Buf::new(s, t * k * 4)?, Buf::new(s, t * k * 4)?);
            let counts = device_slots(gpu, s, &ib, &cb, &sb, &mb, t, k, e, cap)?;
            let got_slots: Vec<i32> = down(s, &sb, t * k)?;
            let got_map: Vec<i32> = down(s, &mb, want_map.len())?;
            let same = counts == want_counts && got_slots == want_slots && got_map == want_map;
            let label = cap.map_or("dropless".to_string(), |c| format!("cap{c}"));
            exact.push(KernelCheck { name: format!("route_slots[{t}x{k},{label},{cols}]"), rel_err: if same { 0.0 } else { 1.0 }, passed: same });
        }
        let x = normal("x", t * cols);
        let w: Vec<f32> = normal("w", t * k);
        // gather
        let (xb, mb) = (up(s, &to16(&x))?, up(s, &map)?);
        let yb = Buf::new(s, n * cols * 2)?;
        launch(gpu, s, "bf16_gather_rows", rows_cfg(n), &[A::P(xb.0), A::P(mb.0), A::P(yb.0), A::I64(n as i64), A::I32(cols as i32)])?;
        let want: Vec<f32> = map.iter().flat_map(|&m| x[m as usize * cols..(m as usize + 1) * cols].to_vec()).collect();
        push(format!("bf16_gather_rows[{cols}]"), &from16(down(s, &yb, n * cols)?), &want);
        // combine
        let back = normal("back", n * cols);
        let (bb, sb, wb) = (up(s, &to16(&back))?, up(s, &slots)?, up(s, &w)?);
        let ob = Buf::new(s, t * cols * 2)?;
        launch(gpu, s, "bf16_combine", rows_cfg(t), &[A::P(bb.0), A::P(sb.0), A::P(wb.0), A::P(ob.0), A::I64(t as i64), A::I32(k as i32), A::I32(cols as i32)])?;
        let mut want = vec![0.0f32; t * cols];
        for (a, &sl) in slots.iter().enumerate() {
            if sl >= 0 {
                for c in 0..cols {
                    want[(a / k) * cols + c] += w[a] * back[sl as usize * cols + c];
                }
            }
        }
        push(format!("bf16_combine[{cols}]"), &from16(down(s, &ob, t * cols)?), &want);
        // combine backward: rows and weights
        let dout = normal("dout", t * cols);
        let db = up(s, &to16(&dout))?;
        let dback = Buf::new(s, n * cols * 2)?;
        let dw = Buf::new(s, t * k * 4)?;
        launch(gpu, s, "bf16_combine_bwd_rows", rows_cfg(t * k), &[A::P(db.0), A::P(sb.0), A::P(wb.0), A::P(dback.0), A::I64((t * k) as i64), A::I32(k as i32), A::I32(cols as i32)])?;
        launch(gpu, s, "bf16_combine_bwd_weights", gpu.grid(t * k * 32), &[A::P(db.0), A::P(bb.0), A::P(sb.0), A::P(dw.0), A::I64((t * k) as i64), A::I32(k as i32), A::I32(cols as i32)])?;
        let (mut want_rows, mut want_w) = (vec![0.0f32; n * cols], vec![0.0f32; t * k]);
        for (a, &sl) in slots.iter().enumerate() {
            if sl >= 0 {
                for c in 0..cols {
                    want_rows[sl as usize * cols + c] = w[a] * dout[(a / k) * cols + c];
                    want_w[a] += dout[(a / k) * cols + c] * back[sl as usize * cols + c];
                }
            }
        }
        push(format!("bf16_combine_bwd_rows[{cols}]"), &from16(down(s, &dback, n * cols)?), &want_rows);
        push(format!("bf16_combine_bwd_weights[{cols}]"), &down::<f32>(s, &dw, t * k)?, &want_w);
        // token sum (dispatch backward)
        let ts = Buf::new(s, t * cols * 2)?;
        launch(gpu, s, "bf16_token_sum", rows_cfg(t), &[A::P(bb.0), A::P(sb.0), A::P(ts.0), A::I64(t as i64), A::I32(k as i32), A::I32(cols as i32)])?;
        let mut want = vec![0.0f32; t * cols];
        for (a, &sl) in slots.iter().enumerate() {
            if sl >= 0 {
                for c in 0..cols {
                    want[(a / k) * cols + c] += back[sl as usize * cols + c];
                }
            }
        }
        push(format!("bf16_token_sum[{cols}]"), &from16(down(s, &ts, t * cols)?), &want);
        // GELU forward and backward
        let m = t * cols;
        let (hb, gb) = (up(s, &to16(&x))?, up(s, &to16(&dout))?);
        let (ab, dhb) = (Buf::new(s, m * 2)?, Buf::new(s, m * 2)?);
        launch(gpu, s, "act_fwd_bf16", gpu.grid(m / 8 + 1), &[A::P(hb.0), A::P(ab.0), A::I64(m as i64), A::I32(0)])?;
        launch(gpu, s, "act_bwd_bf16", gpu.grid(m / 8 + 1), &[A::P(hb.0), A::P(gb.0), A::P(dhb.0), A::I64(m as i64), A::I32(0)])?;
        let (mut wa, mut wd) = (vec![0.0f32; m], vec![0.0f32; m]);
        activation::forward(crate::spec::Activation::Gelu, &x, &mut wa);
        activation::backward(crate::spec::Activation::Gelu, &x, &dout, &mut wd);
        push(format!("act_fwd_bf16 gelu[{m}]"), &from16(down(s, &ab, m)?), &wa);
        push(format!("act_bwd_bf16 gelu[{m}]"), &from16(down(s, &dhb, m)?), &wd);
    }
    let mut f32_checks = Vec::new();
    // Routing backward (f32): one warp per token over the experts; few experts (fewer than a
    // warp's lanes) and many (64, two per lane), with and without renormalising over the k.
    for (t, e, k) in [(37usize, 5usize, 2usize), (50, 64, 6)] {
        let logits = normal(&format!("route.logits.{e}"), t * e);
        let mut probs = vec![0.0f32; t * e];
        for (l, p) in logits.chunks_exact(e).zip(probs.chunks_exact_mut(e)) {
            let mx = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = l.iter().map(|x| (x - mx).exp()).sum();
            p.iter_mut().zip(l).for_each(|(p, x)| *p = (x - mx).exp() / sum);
        }
        // k distinct experts per token.
        let idx: Vec<i32> = (0..t).flat_map(|tok| (0..k).map(move |j| ((tok * 7 + j * 3) % e) as i32)).collect();
        let dw = normal(&format!("route.dw.{e}"), t * k);
        let aux = normal(&format!("route.aux.{e}"), e);
        let (pb, ib, dwb, ab) = (up(s, &probs)?, up(s, &idx)?, up(s, &dw)?, up(s, &aux)?);
        for renorm in [false, true] {
            let db = up(s, &vec![f32::NAN; t * e])?;
            launch(gpu, s, "route_bwd", gpu.grid(t * 32), &[A::P(pb.0), A::P(ib.0), A::P(dwb.0), A::P(ab.0), A::P(db.0), A::I64(t as i64), A::I32(e as i32), A::I32(k as i32), A::I32(renorm as i32)])?;
            let mut want = vec![0.0f32; t * e];
            crate::math::routing::route_backward_with(&probs, &idx, &dw, e, k, renorm, &aux, &mut want);
            let got: Vec<f32> = down(s, &db, t * e)?;
            let (rel, _) = compare(&got, &want);
            // f32 in and out: the f32 tolerance.
            f32_checks.push(KernelCheck { name: format!("route_bwd[{t}x{e},k{k},{}]", if renorm { "renorm" } else { "raw" }), rel_err: rel, passed: rel.is_finite() && rel < crate::backend::cuda::check::F32_TOL });
        }
    }
    // Grouped GEMM: four experts with uneven rows (one empty) in every form, against linalg.
    let (kk, nn) = (24usize, 20usize);
    let rows = [7usize, 0, 13, 3];
    let total: usize = rows.iter().sum();
    let scratch = Buf::new(s, grouped_scratch_bytes(rows.len()))?;
    for form in GemmForm::ALL {
        // Per expert: nn  C[r,nn] = A[r,kk] W[kk,nn]; nt  C[r,kk] = A[r,nn] W[kk,nn]^T;
        // tn  C[kk,nn] = A[r,kk]^T B[r,nn] (a weight gradient: contraction over the rows).
        let (a_w, b_len, c_w) = match form {
            GemmForm::Nn => (kk, kk * nn, nn),
            GemmForm::Nt => (nn, kk * nn, kk),
            GemmForm::Tn => (kk, 0, nn),
        };
        let a = normal(&format!("grouped.a.{}", form.name()), total * a_w);
        let b = match form {
            GemmForm::Tn => normal("grouped.b.tn", total * nn),
            _ => normal(&format!("grouped.b.{}", form.name()), rows.len() * b_len),
        };
        let c_len = match form {
            GemmForm::Tn => rows.len() * kk * nn,
            _ => total * c_w,
        };
        let (ab, bb) = (up(s, &to16(&a))?, up(s, &to16(&b))?);
        let cb = up(s, &vec![0u16; c_len])?;
        let mut want = vec![0.0f32; c_len];
        let mut probs = Vec::new();
        let mut off = 0;
        for (ex, &r) in rows.iter().enumerate() {
            let a_rows = &a[off * a_w..(off + r) * a_w];
            let addr = |base: u64, elems: usize| base + (elems * 2) as u64;
            match form {
                GemmForm::Nn | GemmForm::Nt => {
                    let w = &b[ex * b_len..(ex + 1) * b_len];
                    let c = &mut want[off * c_w..(off + r) * c_w];
                    if form == GemmForm::Nn {
                        linalg::gemm(a_rows, w, c, r, kk, nn, false);
                    } else {
                        linalg::gemm_nt(a_rows, w, c, r, nn, kk, false);
                    }
                    let dims = if form == GemmForm::Nn { GemmDims { m: r, k: kk, n: nn } } else { GemmDims { m: r, k: nn, n: kk } };
                    probs.push(GroupedProblem { a: addr(ab.0, off * a_w), b: addr(bb.0, ex * b_len), c: addr(cb.0, off * c_w), dims });
                }
                GemmForm::Tn => {
                    let brows = &b[off * nn..(off + r) * nn];
                    linalg::gemm_tn(a_rows, brows, &mut want[ex * kk * nn..(ex + 1) * kk * nn], r, kk, nn, false);
                    if r > 0 {
                        probs.push(GroupedProblem { a: addr(ab.0, off * kk), b: addr(bb.0, off * nn), c: addr(cb.0, ex * kk * nn), dims: GemmDims { m: kk, k: r, n: nn } });
                    }
                }
            }
            off += r;
        }
        // SAFETY: every problem addresses rows inside ab, bb, cb (sized above); scratch holds
        // the pointer arrays of rows.len() problems.
        unsafe { bf16_grouped_gemm_raw(s.blas, s.stream.cu_stream(), form, &probs, 0.0, scratch.0) }?;
        push(format!("bf16_grouped_gemm_{}[{total}]", form.name()), &from16(down(s, &cb, c_len)?), &want);
    }
    // cuBLASLt GELU epilogues: act = gelu(x w1) with h = x w1 kept; dh = gelu'(h) (dy w2^T).
    let (r, dd, ff) = (13usize, 24usize, 16usize);
    let (x, w1, w2, dy) = (normal("lt.x", r * dd), normal("lt.w1", dd * ff), normal("lt.w2", ff * dd), normal("lt.dy", r * dd));
    let (xb, w1b, w2b, dyb) = (up(s, &to16(&x))?, up(s, &to16(&w1))?, up(s, &to16(&w2))?, up(s, &to16(&dy))?);
    let (actb, hb, dhb) = (Buf::new(s, r * ff * 2)?, Buf::new(s, r * ff * 2)?, Buf::new(s, r * ff * 2)?);
    let ws = Buf::new(s, LT_WORKSPACE)?;
    let mut lt = LtGemm::new(ws.0, LT_WORKSPACE, true)?;
    // SAFETY: every buffer holds the elements its shape addresses; aux is laid out like c.
    unsafe {
        lt.gemm(s.stream.cu_stream(), GemmForm::Nn, xb.0, w1b.0, actb.0, GemmDims { m: r, k: dd, n: ff }, Epilogue::GeluAux, hb.0)?;
        lt.gemm(s.stream.cu_stream(), GemmForm::Nt, dyb.0, w2b.0, dhb.0, GemmDims { m: r, k: dd, n: ff }, Epilogue::DGelu, hb.0)?;
    }
    let mut h = vec![0.0f32; r * ff];
    linalg::gemm(&x, &w1, &mut h, r, dd, ff, false);
    let mut want_act = vec![0.0f32; r * ff];
    activation::forward(crate::spec::Activation::Gelu, &h, &mut want_act);
    let mut dact = vec![0.0f32; r * ff];
    linalg::gemm_nt(&dy, &w2, &mut dact, r, dd, ff, false);
    let mut want_dh = vec![0.0f32; r * ff];
    activation::backward(crate::spec::Activation::Gelu, &h, &dact, &mut want_dh);
    push(format!("lt_gemm_gelu_aux[{r}x{dd}x{ff}]"), &from16(down(s, &actb, r * ff)?), &want_act);
    push(format!("lt_gemm_gelu_aux.h[{r}x{dd}x{ff}]"), &from16(down(s, &hb, r * ff)?), &h);
    push(format!("lt_gemm_dgelu[{r}x{dd}x{ff}]"), &from16(down(s, &dhb, r * ff)?), &want_dh);
    drop(lt);
    out.extend(f32_checks);
    out.extend(exact);
    Ok(out)
}
