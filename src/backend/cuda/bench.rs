//! `moelab bench`: one MoE layer's forward and backward on one GPU in bf16 (f32 accumulation),
//! expert GEMMs through cuBLAS per expert, against a dense 8192^3 bf16 cuBLAS GEMM measured in
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

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    /// The configuration.
    pub config: BenchConfig,
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
    /// `tflops` over the dense GEMM's TFLOP/s of the same run.
    pub ratio: f64,
    /// Mean time per stage, ms, in [`STAGES`] order.
    pub stages_ms: Vec<(String, f64)>,
}

/// The whole benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// The benchmark's bf16 kernels against the cpu definition (fresh inputs every run).
    pub kernel_checks: Vec<KernelCheck>,
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

/// Slots of every assignment (`-1` dropped), the source token of every expert row, and the
/// rows per expert, from the choices `idx[T, k]`.
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
pub fn bench_config(gpu: &Gpu, s: &GpuStream, cfg: BenchConfig, capacity_factor: Option<f64>, reps: usize, warmup: usize, dense_tflops: f64) -> Result<BenchRow, GpuError> {
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
        launch(gpu, s, "route_topk", gpu.grid(t), &[A::P(logits.0), A::P(probs.0), A::P(idx.0), A::P(wts.0), A::I64(t as i64), A::I32(e as i32), A::I32(k as i32), A::I32(1)])?;
        let mut iv = vec![0i32; t * k];
        // SAFETY: idx holds t*k i32; synchronised right after.
        unsafe { result::memcpy_dtoh_async(&mut iv, idx.0, s.stream.cu_stream()) }.map_err(GpuError::driver("cuMemcpyDtoHAsync"))?;
        s.stream.synchronize().map_err(GpuError::driver("cuStreamSynchronize"))?;
        let (sl, mp, counts) = route_rows(&iv, e, k, capacity);
        // SAFETY: slots holds t*k, map nmax >= mp.len() i32.
        unsafe {
            result::memcpy_htod_async(slots.0, &sl, s.stream.cu_stream()).map_err(GpuError::driver("cuMemcpyHtoDAsync"))?;
            result::memcpy_htod_async(map.0, &mp, s.stream.cu_stream()).map_err(GpuError::driver("cuMemcpyHtoDAsync"))?;
        }
        let n = mp.len();
        rows = n;
        mark(2)?;
        launch(gpu, s, "bf16_gather_rows", rows_cfg(n), &[A::P(x.0), A::P(map.0), A::P(xp.0), A::I64(n as i64), A::I32(d as i32)])?;
        mark(3)?;
        let per_expert = |f_each: &mut dyn FnMut(usize, usize, usize) -> Result<(), GpuError>| -> Result<(), GpuError> {
            let mut off = 0;
            for (ex, &c) in counts.iter().enumerate() {
                if c > 0 {
                    f_each(ex, off, c)?;
                }
                off += c;
            }
            Ok(())
        };
        per_expert(&mut |ex, off, c| gemm(s, GemmForm::Nn, xp.0 + (off * d * bf) as u64, w1.0 + (ex * d * f * bf) as u64, h.0 + (off * f * bf) as u64, c, d, f, 0.0, false))?;
        mark(4)?;
        launch(gpu, s, "bf16_gelu_fwd", gpu.grid(n * f / 8), &[A::P(h.0), A::P(act.0), A::I64((n * f) as i64)])?;
        mark(5)?;
        per_expert(&mut |ex, off, c| gemm(s, GemmForm::Nn, act.0 + (off * f * bf) as u64, w2.0 + (ex * f * d * bf) as u64, y.0 + (off * d * bf) as u64, c, f, d, 0.0, false))?;
        mark(6)?;
        launch(gpu, s, "bf16_combine", rows_cfg(t), &[A::P(y.0), A::P(slots.0), A::P(wts.0), A::P(out.0), A::I64(t as i64), A::I32(k as i32), A::I32(d as i32)])?;
        mark(7)?;
        launch(gpu, s, "bf16_combine_bwd_rows", rows_cfg(t * k), &[A::P(dout.0), A::P(slots.0), A::P(wts.0), A::P(dy.0), A::I64((t * k) as i64), A::I32(k as i32), A::I32(d as i32)])?;
        launch(gpu, s, "bf16_combine_bwd_weights", gpu.grid(t * k * 32), &[A::P(dout.0), A::P(y.0), A::P(slots.0), A::P(dwts.0), A::I64((t * k) as i64), A::I32(k as i32), A::I32(d as i32)])?;
        mark(8)?;
        per_expert(&mut |ex, off, c| {
            gemm(s, GemmForm::Nt, dy.0 + (off * d * bf) as u64, w2.0 + (ex * f * d * bf) as u64, dact.0 + (off * f * bf) as u64, c, d, f, 0.0, false)?;
            gemm(s, GemmForm::Tn, act.0 + (off * f * bf) as u64, dy.0 + (off * d * bf) as u64, dw2.0 + (ex * f * d * bf) as u64, f, c, d, 0.0, false)
        })?;
        mark(9)?;
        launch(gpu, s, "bf16_gelu_bwd", gpu.grid(n * f / 8), &[A::P(h.0), A::P(dact.0), A::P(dh.0), A::I64((n * f) as i64)])?;
        mark(10)?;
        per_expert(&mut |ex, off, c| {
            gemm(s, GemmForm::Nt, dh.0 + (off * f * bf) as u64, w1.0 + (ex * d * f * bf) as u64, dxp.0 + (off * d * bf) as u64, c, f, d, 0.0, false)?;
            gemm(s, GemmForm::Tn, xp.0 + (off * d * bf) as u64, dh.0 + (off * f * bf) as u64, dw1.0 + (ex * d * f * bf) as u64, d, c, f, 0.0, false)
        })?;
        mark(11)?;
        launch(gpu, s, "bf16_token_sum", rows_cfg(t), &[A::P(dxp.0), A::P(slots.0), A::P(dx.0), A::I64(t as i64), A::I32(k as i32), A::I32(d as i32)])?;
        mark(12)?;
        launch(gpu, s, "route_bwd", gpu.grid(t), &[A::P(probs.0), A::P(idx.0), A::P(dwts.0), A::P(zeros.0), A::P(dlogits.0), A::I64(t as i64), A::I32(e as i32), A::I32(k as i32), A::I32(1)])?;
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
        capacity: capacity_factor.map_or("dropless".into(), |c| format!("{c}")),
        rows,
        dropped: t * k - rows,
        layer_ms,
        expert_flops,
        tflops,
        ratio: tflops / dense_tflops,
        stages_ms: STAGES.iter().zip(&stage_sum).map(|(n, v)| (n.to_string(), v / reps as f64)).collect(),
    })
}

