//! One GPU as the plan executor sees it: a context, the plan kernels (`plan_ops.cu`, NVRTC
//! compiled for the device's architecture and cached on disk), and one CUDA stream with its
//! own cuBLAS handle per plan stream. Buffers are raw device pointers owned by
//! [`super::store::DevStore`]; ordering across streams is the executor's job (events), so
//! cudarc's per-buffer event tracking is off.

use cudarc::cublas::sys::cublasHandle_t;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig};
use cudarc::nvrtc::Ptx;
use moelab_kernels::device::{probe_ordinal, require_cublas, require_nvrtc};
use moelab_kernels::error::{no_panic, GpuError};
use moelab_kernels::nvrtc::{arch_for, compile_extra, PtxCache};
use moelab_kernels::DeviceInfo;
use std::collections::HashMap;
use std::sync::Arc;

/// The kernels of `plan_ops.cu` (f32 plans, and the `_bf16` variants of bf16 plans) and
/// `bench_ops.cu` and `route_ops.cu`, by name.
pub const KERNELS: &[&str] = &[
    "gather_rows", "token_sum_rows", "combine_fwd", "combine_bwd_rows", "combine_bwd_weights", "add_bias_rows", "col_partials", "col_finish",
    "add_inplace", "adam", "mse", "route_topk", "route_bwd", "act_fwd", "act_bwd", "ln_fwd", "ln_bwd_dx", "ln_bwd_partials",
    "attn_softmax_causal", "attn_softmax_causal_bwd", "gather2_rows", "load_batch_x", "rotate_rows_left",
    "gather_rows_bf16", "token_sum_rows_bf16", "combine_fwd_bf16", "combine_bwd_rows_bf16", "combine_bwd_weights_bf16", "add_bias_rows_bf16",
    "col_partials_bf16", "add_inplace_bf16", "cast_bf16_f32", "adam_shadow", "mse_bf16", "act_fwd_bf16", "act_bwd_bf16",
    "ln_fwd_bf16", "ln_bwd_dx_bf16", "ln_bwd_partials_bf16", "attn_softmax_causal_bf16", "attn_softmax_causal_bwd_bf16", "gather2_rows_bf16",
    "load_batch_x_bf16", "rotate_rows_left_bf16", "bf16_gather_rows", "bf16_combine", "bf16_combine_bwd_rows", "bf16_combine_bwd_weights", "bf16_token_sum",
    "f32_to_bf16_kernel", "bf16_fill_hash", "route_hist", "route_slots", "route_counts", "dispatch_slots", "block_row_map",
];

/// The executor's and the benchmark's kernels: one NVRTC compilation unit (common.cuh is
/// prepended by the compiler), loaded as one module.
pub const PLAN_KERNEL_SOURCE: &str = concat!(include_str!("plan_ops.cu"), "\n", include_str!("bench_ops.cu"), "\n", include_str!("route_ops.cu"));

/// Threads per block for grid-stride kernels.
pub const BLOCK: u32 = 256;

/// A GPU with the plan kernels loaded.
pub struct Gpu {
    /// The context (primary context of the ordinal).
    pub ctx: Arc<CudaContext>,
    /// What the probe read.
    pub info: DeviceInfo,
    _module: Arc<CudaModule>,
    funcs: HashMap<&'static str, CudaFunction>,
}

/// A CUDA stream with its cuBLAS handle; one per plan stream.
pub struct GpuStream {
    /// The stream.
    pub stream: Arc<CudaStream>,
    /// cuBLAS handle bound to `stream`.
    pub blas: cublasHandle_t,
}

// SAFETY: a cuBLAS handle may be used from any thread as long as calls on it do not overlap;
// each GpuStream is used by exactly one host thread at a time (its plan stream's thread).
unsafe impl Send for GpuStream {}
unsafe impl Sync for GpuStream {}

impl Drop for GpuStream {
    fn drop(&mut self) {
        // SAFETY: the handle was created by create_handle and is destroyed once.
        unsafe {
            let _ = cudarc::cublas::result::destroy_handle(self.blas);
        }
    }
}

