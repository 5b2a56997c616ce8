//! `moelab calibrate`: measures a hardware profile's terms on the GPUs present: a cuBLAS
//! GEMM sweep in bf16 and f32 (square shapes and the shapes MoE blocks run), the gap between
//! back-to-back kernels, device copy bandwidth, and, with two or more GPUs, NCCL all-to-all,
//! all-reduce, all-gather and reduce-scatter over a range of sizes (one process driving every
//! GPU through one grouped NCCL call per collective). `backend::sim::calibration` turns the
//! numbers into a profile.

use super::bench::{launch, Buf, A};
use super::gpu::{Gpu, GpuStream};
use crate::backend::sim::calibration::{Calibration, CollectiveMeasure, GemmMeasure};
use crate::backend::sim::profile::{CollectiveKind, GemmDtype};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{result, CudaContext, CudaEvent, LaunchConfig};
use cudarc::nccl::sys as nccl;
use moelab_kernels::error::GpuError;
use moelab_kernels::gemm::{bf16_gemm_raw, sgemm_raw};
use moelab_kernels::{GemmDims, GemmForm};
use std::sync::Arc;

/// GEMM shapes `(m, n, k)` of the sweep: squares for the curve, then the shapes MoE blocks
/// run (mixtral-ish and fine-grained expert GEMMs forward and backward, attention heads,
/// dense projections).
pub const GEMM_SHAPES: [(usize, usize, usize); 19] = [
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
        let (e0, e1) = (event(&gpu.ctx)?, event(&gpu.ctx)?);
        e0.record(&s.stream).map_err(GpuError::driver("cuEventRecord"))?;
        f()?;
        e1.record(&s.stream).map_err(GpuError::driver("cuEventRecord"))?;
        e1.synchronize().map_err(GpuError::driver("cuEventSynchronize"))?;
        times.push(e0.elapsed_ms(&e1).map_err(GpuError::driver("cuEventElapsedTime"))? as f64 * 1e-3);
    }
    Ok(median(times))
}

fn fill_f32(gpu: &Gpu, s: &GpuStream, ptr: u64, n: usize) -> Result<(), GpuError> {
    // The data stream's normals (any values do; real ones keep the GEMM's power draw honest).
    let args = [A::P(ptr), A::I64(n as i64), A::I32(1), A::U32(1), A::U32(2), A::U32(3), A::U32(4), A::U32(5), A::U32(6), A::I64(0)];
    launch(gpu, s, "load_batch_x", gpu.grid(n.div_ceil(8)), &args)
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
                GemmDtype::Bf16 => launch(gpu, s, "bf16_fill_hash", gpu.grid(n), &[A::P(buf.0), A::I64(n as i64), A::U32(7), A::F32(0.05)])?,
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
            out.push(GemmMeasure { dtype, m, n, k, tflops });
        }
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

fn nccl_check(call: &'static str, r: nccl::ncclResult_t) -> Result<(), GpuError> {
    if r == nccl::ncclResult_t::ncclSuccess {
        Ok(())
    } else {
        Err(GpuError::Nccl { op: call, status: format!("{r:?}") })
    }
}

/// The collective sweep over GPUs `0..n` from this thread (grouped NCCL calls).
fn collective_sweep(n: usize, reps: usize, on_line: &mut dyn FnMut(&str)) -> Result<Vec<CollectiveMeasure>, GpuError> {
    let ctxs: Vec<Arc<CudaContext>> = (0..n).map(|i| CudaContext::new(i).map_err(GpuError::driver("cuCtxCreate"))).collect::<Result<_, _>>()?;
    let streams = ctxs.iter().map(|c| c.new_stream().map_err(GpuError::driver("cuStreamCreate"))).collect::<Result<Vec<_>, _>>()?;
    let mut comms = vec![std::ptr::null_mut(); n];
    let ordinals: Vec<i32> = (0..n as i32).collect();
    // SAFETY: comms has room for n communicators; ordinals name n distinct visible devices.
    nccl_check("ncclCommInitAll", unsafe { nccl::ncclCommInitAll(comms.as_mut_ptr(), n as i32, ordinals.as_ptr()) })?;
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
                for (i, ((send, recv), comm)) in bufs.iter().zip(&comms).enumerate() {
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
                            CollectiveKind::AllToAll => {
                                let part = elems / n;
                                for p in 0..n {
                                    let off = (p * part * 4) as isize;
                                    nccl_check("ncclSend", nccl::ncclSend(s.byte_offset(off), part, f32t, p as i32, *comm, st))?;
                                    nccl_check("ncclRecv", nccl::ncclRecv(r.byte_offset(off), part, f32t, p as i32, *comm, st))?;
                                }
                            }
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
    for comm in comms {
        // SAFETY: initialised above, destroyed once.
        unsafe {
            let _ = nccl::ncclCommDestroy(comm);
        }
    }
    Ok(out)
}

/// Measures everything on GPU 0 (and the collectives over all visible GPUs when there are
/// two or more); `on_line` gets one line per measurement.
pub fn measure(reps: usize, on_line: &mut dyn FnMut(&str)) -> Result<Calibration, GpuError> {
    let gpus = super::visible_gpus();
    let gpu = Gpu::open(0)?;
    gpu.ctx.bind_to_thread().map_err(GpuError::driver("cuCtxSetCurrent"))?;
    let s = gpu.new_stream(false)?;
    let gemms = gemm_sweep(&gpu, &s, reps, on_line)?;
    let (launch_us, copy_tbps) = launch_and_copy(&gpu, &s, reps)?;
    on_line(&format!("kernel gap {launch_us:.2} us, device copy {copy_tbps:.2} TB/s"));
    let (host_sync_us, host_gbps) = host_round_trip(&gpu, &s, reps, launch_us)?;
    on_line(&format!("host round trip {host_sync_us:.1} us, host copy {host_gbps:.2} GB/s"));
    let collectives = if gpus >= 2 { collective_sweep(gpus, reps, on_line)? } else { Vec::new() };
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
    })
}