/// Runs every configuration in `names` (all when empty), dropless and with capacity 1.25.
pub fn run(ordinal: usize, names: &[String], reps: usize, on_row: &mut dyn FnMut(&BenchRow)) -> Result<BenchReport, GpuError> {
    let gpu = Gpu::open(ordinal)?;
    gpu.ctx.bind_to_thread().map_err(GpuError::driver("cuCtxSetCurrent"))?;
    let s = gpu.new_stream(false)?;
    let kernel_checks = check_kernels(&gpu, &s, crate::backend::cuda::check::fresh_seed())?;
    let dense_tflops = dense_gemm_tflops(&gpu, &s, 8192, reps.max(5))?;
    let mut rows = Vec::new();
    for cfg in CONFIGS.iter().filter(|c| names.is_empty() || names.iter().any(|n| n == c.name)) {
        for cap in [None, Some(1.25)] {
            let row = bench_config(&gpu, &s, *cfg, cap, reps, 2, dense_tflops)?;
            on_row(&row);
            rows.push(row);
        }
    }
    Ok(BenchReport { kernel_checks, device: gpu.info.name.clone(), date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(), dense_tflops, reps, rows })
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
    use crate::math::{activation, rng};
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
        launch(gpu, s, "bf16_gelu_fwd", gpu.grid(m / 8 + 1), &[A::P(hb.0), A::P(ab.0), A::I64(m as i64)])?;
        launch(gpu, s, "bf16_gelu_bwd", gpu.grid(m / 8 + 1), &[A::P(hb.0), A::P(gb.0), A::P(dhb.0), A::I64(m as i64)])?;
        let (mut wa, mut wd) = (vec![0.0f32; m], vec![0.0f32; m]);
        activation::forward(crate::spec::Activation::Gelu, &x, &mut wa);
        activation::backward(crate::spec::Activation::Gelu, &x, &dout, &mut wd);
        push(format!("bf16_gelu_fwd[{m}]"), &from16(down(s, &ab, m)?), &wa);
        push(format!("bf16_gelu_bwd[{m}]"), &from16(down(s, &dhb, m)?), &wd);
    }
    Ok(out)
}