impl Gpu {
    /// Opens GPU `ordinal` and loads the plan kernels (compiling them on first use).
    pub fn open(ordinal: usize) -> Result<Gpu, GpuError> {
        let info = probe_ordinal(ordinal)?;
        require_nvrtc()?;
        require_cublas()?;
        no_panic("Gpu::open", || {
            let ctx = CudaContext::new(ordinal).map_err(GpuError::driver("CudaContext::new"))?;
            // SAFETY: no buffer exists in this context yet; the executor orders every access
            // with stream order and explicit events.
            unsafe { ctx.disable_event_tracking() };
            let arch = arch_for(info.compute_capability.0, info.compute_capability.1);
            let ptx = compile_extra("plan_ops.cu", PLAN_KERNEL_SOURCE, &arch, &PtxCache::from_env())?;
            let module = ctx
                .load_module(Ptx::from_src(ptx))
                .map_err(|source| GpuError::Load { what: "plan_ops.cu".into(), source })?;
            let mut funcs = HashMap::new();
            for &name in KERNELS {
                let f = module.load_function(name).map_err(|source| GpuError::Load { what: name.to_string(), source })?;
                funcs.insert(name, f);
            }
            Ok(Gpu { ctx, info, _module: module, funcs })
        })
    }

    /// A new stream with its own cuBLAS handle; `high_priority` streams get the device's
    /// greatest priority (the plan's comm stream), so their kernels take SMs first when
    /// kernels of both streams wait. It does not preempt: an all-to-all launched while a cuBLAS
    /// GEMM runs still ends with that GEMM (`moelab calibrate`'s beside-GEMM probe, H100 and
    /// H200, 2026-11-24).
    pub fn new_stream(&self, high_priority: bool) -> Result<GpuStream, GpuError> {
        let stream = if high_priority {
            let (_, greatest) = cudarc::driver::result::stream::get_priority_range().map_err(GpuError::driver("cuCtxGetStreamPriorityRange"))?;
            self.ctx.new_stream_with_priority(greatest).map_err(GpuError::driver("cuStreamCreateWithPriority"))?
        } else {
            self.ctx.new_stream().map_err(GpuError::driver("cuStreamCreate"))?
        };
        let blas = cudarc::cublas::result::create_handle().map_err(GpuError::cublas("cublasCreate"))?;
        // SAFETY: both handles are live; the stream outlives the handle (GpuStream drops the
        // handle first, then its Arc of the stream).
        unsafe { cudarc::cublas::result::set_stream(blas, stream.cu_stream() as _) }.map_err(GpuError::cublas("cublasSetStream"))?;
        Ok(GpuStream { stream, blas })
    }

    /// Makes the device's stream-ordered pool a caching allocator (freed blocks stay in the
    /// pool) and resets its high-water mark, so [`Gpu::pool_peak_bytes`] measures this run.
    pub fn configure_pool(&self) -> Result<(), GpuError> {
        use cudarc::driver::sys::{cuMemPoolSetAttribute, CUmemPool_attribute};
        let pool = self.pool()?;
        let mut threshold = u64::MAX;
        let mut zero = 0u64;
        // SAFETY: pool is the device's default pool; both attributes take a u64.
        unsafe {
            cuMemPoolSetAttribute(pool, CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, &mut threshold as *mut u64 as *mut _)
                .result()
                .map_err(GpuError::driver("cuMemPoolSetAttribute"))?;
            cuMemPoolSetAttribute(pool, CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, &mut zero as *mut u64 as *mut _)
                .result()
                .map_err(GpuError::driver("cuMemPoolSetAttribute"))?;
        }
        Ok(())
    }

