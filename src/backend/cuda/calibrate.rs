//! `moelab calibrate`: measures a hardware profile's terms on the GPUs present: a cuBLAS
//! GEMM sweep in bf16 and f32 (square shapes and the shapes MoE blocks run), the gap between
//! back-to-back kernels, device copy bandwidth, and, with two or more GPUs, NCCL all-to-all,
//! all-reduce, all-gather and reduce-scatter over a range of sizes (one process driving every
//! GPU through one grouped NCCL call per collective), one host round trip as the executor's
//! host-side ops see it (device-to-host copy, stream sync, next launch) and a kernel-class
//! sweep of the executor's own plan kernels (LayerNorm, activation, combine, row gather, loss,
//! Adam, batch draw). Three probes ask how GEMMs behave in a step: capacity expert GEMMs over
//! zero padding rows (fitted: the profile's zero-row gains), the same GEMMs after other work
//! or with other operands, and an all-to-all launched beside a running GEMM (both recorded,
//! not fitted). `backend::sim::calibration` turns the numbers into a profile.

use super::bench::{launch, Buf, A};
use super::gpu::{Gpu, GpuStream};
use crate::backend::sim::calibration::{
    BesideGemmMeasure, Calibration, CollectiveMeasure, F32OutputMeasure, GemmContext, GemmContextMeasure, GemmData, HostCall, HostCopyMeasure, ZeroRowsMeasure, GemmMeasure, KernelMeasure, F32_OUTPUT_SHAPES, KERNEL_EXPERT_ROWS, KERNEL_HIDDEN, KERNEL_PARAMS, KERNEL_TOKENS, KERNEL_TOP_K,
    KERNEL_WIDTH,
};
use crate::backend::sim::profile::{CollectiveKind, GemmDtype, GemmPass, KernelClass};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{result, CudaContext, CudaEvent, LaunchConfig, PushKernelArg};
use cudarc::nccl::sys as nccl;
use moelab_kernels::error::GpuError;
use moelab_kernels::gemm::{bf16_gemm_raw, bf16_gemm_raw_batched, sgemm_raw, Batch};
use moelab_kernels::{GemmDims, GemmForm};
use std::sync::Arc;

/// GEMM shapes `(m, n, k)` of the sweep: squares for the curve, then the shapes MoE blocks
/// run (mixtral-ish and fine-grained expert GEMMs forward and backward, attention heads,
/// dense projections).
pub const GEMM_SHAPES: [(usize, usize, usize); 29] = [
    (1024, 1024, 1024),
    (2048, 2048, 2048),
    (4096, 4096, 4096),
    (8192, 8192, 8192),
    (8192, 8192, 256),
    (8192, 8192, 1024),
    (16384, 14336, 4096),
    (16384, 4096, 14336),
    (4096, 14336, 16384),
    (16384, 12288, 4096),
    (4096, 4096, 16384),
    (2048, 2048, 128),
    (2048, 128, 2048),
    (4096, 1408, 2048),
    (4096, 2048, 1408),
    (2048, 1408, 4096),
    // The router's thin GEMMs (mixtral-ish gate: 16,384 tokens x 4,096 -> 8 experts), forward,
    // input gradient and weight gradient.
    (16384, 8, 4096),
    (16384, 4096, 8),
    (4096, 8, 16384),
    // The small-tokens router's (2,048 tokens x 4,096 -> 8 experts), the same three: thin
    // GEMMs that cuBLAS splits along k, which the tile model cannot carry down from 16,384.
    (2048, 8, 4096),
    (2048, 4096, 8),
    (4096, 8, 2048),
    // The fine-grained router's (16,384 tokens x 2,048 -> 64 experts), the same three.
    (16384, 64, 2048),
    (16384, 2048, 64),
    (2048, 64, 16384),
    // Small per-expert blocks (small-tokens: 512 rows of d 4096, f 14336): forward and input
    // gradient, and the weight gradients, whose reduction is the 512 rows.
    (512, 14336, 4096),
    (512, 4096, 14336),
    (4096, 14336, 512),
    (14336, 4096, 512),
];

/// Payload sizes per member of the collective sweep, bytes.
pub const COLLECTIVE_BYTES: [usize; 6] = [1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20, 512 << 20];