    /// The most bytes the pool had handed out at once (every plan buffer and scratch).
    pub fn pool_peak_bytes(&self) -> Result<u64, GpuError> {
        use cudarc::driver::sys::{cuMemPoolGetAttribute, CUmemPool_attribute};
        let pool = self.pool()?;
        let mut v = 0u64;
        // SAFETY: the attribute is a u64 written through a valid pointer.
        unsafe { cuMemPoolGetAttribute(pool, CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, &mut v as *mut u64 as *mut _) }
            .result()
            .map_err(GpuError::driver("cuMemPoolGetAttribute"))?;
        Ok(v)
    }

    /// Grows the pool by `bytes` in one allocation (freed at once, kept by the pool, see
    /// [`Gpu::configure_pool`]), leaving 1 GiB of the device free; returns the bytes reserved.
    /// Blocks carved from one large reserve come back at once, where a pool grown piecemeal
    /// took about 1 ms per GB for each large allocation of every step (H100, 2026-11-23).
    pub fn reserve_pool(&self, s: &GpuStream, bytes: usize) -> Result<usize, GpuError> {
        let (free, _) = cudarc::driver::result::mem_get_info().map_err(GpuError::driver("cuMemGetInfo"))?;
        let want = bytes.min(free.saturating_sub(1 << 30));
        if want < (64 << 20) {
            return Ok(0);
        }
        let cu = s.stream.cu_stream();
        // SAFETY: allocated and freed on the same live stream, never accessed.
        unsafe {
            // A reserve the device cannot give is no error: the pool grows as before.
            let Ok(p) = cudarc::driver::result::malloc_async(cu, want) else { return Ok(0) };
            cudarc::driver::result::free_async(p, cu).map_err(GpuError::driver("cuMemFreeAsync"))?;
        }
        s.stream.synchronize().map_err(GpuError::driver("cuStreamSynchronize"))?;
        Ok(want)
    }

    fn pool(&self) -> Result<cudarc::driver::sys::CUmemoryPool, GpuError> {
        // SAFETY: the device handle comes from this live context.
        unsafe { cudarc::driver::result::device::get_default_mem_pool(self.ctx.cu_device()) }.map_err(GpuError::driver("cuDeviceGetDefaultMemPool"))
    }

    /// A kernel of `plan_ops.cu`.
    pub fn func(&self, name: &'static str) -> &CudaFunction {
        self.funcs.get(name).unwrap_or_else(|| panic!("kernel {name} is listed in KERNELS"))
    }

    /// Launch shape for a grid-stride loop over `n` items.
    pub fn grid(&self, n: usize) -> LaunchConfig {
        let want = n.div_ceil(BLOCK as usize).max(1);
        let cap = (self.info.sm_count.max(1) as usize) * 32;
        LaunchConfig { grid_dim: (want.min(cap) as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::KERNELS;

    fn names_after<'a>(src: &'a str, marker: &str) -> Vec<&'a str> {
        src.split(marker).skip(1).map(|rest| rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).next().unwrap_or("")).collect()
    }

    /// Every listed kernel is defined (a missing one fails `Gpu::open` on the device), every
    /// defined one is listed, and every kernel the executor picks by storage has its bf16 twin.
    #[test]
    fn kernel_list_matches_the_sources_and_every_storage_variant_exists() {
        let cu = concat!(include_str!("plan_ops.cu"), include_str!("bench_ops.cu"), include_str!("route_ops.cu"));
        let defined = names_after(cu, "extern \"C\" __global__ void ");
        for k in KERNELS {
            assert!(defined.contains(k), "{k} is listed but not defined");
        }
        for d in &defined {
            assert!(KERNELS.contains(d), "{d} is defined but not listed");
        }
        let exec = concat!(include_str!("exec.rs"), include_str!("exec/attention.rs"), include_str!("exec/a2a_2d.rs"));
        let by_storage = names_after(exec, "launch_st(\"");
        assert!(by_storage.len() > 10);
        for k in by_storage {
            assert!(KERNELS.contains(&k), "{k}");
            assert!(KERNELS.contains(&format!("{k}_bf16").as_str()), "{k} has no bf16 variant");
        }
        for k in names_after(exec, "launch(\"") {
            assert!(KERNELS.contains(&k), "{k} is launched but not listed");
        }
    }
}