fn event(ctx: &Arc<CudaContext>) -> Result<CudaEvent, GpuError> {
    ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(GpuError::driver("cuEventCreate"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds of `reps` timed calls of `f` on `s` after two untimed ones.
fn timed(gpu: &Gpu, s: &GpuStream, reps: usize, mut f: impl FnMut() -> Result<(), GpuError>) -> Result<f64, GpuError> {
    for _ in 0..2 {
        f()?;
    }
    let mut times = Vec::new();
    for _ in 0..reps.max(1) {
        times.push(time_calls(gpu, s, 1, &mut f)?);
    }
    Ok(median(times))
}

/// Seconds `calls` back-to-back calls of `f` take on `s` (device events around them).
fn time_calls(gpu: &Gpu, s: &GpuStream, calls: usize, mut f: impl FnMut() -> Result<(), GpuError>) -> Result<f64, GpuError> {
    let (e0, e1) = (event(&gpu.ctx)?, event(&gpu.ctx)?);
    e0.record(&s.stream).map_err(GpuError::driver("cuEventRecord"))?;
    for _ in 0..calls {
        f()?;
    }
    e1.record(&s.stream).map_err(GpuError::driver("cuEventRecord"))?;
    e1.synchronize().map_err(GpuError::driver("cuEventSynchronize"))?;
    Ok(e0.elapsed_ms(&e1).map_err(GpuError::driver("cuEventElapsedTime"))? as f64 * 1e-3)
}

/// Zeroes the rows past `filled` of each of `blocks` blocks of `rows` x `width` bf16 values at
/// `ptr`, on `s`: a capacity plan's padding rows.
///
/// # Safety
/// `ptr` must hold `blocks x rows x width` bf16 values on this device.
unsafe fn zero_block_tails(s: &GpuStream, ptr: u64, blocks: usize, rows: usize, width: usize, filled: usize) -> Result<(), GpuError> {
    let filled = filled.min(rows);
    for e in 0..blocks {
        let (from, len) = ((e * rows + filled) * width * 2, (rows - filled) * width * 2);
        if len > 0 {
            // SAFETY: the range lies inside block e (the caller's contract).
            unsafe { result::memset_d8_async(ptr + from as u64, 0, len, s.stream.cu_stream()) }.map_err(GpuError::driver("cuMemsetD8Async"))?;
        }
    }
    Ok(())
}

/// `n` bf16 values of a fixed hash (scale 0.05) at `ptr`: the sweeps' bf16 operands.
fn fill_bf16(gpu: &Gpu, s: &GpuStream, ptr: u64, n: usize) -> Result<(), GpuError> {
    launch(gpu, s, "bf16_fill_hash", gpu.grid(n), &[A::P(ptr), A::I64(n as i64), A::U32(7), A::F32(0.05)])
}

fn fill_f32(gpu: &Gpu, s: &GpuStream, ptr: u64, n: usize) -> Result<(), GpuError> {
    // The data stream's normals (any values do; real ones keep the GEMM's power draw honest).
    let args = [A::P(ptr), A::I64(n as i64), A::I32(1), A::U32(1), A::U32(2), A::U32(3), A::U32(4), A::U32(5), A::U32(6), A::I64(0)];
    launch(gpu, s, "load_batch_x", gpu.grid(n.div_ceil(8)), &args)
}

/// Strided-batched bf16 GEMMs `(m, n, k, batch)`: the expert GEMMs of the bench plans at
/// capacity factor 1.25 on one GPU, one call over every expert's block (forward, input
/// gradient and weight gradient: mixtral-ish 8 x 5,120 rows of 4,096 / 14,336, fine-grained
/// 64 x 1,920 rows of 2,048 / 1,408, small-tokens 8 x 640 rows), and a square 4,096 batch of
/// 8 for reference.
pub const BATCHED_GEMM_SHAPES: [(usize, usize, usize, usize); 25] = [
    (5120, 14336, 4096, 8),
    (5120, 4096, 14336, 8),
    (4096, 14336, 5120, 8),
    (14336, 4096, 5120, 8),
    (1920, 1408, 2048, 64),
    (1920, 2048, 1408, 64),
    (2048, 1408, 1920, 64),
    (1408, 2048, 1920, 64),
    (640, 14336, 4096, 8),
    (640, 4096, 14336, 8),
    (4096, 14336, 640, 8),
    (14336, 4096, 640, 8),
    (4096, 4096, 4096, 8),
    // MPMoE's chunks at 16, 32 and 64 (320, 160 and 80 rows per expert): input gradients and
    // weight gradients, both ways round.
    (320, 4096, 14336, 8),
    (320, 14336, 4096, 8),
    (4096, 14336, 320, 8),
    (14336, 4096, 320, 8),
    (160, 4096, 14336, 8),
    (160, 14336, 4096, 8),
    (4096, 14336, 160, 8),
    (14336, 4096, 160, 8),
    (80, 4096, 14336, 8),
    (80, 14336, 4096, 8),
    (4096, 14336, 80, 8),
    (14336, 4096, 80, 8),
];

/// The strided-batched bf16 sweep ([`BATCHED_GEMM_SHAPES`]) on one GPU.
fn batched_gemm_sweep(gpu: &Gpu, s: &GpuStream, reps: usize, on_line: &mut dyn FnMut(&str)) -> Result<Vec<GemmMeasure>, GpuError> {
    let most = |f: fn(&(usize, usize, usize, usize)) -> usize| BATCHED_GEMM_SHAPES.iter().map(f).max().unwrap_or(1);
    let (na, nb, nc) = (most(|s| s.3 * s.0 * s.2), most(|s| s.3 * s.2 * s.1), most(|s| s.3 * s.0 * s.1));
    let (a, b, c) = (Buf::new(s, na * 2)?, Buf::new(s, nb * 2)?, Buf::new(s, nc * 2)?);
    for (buf, n) in [(&a, na), (&b, nb)] {
        fill_bf16(gpu, s, buf.0, n)?;
    }
    let mut out = Vec::new();
    for &(m, n, k, count) in &BATCHED_GEMM_SHAPES {
        let dims = GemmDims { m, k, n };
        let batch = Batch { count, a_stride: m * k, b_stride: k * n, c_stride: m * n };
        // SAFETY: a, b, c hold the largest batch of operands of the sweep in bf16; the handle
        // is bound to `s`.
        let secs = timed(gpu, s, reps, || unsafe { bf16_gemm_raw_batched(s.blas, GemmForm::Nn, a.0, b.0, c.0, dims, 0.0, false, Some(batch)) })?;
        let tflops = 2.0 * (m * n * k * count) as f64 / secs / 1e12;
        on_line(&format!("gemm bf16 m={m} n={n} k={k} batch={count}: {tflops:.1} TFLOP/s"));
        out.push(GemmMeasure { dtype: GemmDtype::Bf16, m, n, k, batch: count, tflops });
    }
    Ok(out)
}

/// The zero-rows probe's expert layers `(experts, rows per expert, d_in, d_out)`: the
/// mixtral-ish capacity-1.25 layer on one GPU (both GEMMs) and MPMoE's chunk of its second
/// GEMM on two.
pub const ZERO_ROWS_LAYERS: [(usize, usize, usize, usize); 3] = [(8, 5120, 4096, 14336), (8, 5120, 14336, 4096), (4, 1280, 14336, 4096)];

/// Shares of each block's rows that hold data in the zero-rows probe.
pub const ZERO_ROWS_KEPT: [f64; 4] = [1.0, 0.75, 0.39, 0.0];

/// Milliseconds of back-to-back calls each window of the zero-rows probe times: the
/// power-capped clocks of an H100/H200 swing by 10-20% from one 100 ms sample to the next,
/// so single calls measure the swing.
const ZERO_ROWS_WINDOW_MS: f64 = 100.0;

/// Milliseconds of untimed calls before each window: the power limiter remembers the last
/// tens of milliseconds, so a window right after another kept share inherits its clocks
/// (100 ms windows without a lead measured 75% kept rows 1-3% slower than whole ones).
const ZERO_ROWS_LEAD_MS: f64 = 150.0;

/// The zero-rows probe on one GPU: each layer of [`ZERO_ROWS_LAYERS`] as the cuda executor
/// runs it over capacity blocks (strided-batched bf16: forward `x w` (`Nn`), input gradient
/// `dy w^T` (`Nt`), weight gradient `x^T dy` (`Tn`, f32 output)), with the rows past
/// `kept x rows` of every block zero in `x` and `dy` (a capacity plan's padding), for each of
/// [`ZERO_ROWS_KEPT`]: `reps` rounds, each kept share in turn (starting one later each round)
/// running [`ZERO_ROWS_LEAD_MS`] untimed and then a timed window of [`ZERO_ROWS_WINDOW_MS`],
/// TFLOP/s over all its windows. Zero operands draw less power, so a power-capped GPU clocks
/// higher over them: `sim::calibration` fits the gain per pass.
fn zero_rows_probe(gpu: &Gpu, s: &GpuStream, reps: usize, on_line: &mut dyn FnMut(&str)) -> Result<Vec<ZeroRowsMeasure>, GpuError> {
    let most = |f: fn(&(usize, usize, usize, usize)) -> usize| ZERO_ROWS_LAYERS.iter().map(f).max().unwrap_or(1);
    let (nx, ny, nw) = (most(|l| l.0 * l.1 * l.2), most(|l| l.0 * l.1 * l.3), most(|l| l.0 * l.2 * l.3));
    let w = Buf::new(s, nw * 2)?;
    let (out, dw) = (Buf::new(s, nx.max(ny) * 2)?, Buf::new(s, nw * 4)?);
    fill_bf16(gpu, s, w.0, nw)?;
    // x and dy per kept share, the rows past it zero in every block (refilled per layer).
    let xs = ZERO_ROWS_KEPT.iter().map(|_| Buf::new(s, nx * 2)).collect::<Result<Vec<_>, _>>()?;
    let dys = ZERO_ROWS_KEPT.iter().map(|_| Buf::new(s, ny * 2)).collect::<Result<Vec<_>, _>>()?;
    let mut found = Vec::new();
    for &(experts, rows, d_in, d_out) in &ZERO_ROWS_LAYERS {
        for (i, &kept) in ZERO_ROWS_KEPT.iter().enumerate() {
            let filled = (rows as f64 * kept).round() as usize;
            for (buf, width) in [(&xs[i], d_in), (&dys[i], d_out)] {
                fill_bf16(gpu, s, buf.0, experts * rows * width)?;
                // SAFETY: buf holds nx or ny >= experts x rows x width bf16 values.
                unsafe { zero_block_tails(s, buf.0, experts, rows, width, filled) }?;
            }
        }
        for pass in GemmPass::ALL {
            let (form, dims, a_stride, b_stride, c_stride) = match pass {
                GemmPass::Forward => (GemmForm::Nn, GemmDims { m: rows, k: d_in, n: d_out }, rows * d_in, d_in * d_out, rows * d_out),
                GemmPass::InputGrad => (GemmForm::Nt, GemmDims { m: rows, k: d_out, n: d_in }, rows * d_out, d_in * d_out, rows * d_in),
                GemmPass::WeightGrad => (GemmForm::Tn, GemmDims { m: d_in, k: rows, n: d_out }, rows * d_in, rows * d_out, d_in * d_out),
            };
            let batch = Some(Batch { count: experts, a_stride, b_stride, c_stride });
            let call = |i: usize| {
                // SAFETY: x, dy, w hold the layer's operands (experts blocks each), out and dw
                // its outputs in bf16 / f32; the handle is bound to `s`.
                unsafe {
                    match pass {
                        GemmPass::Forward => bf16_gemm_raw_batched(s.blas, form, xs[i].0, w.0, out.0, dims, 0.0, false, batch),
                        GemmPass::InputGrad => bf16_gemm_raw_batched(s.blas, form, dys[i].0, w.0, out.0, dims, 0.0, false, batch),
                        GemmPass::WeightGrad => bf16_gemm_raw_batched(s.blas, form, xs[i].0, dys[i].0, dw.0, dims, 0.0, true, batch),
                    }
                }
            };
            let one = timed(gpu, s, 1, || call(0))?;
            let window = ((ZERO_ROWS_WINDOW_MS * 1e-3 / one.max(1e-6)).ceil() as usize).clamp(1, 1000);
            let lead = ((ZERO_ROWS_LEAD_MS * 1e-3 / one.max(1e-6)).ceil() as usize).clamp(1, 1000);
            let mut times = vec![0.0; ZERO_ROWS_KEPT.len()];
            for round in 0..reps.max(1) {
                for turn in 0..ZERO_ROWS_KEPT.len() {
                    let i = (round + turn) % ZERO_ROWS_KEPT.len();
                    for _ in 0..lead {
                        call(i)?;
                    }
                    times[i] += time_calls(gpu, s, window, || call(i))?;
                }
            }
            let calls = (window * reps.max(1)) as f64;
            for (&kept, t) in ZERO_ROWS_KEPT.iter().zip(times) {
                let tflops = 2.0 * (rows * d_in * d_out * experts) as f64 * calls / t / 1e12;
                on_line(&format!("expert gemm bf16 {} {experts} x {rows} rows, {d_in} -> {d_out}, rows kept {kept:.2} (rest zero): {tflops:.1} TFLOP/s", pass.as_str()));
                found.push(ZeroRowsMeasure { experts, rows, d_in, d_out, pass, kept, tflops });
            }
        }
    }
    Ok(found)
}

/// The GEMM-context probe's shapes `(m, n, k, batch)`: the mixtral-ish dense MLP's two
/// GEMMs and its capacity-1.25 expert GEMMs on one GPU (forward).
pub const GEMM_CONTEXT_SHAPES: [(usize, usize, usize, usize); 4] = [(16384, 14336, 4096, 1), (16384, 4096, 14336, 1), (5120, 14336, 4096, 8), (5120, 4096, 14336, 8)];

/// Shares of each block's rows holding data in the GEMM-context probe (batched shapes; the
/// dense ones run whole).
pub const GEMM_CONTEXT_KEPT: [f64; 2] = [1.0, 0.39];

/// Milliseconds of GPU work before each timed GEMM of the context probe (the GEMM itself in
/// the sustained context; GEMMs between device copies in the alternating one).
const CONTEXT_LEAD_MS: f64 = 60.0;

/// Device copy before each GEMM of the alternating context, bytes (about 0.2 ms on H100/H200:
/// the elementwise ops between a step's GEMMs).
const CONTEXT_COPY_BYTES: usize = 256 << 20;

/// The GEMM-context probe on one GPU: each of [`GEMM_CONTEXT_SHAPES`] timed after
/// [`CONTEXT_LEAD_MS`] of (a) itself back to back (the sweep's context, held longer), (b) the
/// same GEMM alternating with device copies (a training step's pattern) and (c) an idle GPU,
/// with the sweep's hash operands and with standard normal ones, whole and (batched shapes)
/// with the rows past `kept` of each block zero. Conditions interleave round by round, so a
/// drift of the clocks over the probe reaches all of them alike. Asks which of the GEMM's
/// surroundings make a step's GEMMs run at other speeds than the sweep's.
fn gemm_context_probe(gpu: &Gpu, s: &GpuStream, reps: usize, on_line: &mut dyn FnMut(&str)) -> Result<Vec<GemmContextMeasure>, GpuError> {
    let most = |f: fn(&(usize, usize, usize, usize)) -> usize| GEMM_CONTEXT_SHAPES.iter().map(f).max().unwrap_or(1);
    let (na, nb, nc) = (most(|s| s.3 * s.0 * s.2), most(|s| s.3 * s.2 * s.1), most(|s| s.3 * s.0 * s.1));
    let c = Buf::new(s, nc * 2)?;
    let (copy_src, copy_dst) = (Buf::new(s, CONTEXT_COPY_BYTES)?, Buf::new(s, CONTEXT_COPY_BYTES)?);
    // Operands per data kind: b, and a whole and with zero rows (refilled per shape).
    let mut ops = Vec::new();
    for data in [GemmData::Hash, GemmData::Normal] {
        let (b, a_full, a_zero) = (Buf::new(s, nb * 2)?, Buf::new(s, na * 2)?, Buf::new(s, na * 2)?);
        for (buf, n) in [(&b, nb), (&a_full, na), (&a_zero, na)] {
            match data {
                GemmData::Hash => fill_bf16(gpu, s, buf.0, n)?,
                GemmData::Normal => {
                    let args = [A::P(buf.0), A::I64(n as i64), A::I32(1), A::U32(11), A::U32(12), A::U32(13), A::U32(14), A::U32(15), A::U32(16), A::I64(0)];
                    launch(gpu, s, "load_batch_x_bf16", gpu.grid(n.div_ceil(8)), &args)?
                }
            }
        }
        ops.push((data, b, a_full, a_zero));
    }
    let mut out = Vec::new();
    for &(m, n, k, count) in &GEMM_CONTEXT_SHAPES {
        let kepts: &[f64] = if count > 1 { &GEMM_CONTEXT_KEPT } else { &GEMM_CONTEXT_KEPT[..1] };
        let zero_from = (m as f64 * kepts[kepts.len() - 1]).round() as usize;
        for (_, _, a_full, a_zero) in &ops {
            // SAFETY: a_zero holds na >= count * m * k bf16 values; the copy and the zeroed
            // ranges lie inside it.
            unsafe { result::memcpy_dtod_async(a_zero.0, a_full.0, count * m * k * 2, s.stream.cu_stream()) }.map_err(GpuError::driver("cuMemcpyDtoDAsync"))?;
            if count > 1 {
                // SAFETY: as for the copy.
                unsafe { zero_block_tails(s, a_zero.0, count, m, k, zero_from) }?;
            }
        }
        let dims = GemmDims { m, k, n };
        let batch = (count > 1).then_some(Batch { count, a_stride: m * k, b_stride: k * n, c_stride: m * n });
        // SAFETY (both closures): a, b hold count x m x k and count x k x n bf16 values, c the
        // output; the handle and the copy are bound to `s`.
        let gemm = |a: u64, b: u64| unsafe { bf16_gemm_raw_batched(s.blas, GemmForm::Nn, a, b, c.0, dims, 0.0, false, batch) };
        let copy = || unsafe { result::memcpy_dtod_async(copy_dst.0, copy_src.0, CONTEXT_COPY_BYTES, s.stream.cu_stream()) }.map_err(GpuError::driver("cuMemcpyDtoDAsync"));
        // One GEMM's seconds, for the lead's length.
        let one = timed(gpu, s, 1, || gemm(ops[0].2 .0, ops[0].1 .0))?;
        let lead = ((CONTEXT_LEAD_MS * 1e-3 / one.max(1e-6)).ceil() as usize).clamp(2, 400);
        let mut conds = Vec::new();
        for &context in &GemmContext::ALL {
            for (data, b, a_full, a_zero) in &ops {
                for &kept in kepts {
                    conds.push((context, *data, kept, b.0, if kept < 1.0 { a_zero.0 } else { a_full.0 }, Vec::new()));
                }
            }
        }
        for _ in 0..reps.max(1) {
            for (context, _, _, b, a, times) in conds.iter_mut() {
                match context {
                    GemmContext::Sustained => {
                        for _ in 0..lead {
                            gemm(*a, *b)?;
                        }
                    }
                    GemmContext::Alternating => {
                        for _ in 0..lead {
                            copy()?;
                            gemm(*a, *b)?;
                        }
                        copy()?;
                    }
                    GemmContext::AfterIdle => {
                        s.stream.synchronize().map_err(GpuError::driver("cuStreamSynchronize"))?;
                        std::thread::sleep(std::time::Duration::from_secs_f64(CONTEXT_LEAD_MS * 1e-3));
                    }
                }
                times.push(time_calls(gpu, s, 1, || gemm(*a, *b))?);
            }
        }
        for (context, data, kept, _, _, times) in conds {
            let tflops = 2.0 * (m * n * k * count) as f64 / median(times) / 1e12;
            on_line(&format!(
                "gemm bf16 m={m} n={n} k={k} batch={count}, {} operands, rows kept {kept:.2}, after {}: {tflops:.1} TFLOP/s",
                data.as_str(),
                context.as_str()
            ));
            out.push(GemmContextMeasure { m, n, k, batch: count, data, context, kept, tflops });
        }
    }
    Ok(out)
}

/// GEMMs (bf16 8,192^3) queued ahead of the blocked download in the host-copy probe: about
/// 4 ms of GPU work on H100/H200.
const HOST_COPY_GEMMS: usize = 3;

/// Bytes each host call of the host-copy probe moves (a routing table's size).
const HOST_COPY_BYTES: usize = 4 << 10;

/// The host-copy probe on one GPU: how long one host thread's call takes while another thread
/// of the process sits in a pageable device-to-host copy (as the cuda executor's comm thread
/// does in an all-to-all's count exchange) that waits for [`HOST_COPY_GEMMS`] GEMMs queued on
/// a third stream. The calls, on an idle stream of their own: a kernel launch, a pageable
/// and a pinned upload of [`HOST_COPY_BYTES`], a pageable download, and a pinned one with a
/// wait for its stream (what the executor's reads of routing tables could be). Each is also timed with
/// no other thread blocked (the GEMMs still queued). Medians over `reps` rounds. Asks whether
/// the driver serialises one thread's copies behind another's blocked one.
fn host_copy_probe(gpu: &Gpu, reps: usize, on_line: &mut dyn FnMut(&str)) -> Result<Vec<HostCopyMeasure>, GpuError> {
    let (busy, waiting, idle) = (gpu.new_stream(false)?, gpu.new_stream(false)?, gpu.new_stream(false)?);
    let n = 8192usize;
    let (a, b, c) = (Buf::new(&busy, n * n * 2)?, Buf::new(&busy, n * n * 2)?, Buf::new(&busy, n * n * 2)?);
    fill_bf16(gpu, &busy, a.0, n * n)?;
    fill_bf16(gpu, &busy, b.0, n * n)?;
    let (dev_a, dev_b) = (Buf::new(&busy, HOST_COPY_BYTES)?, Buf::new(&busy, HOST_COPY_BYTES)?);
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
    busy.stream.synchronize().map_err(GpuError::driver("cuStreamSynchronize"))?;
    // SAFETY: HOST_COPY_BYTES of page-locked host memory, freed below.
    let pinned = unsafe { result::malloc_host(HOST_COPY_BYTES, 0) }.map_err(GpuError::driver("cuMemHostAlloc"))?;
    let mut found = Vec::new();
    let measured = (|| -> Result<(), GpuError> {
        for call in HostCall::ALL {
            let mut blocked = Vec::new();
            let mut alone = Vec::new();
            let mut other = Vec::new();
            for round in 0..2 * reps.max(1) {
                let with_blocked = round % 2 == 0;
                for _ in 0..HOST_COPY_GEMMS {
                    // SAFETY: a, b, c hold 8,192^2 bf16 values each; the handle is bound to `busy`.
                    unsafe { bf16_gemm_raw(busy.blas, GemmForm::Nn, a.0, b.0, c.0, GemmDims { m: n, k: n, n }, 0.0, false) }?;
                }
                let done = event(&gpu.ctx)?;
                done.record(&busy.stream).map_err(GpuError::driver("cuEventRecord"))?;
                waiting.stream.wait(&done).map_err(GpuError::driver("cuStreamWaitEvent"))?;
                let took = std::thread::scope(|sc| -> Result<(f64, f64), GpuError> {
                    let blocker = with_blocked.then(|| {
                        sc.spawn(|| -> Result<f64, GpuError> {
                            gpu.ctx.bind_to_thread().map_err(GpuError::driver("cuCtxSetCurrent"))?;
                            let mut host = vec![0u8; HOST_COPY_BYTES];
                            let t0 = std::time::Instant::now();
                            // SAFETY: dev_a holds HOST_COPY_BYTES; pageable: the call returns
                            // once the copy is done, after the GEMMs.
                            unsafe { result::memcpy_dtoh_async(&mut host, dev_a.0, waiting.stream.cu_stream()) }.map_err(GpuError::driver("cuMemcpyDtoHAsync"))?;
                            waiting.stream.synchronize().map_err(GpuError::driver("cuStreamSynchronize"))?;
                            Ok(t0.elapsed().as_secs_f64())
                        })
                    });
                    // Let the other thread enter its copy first.
                    std::thread::sleep(std::time::Duration::from_micros(500));
                    let mut host = vec![1u8; HOST_COPY_BYTES];
                    let t0 = std::time::Instant::now();
                    // SAFETY (all arms): dev_b holds HOST_COPY_BYTES, `pinned` as many page-locked
                    // bytes; `idle` is synchronised before they are reused.
                    match call {
                        HostCall::Launch => launch(gpu, &idle, "add_inplace", one, &[A::P(dev_b.0), A::P(dev_b.0), A::I64(1)])?,
                        HostCall::PageableUpload => unsafe { result::memcpy_htod_async(dev_b.0, &host, idle.stream.cu_stream()) }.map_err(GpuError::driver("cuMemcpyHtoDAsync"))?,
                        HostCall::PinnedUpload => unsafe {
                            let src = std::slice::from_raw_parts(pinned as *const u8, HOST_COPY_BYTES);
                            result::memcpy_htod_async(dev_b.0, src, idle.stream.cu_stream())
                        }
                        .map_err(GpuError::driver("cuMemcpyHtoDAsync"))?,
                        HostCall::PageableDownload => unsafe { result::memcpy_dtoh_async(&mut host, dev_b.0, idle.stream.cu_stream()) }.map_err(GpuError::driver("cuMemcpyDtoHAsync"))?,
                        HostCall::PinnedDownload => {
                            unsafe {
                                let dst = std::slice::from_raw_parts_mut(pinned as *mut u8, HOST_COPY_BYTES);
                                result::memcpy_dtoh_async(dst, dev_b.0, idle.stream.cu_stream())
                            }
                            .map_err(GpuError::driver("cuMemcpyDtoHAsync"))?;
                            idle.stream.synchronize().map_err(GpuError::driver("cuStreamSynchronize"))?;
                        }
                    }
                    let call_s = t0.elapsed().as_secs_f64();
                    let other_s = match blocker {
                        Some(h) => h.join().map_err(|_| GpuError::Panicked { op: "host-copy probe", message: "its blocked thread panicked".into() })??,
                        None => 0.0,
                    };
                    Ok((call_s, other_s))
                })?;
                idle.stream.synchronize().map_err(GpuError::driver("cuStreamSynchronize"))?;
                busy.stream.synchronize().map_err(GpuError::driver("cuStreamSynchronize"))?;
                waiting.stream.synchronize().map_err(GpuError::driver("cuStreamSynchronize"))?;
                if with_blocked {
                    blocked.push(took.0 * 1e6);
                    other.push(took.1 * 1e6);
                } else {
                    alone.push(took.0 * 1e6);
                }
            }
            let m = HostCopyMeasure { call, blocked_us: median(blocked), alone_us: median(alone), other_blocked_us: median(other) };
            on_line(&format!(
                "host call {} of {} B: {:.0} us while another thread waits {:.0} us in a pageable download behind {HOST_COPY_GEMMS} GEMMs, {:.0} us without",
                call.as_str(),
                HOST_COPY_BYTES,
                m.blocked_us,
                m.other_blocked_us,
                m.alone_us
            ));
            found.push(m);
        }
        Ok(())
    })();
    // SAFETY: allocated by malloc_host above; every copy from it completed (idle synchronised).
    unsafe { result::free_host(pinned) }.map_err(GpuError::driver("cuMemFreeHost"))?;
    measured.map(|()| found)
}

/// The GEMM sweep on one GPU.
fn gemm_sweep(gpu: &Gpu, s: &GpuStream, reps: usize, on_line: &mut dyn FnMut(&str)) -> Result<Vec<GemmMeasure>, GpuError> {
    let most = |f: fn(&(usize, usize, usize)) -> usize| GEMM_SHAPES.iter().map(f).max().unwrap_or(1);
    let (na, nb, nc) = (most(|s| s.0 * s.2), most(|s| s.2 * s.1), most(|s| s.0 * s.1));
    let (a, b, c) = (Buf::new(s, na * 4)?, Buf::new(s, nb * 4)?, Buf::new(s, nc * 4)?);
    let mut out = Vec::new();
    for dtype in [GemmDtype::Bf16, GemmDtype::F32] {
        for (buf, n) in [(&a, na), (&b, nb)] {
            match dtype {
                GemmDtype::Bf16 => fill_bf16(gpu, s, buf.0, n)?,
                GemmDtype::F32 => fill_f32(gpu, s, buf.0, n)?,
            }
        }
        for &(m, n, k) in &GEMM_SHAPES {
            let dims = GemmDims { m, k, n };
            let secs = timed(gpu, s, reps, || {
                // SAFETY: a, b, c hold the largest operand of the sweep in either dtype; the
                // handle is bound to `s`.
                unsafe {
                    match dtype {
                        GemmDtype::Bf16 => bf16_gemm_raw(s.blas, GemmForm::Nn, a.0, b.0, c.0, dims, 0.0, false),
                        GemmDtype::F32 => sgemm_raw(s.blas, GemmForm::Nn, a.0, b.0, c.0, dims, 0.0, None),
                    }
                }
            })?;
            let tflops = 2.0 * (m * n * k) as f64 / secs / 1e12;
            on_line(&format!("gemm {} m={m} n={n} k={k}: {tflops:.1} TFLOP/s", if dtype == GemmDtype::Bf16 { "bf16" } else { "f32 " }));
            out.push(GemmMeasure { dtype, m, n, k, batch: 1, tflops });
        }
    }
    Ok(out)
}

/// The bf16 weight-gradient GEMMs (`dw = x^T dy`, the `Tn` form the executor runs) of
/// [`F32_OUTPUT_SHAPES`] into a bf16 output, an f32 output and an f32 output added to.
fn f32_output_sweep(gpu: &Gpu, s: &GpuStream, reps: usize, on_line: &mut dyn FnMut(&str)) -> Result<Vec<F32OutputMeasure>, GpuError> {
    let most = |f: fn(&(usize, usize, usize)) -> usize| F32_OUTPUT_SHAPES.iter().map(f).max().unwrap_or(1);
    let (na, nb, nc) = (most(|s| s.2 * s.0), most(|s| s.2 * s.1), most(|s| s.0 * s.1));
    let (a, b, c) = (Buf::new(s, na * 2)?, Buf::new(s, nb * 2)?, Buf::new(s, nc * 4)?);
    for (buf, n) in [(&a, na), (&b, nb)] {
        fill_bf16(gpu, s, buf.0, n)?;
    }
    // SAFETY: c holds the largest output in f32; the beta-1 form reads it, so it is zeroed.
    unsafe { result::memset_d8_async(c.0, 0, nc * 4, s.stream.cu_stream()) }.map_err(GpuError::driver("cuMemsetD8Async"))?;
    let mut out = Vec::new();
    // The three output forms, in this order: bf16, f32 written, f32 added to (beta 1).
    const FORMS: [(f32, bool); 3] = [(0.0, false), (0.0, true), (1.0, true)];
    for &(m, n, k) in &F32_OUTPUT_SHAPES {
        let dims = GemmDims { m, k, n };
        let call = |form: usize| {
            let (beta, c_f32) = FORMS[form];
            // SAFETY: a holds k x m and b k x n bf16, c m x n f32; the handle is bound to `s`.
            unsafe { bf16_gemm_raw(s.blas, GemmForm::Tn, a.0, b.0, c.0, dims, beta, c_f32) }
        };
        for form in 0..FORMS.len() {
            call(form)?;
            call(form)?;
        }
        // Paired: each round times the three forms back to back, and the f32 forms' extra
        // time is the median over rounds of their difference to the same round's bf16 call.
        // A power-capped GPU's clocks move a long GEMM by 10-20% between rounds, which an
        // unpaired median per form carries into the difference (unpaired, a 2.7 ms GEMM over
        // k 16,384 showed 7% for an f32 output; paired, 0.5%).
        let mut rounds: Vec<[f64; 3]> = Vec::new();
        for _ in 0..(3 * reps).max(3) {
            let mut t = [0.0; 3];
            for (form, slot) in t.iter_mut().enumerate() {
                *slot = time_calls(gpu, s, 1, || call(form))?;
            }
            rounds.push(t);
        }
        let bf16_s = median(rounds.iter().map(|r| r[0]).collect());
        let f32_s = bf16_s + median(rounds.iter().map(|r| r[1] - r[0]).collect());
        let f32_acc_s = bf16_s + median(rounds.iter().map(|r| r[2] - r[0]).collect());
        on_line(&format!(
            "gemm bf16 dw m={m} n={n} k={k}: bf16 out {:.1} us, f32 out {:.1} us, f32 added to {:.1} us",
            bf16_s * 1e6,
            f32_s * 1e6,
            f32_acc_s * 1e6
        ));
        out.push(F32OutputMeasure { m, n, k, bf16_s, f32_s, f32_acc_s, paired: true });
    }
    Ok(out)
}

/// Microseconds between back-to-back one-element kernels, and device copy TB/s.
fn launch_and_copy(gpu: &Gpu, s: &GpuStream, reps: usize) -> Result<(f64, f64), GpuError> {
    let x = Buf::new(s, 64)?;
    const KERNELS: usize = 2000;
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
    let secs = timed(gpu, s, reps, || {
        for _ in 0..KERNELS {
            launch(gpu, s, "add_inplace", one, &[A::P(x.0), A::P(x.0), A::I64(1)])?;
        }
        Ok(())
    })?;
    let bytes = 1usize << 31;
    let (src, dst) = (Buf::new(s, bytes)?, Buf::new(s, bytes)?);
    let copy = timed(gpu, s, reps, || {
        // SAFETY: both buffers hold `bytes` on this device; ordered on `s`.
        unsafe { result::memcpy_dtod_async(dst.0, src.0, bytes, s.stream.cu_stream()) }.map_err(GpuError::driver("cuMemcpyDtoDAsync"))
    })?;
    Ok((secs / KERNELS as f64 * 1e6, 2.0 * bytes as f64 / copy / 1e12))
}

/// One host round trip as an op of the cuda executor sees it between its timing events: a
/// device-to-host copy of `bytes`, a stream synchronize, then the next kernel's launch.
/// Returns (microseconds for 4 KiB minus the kernel gap, host copy GB/s from 4 KiB to 1 MiB).
fn host_round_trip(gpu: &Gpu, s: &GpuStream, reps: usize, launch_us: f64) -> Result<(f64, f64), GpuError> {
    let x = Buf::new(s, 1 << 20)?;
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
    let trip = |bytes: usize| -> Result<f64, GpuError> {
        let mut host = vec![0u8; bytes];
        timed(gpu, s, reps, || {
            // SAFETY: x holds 1 MiB >= bytes; the copy completes before synchronize returns.
            unsafe { result::memcpy_dtoh_async(&mut host, x.0, s.stream.cu_stream()) }.map_err(GpuError::driver("cuMemcpyDtoHAsync"))?;
            s.stream.synchronize().map_err(GpuError::driver("cuStreamSynchronize"))?;
            launch(gpu, s, "add_inplace", one, &[A::P(x.0), A::P(x.0), A::I64(1)])
        })
    };
    let (small, large) = (trip(4 << 10)?, trip(1 << 20)?);
    let gbps = if large > small { ((1 << 20) - (4 << 10)) as f64 / (large - small) / 1e9 } else { f64::INFINITY };
    Ok(((small * 1e6 - launch_us).max(0.0), gbps))
}

/// A plan kernel argument, with the f64 that `mse` takes (bench's launcher has none).
enum K {
    P(u64),
    I64(i64),
    I32(i32),
    U32(u32),
    F32(f32),
    F64(f64),
}

/// Launches a kernel of `plan_ops.cu` by name with `args` in its parameter order.
fn run_kernel(gpu: &Gpu, s: &GpuStream, name: &'static str, cfg: LaunchConfig, args: &[K]) -> Result<(), GpuError> {
    let mut b = s.stream.launch_builder(gpu.func(name));
    for a in args {
        match a {
            K::P(x) => b.arg(x),
            K::I64(x) => b.arg(x),
            K::I32(x) => b.arg(x),
            K::U32(x) => b.arg(x),
            K::F32(x) => b.arg(x),
            K::F64(x) => b.arg(x),
        };
    }
    // SAFETY: each call site passes the kernel's parameters in order (plan_ops.cu), with live
    // buffers of the sizes the kernel addresses.
    unsafe { b.launch(cfg) }.map_err(|source| GpuError::Launch { kernel: name, source })?;
    Ok(())
}

/// Copies host i32 values into a device buffer and waits.
fn upload_i32(s: &GpuStream, ptr: u64, v: &[i32]) -> Result<(), GpuError> {
    // SAFETY: ptr holds at least v.len() i32; the stream is synchronized before v is dropped.
    unsafe { result::memcpy_htod_async(ptr, v, s.stream.cu_stream()) }.map_err(GpuError::driver("cuMemcpyHtoDAsync"))?;
    s.stream.synchronize().map_err(GpuError::driver("cuStreamSynchronize"))
}

/// Times the plan kernels the cuda executor runs for one op of each non-GEMM class, at the
/// sizes of `sim::calibration` (KERNEL_*), with the executor's launch shapes and arguments
/// (`src/backend/cuda/exec.rs`). `sim::calibration::class_share` turns each time into the
/// class's bandwidth share.
fn kernel_sweep(gpu: &Gpu, s: &GpuStream, reps: usize, on_line: &mut dyn FnMut(&str)) -> Result<Vec<KernelMeasure>, GpuError> {
    let (t, m, k) = (KERNEL_TOKENS, KERNEL_WIDTH, KERNEL_TOP_K);
    let (rows_e, hidden) = (KERNEL_EXPERT_ROWS, KERNEL_HIDDEN);
    let tm = t * m;
    let warp = |rows: usize| gpu.grid(rows * 32);
    let mut out = Vec::new();
    let mut record = |class: KernelClass, seconds: f64, out: &mut Vec<KernelMeasure>| {
        on_line(&format!("kernel class {}: {:.1} us", class.as_str(), seconds * 1e6));
        out.push(KernelMeasure { class: class.as_str().to_string(), seconds });
    };
    {
        // LayerNorm forward and backward on [tokens, width] (the backward's parameter column
        // sums as the executor runs them: partials, then two col_finish).
        let (x, y, dy, dx) = (Buf::new(s, tm * 4)?, Buf::new(s, tm * 4)?, Buf::new(s, tm * 4)?, Buf::new(s, tm * 4)?);
        let (g, b, stats) = (Buf::new(s, m * 4)?, Buf::new(s, m * 4)?, Buf::new(s, 2 * t * 4)?);
        fill_f32(gpu, s, x.0, tm)?;
        fill_f32(gpu, s, dy.0, tm)?;
        fill_f32(gpu, s, g.0, m)?;
        fill_f32(gpu, s, b.0, m)?;
        let fwd = || run_kernel(gpu, s, "ln_fwd", warp(t), &[K::P(x.0), K::P(g.0), K::P(b.0), K::P(y.0), K::P(stats.0), K::I64(t as i64), K::I32(m as i32)]);
        let secs = timed(gpu, s, reps, fwd)?;
        record(KernelClass::Layernorm, secs, &mut out);
        // The executor's row_chunks(rows, cols).
        let want = (gpu.info.sm_count.max(1) as usize * 2048).div_ceil(m);
        let chunks = want.clamp(1, t.div_ceil(16).max(1));
        let chunk = t.div_ceil(chunks).max(1);
        let chunks = t.div_ceil(chunk).max(1);
        let (dg, db) = (Buf::new(s, m * 4)?, Buf::new(s, m * 4)?);
        let part = Buf::new(s, 2 * chunks * m * 4)?;
        let part_b = part.0 + (chunks * m * 4) as u64;
        let secs = timed(gpu, s, reps, || {
            run_kernel(gpu, s, "ln_bwd_dx", warp(t), &[K::P(x.0), K::P(g.0), K::P(stats.0), K::P(dy.0), K::P(0), K::P(dx.0), K::I64(t as i64), K::I32(m as i32)])?;
            run_kernel(gpu, s, "ln_bwd_partials", gpu.grid(chunks * m), &[K::P(x.0), K::P(stats.0), K::P(dy.0), K::P(part.0), K::P(part_b), K::I64(t as i64), K::I32(m as i32), K::I64(chunk as i64)])?;
            for (src, dst) in [(part.0, dg.0), (part_b, db.0)] {
                run_kernel(gpu, s, "col_finish", gpu.grid(m), &[K::P(src), K::P(dst), K::I64(chunks as i64), K::I32(m as i32), K::I32(1), K::I32(0)])?;
            }
            Ok(())
        })?;
        record(KernelClass::LayernormBwd, secs, &mut out);
        // The loss and its gradient (mse with per-block partial sums).
        let cfg = gpu.grid(tm);
        let partial = Buf::new(s, cfg.grid_dim.0 as usize * 8)?;
        let denom = tm as f64;
        let secs = timed(gpu, s, reps, || run_kernel(gpu, s, "mse", cfg, &[K::P(y.0), K::P(x.0), K::P(dx.0), K::P(partial.0), K::I64(tm as i64), K::F64(denom)]))?;
        record(KernelClass::Loss, secs, &mut out);
        // Drawing the batch on the device: [8 x 2048, width] as LoadBatch does.
        let (batch, per_seq) = (8usize, (t / 8) * m);
        let blocks = batch * per_seq.div_ceil(8);
        let secs = timed(gpu, s, reps, || {
            let args = [K::P(x.0), K::I64(per_seq as i64), K::I32(batch as i32), K::U32(1), K::U32(2), K::U32(3), K::U32(4), K::U32(5), K::U32(6), K::I64(0)];
            run_kernel(gpu, s, "load_batch_x", gpu.grid(blocks), &args)?;
            run_kernel(gpu, s, "rotate_rows_left", gpu.grid(tm), &[K::P(x.0), K::P(y.0), K::I64(t as i64), K::I32(m as i32)])
        })?;
        record(KernelClass::Data, secs, &mut out);
        // Combine forward and backward: expert rows [rows_e, width] back into [tokens, width],
        // top-k slots spread over the expert rows.
        let back = Buf::new(s, rows_e * m * 4)?;
        let dback = Buf::new(s, rows_e * m * 4)?;
        fill_f32(gpu, s, back.0, rows_e * m)?;
        let assigns = t * k;
        let slots_host: Vec<i32> = (0..assigns).map(|a| ((a * 7919) % rows_e) as i32).collect();
        let (slots, w, dw) = (Buf::new(s, assigns * 4)?, Buf::new(s, assigns * 4)?, Buf::new(s, assigns * 4)?);
        upload_i32(s, slots.0, &slots_host)?;
        fill_f32(gpu, s, w.0, assigns)?;
        let secs = timed(gpu, s, reps, || {
            run_kernel(gpu, s, "combine_fwd", gpu.grid(tm), &[K::P(back.0), K::P(slots.0), K::P(w.0), K::P(x.0), K::P(y.0), K::I64(t as i64), K::I32(k as i32), K::I32(m as i32)])
        })?;
        record(KernelClass::Combine, secs, &mut out);
        let secs = timed(gpu, s, reps, || {
            run_kernel(gpu, s, "combine_bwd_rows", gpu.grid(assigns * m), &[K::P(dy.0), K::P(slots.0), K::P(w.0), K::P(dback.0), K::I64(assigns as i64), K::I32(k as i32), K::I32(m as i32)])?;
            run_kernel(gpu, s, "combine_bwd_weights", warp(assigns), &[K::P(dy.0), K::P(back.0), K::P(slots.0), K::P(dw.0), K::I64(assigns as i64), K::I32(k as i32), K::I32(m as i32)])
        })?;
        record(KernelClass::CombineBwd, secs, &mut out);
        // A layout op's device part: one row gather of the expert rows by a row map.
        let codes_host: Vec<i32> = (0..rows_e).map(|r| ((r * 7919) % rows_e) as i32 + 1).collect();
        let codes = Buf::new(s, rows_e * 4)?;
        upload_i32(s, codes.0, &codes_host)?;
        let secs = timed(gpu, s, reps, || {
            run_kernel(gpu, s, "gather2_rows", gpu.grid(rows_e * m), &[K::P(back.0), K::P(0), K::P(codes.0), K::P(dback.0), K::I64(rows_e as i64), K::I32(m as i32)])
        })?;
        record(KernelClass::Layout, secs, &mut out);
    }
    {
        // The expert activation (GELU) forward and backward on [rows_e, hidden].
        let n = rows_e * hidden;
        let (h, a, dh) = (Buf::new(s, n * 4)?, Buf::new(s, n * 4)?, Buf::new(s, n * 4)?);
        fill_f32(gpu, s, h.0, n)?;
        fill_f32(gpu, s, a.0, n)?;
        let secs = timed(gpu, s, reps, || run_kernel(gpu, s, "act_fwd", gpu.grid(n), &[K::P(h.0), K::P(a.0), K::I64(n as i64), K::I32(0)]))?;
        record(KernelClass::Act, secs, &mut out);
        let secs = timed(gpu, s, reps, || run_kernel(gpu, s, "act_bwd", gpu.grid(n), &[K::P(h.0), K::P(a.0), K::P(dh.0), K::I64(n as i64), K::I32(0)]))?;
        record(KernelClass::ActBwd, secs, &mut out);
    }
    {
        // Adam over KERNEL_PARAMS parameters (state zeroed, step 1).
        let n = KERNEL_PARAMS;
        let (p, g, m1, v) = (Buf::new(s, n * 4)?, Buf::new(s, n * 4)?, Buf::new(s, n * 4)?, Buf::new(s, n * 4)?);
        fill_f32(gpu, s, p.0, n)?;
        fill_f32(gpu, s, g.0, n)?;
        for z in [&m1, &v] {
            // SAFETY: z holds n f32 on this device; ordered on s.
            unsafe { result::memset_d8_async(z.0, 0, n * 4, s.stream.cu_stream()) }.map_err(GpuError::driver("cuMemsetD8Async"))?;
        }
        let (b1, b2) = (0.9f32, 0.999f32);
        let secs = timed(gpu, s, reps, || {
            let args = [K::P(p.0), K::P(g.0), K::P(m1.0), K::P(v.0), K::I64(n as i64), K::F32(1e-4), K::F32(b1), K::F32(b2), K::F32(1e-8), K::F32(1.0 - b1), K::F32(1.0 - b2)];
            run_kernel(gpu, s, "adam", gpu.grid(n), &args)
        })?;
        record(KernelClass::Optimizer, secs, &mut out);
    }
    Ok(out)
}

fn nccl_check(call: &'static str, r: nccl::ncclResult_t) -> Result<(), GpuError> {
    if r == nccl::ncclResult_t::ncclSuccess {
        Ok(())
    } else {
        Err(GpuError::Nccl { op: call, status: format!("{r:?}") })
    }
}

/// One NCCL communicator per GPU `0..n` of this process (`ncclCommInitAll`), destroyed on drop.
struct Comms(Vec<nccl::ncclComm_t>);

impl Comms {
    fn init_all(n: usize) -> Result<Comms, GpuError> {
        let mut comms = vec![std::ptr::null_mut(); n];
        let ordinals: Vec<i32> = (0..n as i32).collect();
        // SAFETY: comms has room for n communicators; ordinals name n distinct visible devices.
        nccl_check("ncclCommInitAll", unsafe { nccl::ncclCommInitAll(comms.as_mut_ptr(), n as i32, ordinals.as_ptr()) })?;
        Ok(Comms(comms))
    }
}

impl Drop for Comms {
    fn drop(&mut self) {
        for &c in &self.0 {
            // SAFETY: initialised by init_all, destroyed once.
            unsafe {
                let _ = nccl::ncclCommDestroy(c);
            }
        }
    }
}

/// One GPU's part of an all-to-all of `elems` f32 per GPU over `n` GPUs (equal parts, its own
/// included), to be called inside an NCCL group.
///
/// # Safety
/// `send` and `recv` hold `elems` f32 on the communicator's device; `stream` is that device's.
unsafe fn all_to_all_part(send: *const std::ffi::c_void, recv: *mut std::ffi::c_void, elems: usize, n: usize, comm: nccl::ncclComm_t, stream: nccl::cudaStream_t) -> Result<(), GpuError> {
    let (part, f32t) = (elems / n, nccl::ncclDataType_t::ncclFloat32);
    for p in 0..n {
        let off = (p * part * 4) as isize;
        nccl_check("ncclSend", nccl::ncclSend(send.byte_offset(off), part, f32t, p as i32, comm, stream))?;
        nccl_check("ncclRecv", nccl::ncclRecv(recv.byte_offset(off), part, f32t, p as i32, comm, stream))?;
    }
    Ok(())
}

/// The collective sweep over GPUs `0..n` from this thread (grouped NCCL calls).
fn collective_sweep(n: usize, reps: usize, on_line: &mut dyn FnMut(&str)) -> Result<Vec<CollectiveMeasure>, GpuError> {
    let ctxs: Vec<Arc<CudaContext>> = (0..n).map(|i| CudaContext::new(i).map_err(GpuError::driver("cuCtxCreate"))).collect::<Result<_, _>>()?;
    let streams = ctxs.iter().map(|c| c.new_stream().map_err(GpuError::driver("cuStreamCreate"))).collect::<Result<Vec<_>, _>>()?;
    let comms = Comms::init_all(n)?;
    let most = *COLLECTIVE_BYTES.iter().max().unwrap_or(&1);
    let mut bufs = Vec::new();
    for c in &ctxs {
        c.bind_to_thread().map_err(GpuError::driver("cuCtxSetCurrent"))?;
        // SAFETY: plain allocations on the bound device, freed below.
        let send = unsafe { result::malloc_sync(most) }.map_err(GpuError::driver("cuMemAlloc"))?;
        let recv = unsafe { result::malloc_sync(most * n) }.map_err(GpuError::driver("cuMemAlloc"))?;
        bufs.push((send, recv));
    }
    let f32t = nccl::ncclDataType_t::ncclFloat32;
    let mut out = Vec::new();
    for kind in CollectiveKind::ALL {
        for &bytes in &COLLECTIVE_BYTES {
            let elems = bytes / 4;
            let run = || -> Result<(), GpuError> {
                nccl_check("ncclGroupStart", unsafe { nccl::ncclGroupStart() })?;
                for (i, ((send, recv), comm)) in bufs.iter().zip(&comms.0).enumerate() {
                    let st = streams[i].cu_stream() as nccl::cudaStream_t;
                    let (s, r) = (*send as *const std::ffi::c_void, *recv as *mut std::ffi::c_void);
                    // SAFETY: send holds `most` >= bytes, recv n * most; comm and stream are
                    // this device's; the calls are grouped, so one thread may drive all GPUs.
                    unsafe {
                        match kind {
                            CollectiveKind::AllReduce => nccl_check("ncclAllReduce", nccl::ncclAllReduce(s, r, elems, f32t, nccl::ncclRedOp_t::ncclSum, *comm, st))?,
                            CollectiveKind::AllGather => nccl_check("ncclAllGather", nccl::ncclAllGather(s, r, elems, f32t, *comm, st))?,
                            CollectiveKind::ReduceScatter => {
                                nccl_check("ncclReduceScatter", nccl::ncclReduceScatter(s, r, elems / n, f32t, nccl::ncclRedOp_t::ncclSum, *comm, st))?
                            }
                            CollectiveKind::AllToAll => all_to_all_part(s, r, elems, n, *comm, st)?,
                        }
                    }
                }
                nccl_check("ncclGroupEnd", unsafe { nccl::ncclGroupEnd() })
            };
            for _ in 0..2 {
                run()?;
            }
            let mut times = Vec::new();
            for _ in 0..reps.max(1) {
                let ev: Vec<(CudaEvent, CudaEvent)> = ctxs.iter().map(|c| Ok((event(c)?, event(c)?))).collect::<Result<_, GpuError>>()?;
                for (e, s) in ev.iter().zip(&streams) {
                    e.0.record(s).map_err(GpuError::driver("cuEventRecord"))?;
                }
                run()?;
                for (e, s) in ev.iter().zip(&streams) {
                    e.1.record(s).map_err(GpuError::driver("cuEventRecord"))?;
                }
                let mut worst = 0.0f64;
                for e in &ev {
                    e.1.synchronize().map_err(GpuError::driver("cuEventSynchronize"))?;
                    worst = worst.max(e.0.elapsed_ms(&e.1).map_err(GpuError::driver("cuEventElapsedTime"))? as f64 * 1e-3);
                }
                times.push(worst);
            }
            let seconds = median(times);
            let gbps = kind.wire_bytes(bytes as f64, n) / seconds / 1e9;
            on_line(&format!("{} x{n} {} MiB: {:.1} us, {gbps:.1} GB/s on the wire per GPU", kind.as_str(), bytes >> 20, seconds * 1e6));
            out.push(CollectiveMeasure { kind, members: n, bytes: bytes as f64, seconds });
        }
    }
    for (c, (s, r)) in ctxs.iter().zip(bufs) {
        c.bind_to_thread().map_err(GpuError::driver("cuCtxSetCurrent"))?;
        // SAFETY: allocated above on this device, no work pending after the syncs.
        unsafe {
            let _ = result::free_sync(s);
            let _ = result::free_sync(r);
        }
    }
    Ok(out)
}

/// All-to-all payload per GPU of the beside-GEMM probe (about MPMoE's chunk all-to-alls).
pub const BESIDE_GEMM_BYTES: usize = 32 << 20;

/// How long after a GEMM's launch the probe launches its late all-to-all, microseconds.
pub const BESIDE_GEMM_OFFSET_US: u64 = 300;

/// The beside-GEMM probe over GPUs `0..n` (one thread drives them all; one GPU sends to
/// itself): on each GPU a bf16
/// GEMM on a normal stream and a [`BESIDE_GEMM_BYTES`] all-to-all on a high-priority stream
/// (the executor's comm stream), the all-to-all alone, launched just before the GEMM, and
/// launched [`BESIDE_GEMM_OFFSET_US`] after it. Two GEMMs: the square 8192^3 forward form and
/// MPMoE's backward weight gradient (4 experts x 14,336 x 4,096 over 1,280 rows, `Tn`).
fn beside_gemm_probe(n: usize, reps: usize, on_line: &mut dyn FnMut(&str)) -> Result<Vec<BesideGemmMeasure>, GpuError> {
    let gpus: Vec<Gpu> = (0..n).map(Gpu::open).collect::<Result<_, _>>()?;
    let mut compute = Vec::new();
    let mut comm = Vec::new();
    for g in &gpus {
        g.ctx.bind_to_thread().map_err(GpuError::driver("cuCtxSetCurrent"))?;
        compute.push(g.new_stream(false)?);
        comm.push(g.new_stream(true)?);
    }
    let comms = Comms::init_all(n)?;
    // (name, form, dims, batch)
    let gemms: [(&str, GemmForm, GemmDims, usize); 2] = [
        ("bf16 8192 x 8192 x 8192, Nn", GemmForm::Nn, GemmDims { m: 8192, k: 8192, n: 8192 }, 1),
        ("bf16 4 x (14336 x 4096 over 1280 rows), Tn (MPMoE dW)", GemmForm::Tn, GemmDims { m: 14336, k: 1280, n: 4096 }, 4),
    ];
    let most = |f: fn(&GemmDims) -> usize| gemms.iter().map(|(_, _, d, b)| f(d) * b).max().unwrap_or(1);
    let (na, nb, nc) = (most(|d| d.m * d.k), most(|d| d.k * d.n), most(|d| d.m * d.n));
    let mut bufs = Vec::new();
    for (i, g) in gpus.iter().enumerate() {
        g.ctx.bind_to_thread().map_err(GpuError::driver("cuCtxSetCurrent"))?;
        let s = &compute[i];
        let (a, b, c) = (Buf::new(s, na * 2)?, Buf::new(s, nb * 2)?, Buf::new(s, nc * 2)?);
        fill_bf16(g, s, a.0, na)?;
        fill_bf16(g, s, b.0, nb)?;
        let (send, recv) = (Buf::new(s, BESIDE_GEMM_BYTES)?, Buf::new(s, BESIDE_GEMM_BYTES)?);
        s.stream.synchronize().map_err(GpuError::driver("cuStreamSynchronize"))?;
        bufs.push((a, b, c, send, recv));
    }
    let a2a = || -> Result<(), GpuError> {
        nccl_check("ncclGroupStart", unsafe { nccl::ncclGroupStart() })?;
        for (i, comm_i) in comms.0.iter().enumerate() {
            let st = comm[i].stream.cu_stream() as nccl::cudaStream_t;
            let (sp, rp) = (bufs[i].3 .0 as *const std::ffi::c_void, bufs[i].4 .0 as *mut std::ffi::c_void);
            // SAFETY: send and recv hold BESIDE_GEMM_BYTES; grouped calls on this device's
            // communicator and comm stream.
            unsafe { all_to_all_part(sp, rp, BESIDE_GEMM_BYTES / 4, n, *comm_i, st)? };
        }
        nccl_check("ncclGroupEnd", unsafe { nccl::ncclGroupEnd() })
    };
    let ms = |a: &CudaEvent, b: &CudaEvent| -> Result<f64, GpuError> { Ok(a.elapsed_ms(b).map_err(GpuError::driver("cuEventElapsedTime"))? as f64 * 1e3) };
    let sync_all = || -> Result<(), GpuError> {
        for (i, g) in gpus.iter().enumerate() {
            g.ctx.bind_to_thread().map_err(GpuError::driver("cuCtxSetCurrent"))?;
            compute[i].stream.synchronize().map_err(GpuError::driver("cuStreamSynchronize"))?;
            comm[i].stream.synchronize().map_err(GpuError::driver("cuStreamSynchronize"))?;
        }
        Ok(())
    };
    let mut out = Vec::new();
    for (name, form, dims, batch) in gemms {
        let gemm_on = |i: usize| -> Result<(), GpuError> {
            gpus[i].ctx.bind_to_thread().map_err(GpuError::driver("cuCtxSetCurrent"))?;
            let bt = (batch > 1).then_some(Batch { count: batch, a_stride: dims.m * dims.k, b_stride: dims.k * dims.n, c_stride: dims.m * dims.n });
            // SAFETY: a, b, c hold the largest operands of the probe in bf16; the handle is
            // bound to this GPU's compute stream.
            unsafe { bf16_gemm_raw_batched(compute[i].blas, form, bufs[i].0 .0, bufs[i].1 .0, bufs[i].2 .0, dims, 0.0, false, bt) }
        };
        // (gemm alone, a2a alone, a2a first, gemm beside it, late a2a, its end after the gemm's)
        let mut rows: Vec<[f64; 6]> = Vec::new();
        for rep in 0..reps.max(1) + 1 {
            let mut r = [0.0f64; 6];
            // Modes: 0 each alone (the GEMM, then the all-to-all), 1 the all-to-all launched
            // first, 2 the all-to-all launched BESIDE_GEMM_OFFSET_US after the GEMM.
            for mode in 0..3 {
                sync_all()?;
                let ev: Vec<[CudaEvent; 4]> = gpus.iter().map(|g| Ok([event(&g.ctx)?, event(&g.ctx)?, event(&g.ctx)?, event(&g.ctx)?])).collect::<Result<_, GpuError>>()?;
                let rec = |i: usize, k: usize, on_comm: bool| -> Result<(), GpuError> {
                    let st = if on_comm { &comm[i].stream } else { &compute[i].stream };
                    ev[i][k].record(st).map_err(GpuError::driver("cuEventRecord"))
                };
                let launch_gemm = || -> Result<(), GpuError> {
                    for i in 0..n {
                        rec(i, 0, false)?;
                        gemm_on(i)?;
                        rec(i, 1, false)?;
                    }
                    Ok(())
                };
                let launch_a2a = || -> Result<(), GpuError> {
                    for (i, g) in gpus.iter().enumerate() {
                        g.ctx.bind_to_thread().map_err(GpuError::driver("cuCtxSetCurrent"))?;
                        rec(i, 2, true)?;
                    }
                    a2a()?;
                    for (i, g) in gpus.iter().enumerate() {
                        g.ctx.bind_to_thread().map_err(GpuError::driver("cuCtxSetCurrent"))?;
                        rec(i, 3, true)?;
                    }
                    Ok(())
                };
                match mode {
                    0 => {
                        launch_gemm()?;
                        sync_all()?;
                        launch_a2a()?;
                    }
                    1 => {
                        launch_a2a()?;
                        launch_gemm()?;
                    }
                    _ => {
                        launch_gemm()?;
                        let t = std::time::Instant::now();
                        while t.elapsed() < std::time::Duration::from_micros(BESIDE_GEMM_OFFSET_US) {
                            std::hint::spin_loop();
                        }
                        launch_a2a()?;
                    }
                }
                sync_all()?;
                for e in &ev {
                    let (g, c) = (ms(&e[0], &e[1])?, ms(&e[2], &e[3])?);
                    match mode {
                        0 => {
                            r[0] = r[0].max(g);
                            r[1] = r[1].max(c);
                        }
                        1 => {
                            r[2] = r[2].max(c);
                            r[3] = r[3].max(g);
                        }
                        _ => {
                            r[4] = r[4].max(c);
                            r[5] = r[5].max(ms(&e[1], &e[3])?);
                        }
                    }
                }
            }
            if rep > 0 {
                rows.push(r);
            }
        }
        let med = |k: usize| median(rows.iter().map(|r| r[k]).collect());
        let m = BesideGemmMeasure {
            gemm: name.to_string(),
            members: n,
            bytes: BESIDE_GEMM_BYTES as f64,
            gemm_us: med(0),
            a2a_alone_us: med(1),
            a2a_first_us: med(2),
            gemm_with_a2a_us: med(3),
            offset_us: BESIDE_GEMM_OFFSET_US as f64,
            a2a_late_us: med(4),
            late_end_after_gemm_us: med(5),
        };
        on_line(&format!(
            "all_to_all x{n} {} MiB beside {}: GEMM {:.0} us, all-to-all alone {:.0} us; launched first {:.0} us (GEMM {:.0} us); launched {} us after the GEMM {:.0} us, ending {:+.0} us after the GEMM's end",
            BESIDE_GEMM_BYTES >> 20, m.gemm, m.gemm_us, m.a2a_alone_us, m.a2a_first_us, m.gemm_with_a2a_us, BESIDE_GEMM_OFFSET_US, m.a2a_late_us, m.late_end_after_gemm_us
        ));
        out.push(m);
    }
    sync_all()?;
    Ok(out)
}

/// Measures everything on GPU 0 (and the collectives over all visible GPUs when there are
/// two or more); `on_line` gets one line per measurement.
pub fn measure(reps: usize, on_line: &mut dyn FnMut(&str)) -> Result<Calibration, GpuError> {
    let gpus = super::visible_gpus();
    let gpu = Gpu::open(0)?;
    gpu.ctx.bind_to_thread().map_err(GpuError::driver("cuCtxSetCurrent"))?;
    let s = gpu.new_stream(false)?;
    let mut gemms = gemm_sweep(&gpu, &s, reps, on_line)?;
    gemms.extend(batched_gemm_sweep(&gpu, &s, reps, on_line)?);
    let f32_outputs = f32_output_sweep(&gpu, &s, reps, on_line)?;
    let zero_rows = zero_rows_probe(&gpu, &s, reps, on_line)?;
    let gemm_context = gemm_context_probe(&gpu, &s, reps, on_line)?;
    let host_copies = host_copy_probe(&gpu, reps, on_line)?;
    let (launch_us, copy_tbps) = launch_and_copy(&gpu, &s, reps)?;
    on_line(&format!("kernel gap {launch_us:.2} us, device copy {copy_tbps:.2} TB/s"));
    let (host_sync_us, host_gbps) = host_round_trip(&gpu, &s, reps, launch_us)?;
    on_line(&format!("host round trip {host_sync_us:.1} us, host copy {host_gbps:.2} GB/s"));
    let kernels = kernel_sweep(&gpu, &s, reps, on_line)?;
    let collectives = if gpus >= 2 { collective_sweep(gpus, reps, on_line)? } else { Vec::new() };
    // On one GPU the all-to-all is NCCL's copy to itself: still a collective kernel beside
    // the GEMM, which is what the probe asks about.
    let beside_gemm = beside_gemm_probe(gpus.max(1), reps, on_line)?;
    Ok(Calibration {
        device: gpu.info.name.clone(),
        gpus,
        date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        gemms,
        launch_us,
        copy_tbps,
        collectives,
        host_sync_us: Some(host_sync_us),
        host_gbps: host_gbps.is_finite().then_some(host_gbps),
        kernels,
        f32_outputs,
        beside_gemm,
        zero_rows,
        gemm_context,
        host_copies,
    })
}
