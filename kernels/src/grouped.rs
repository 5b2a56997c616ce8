//! Grouped GEMM: many row-major bf16 products of different shapes in one cuBLAS call
//! (`cublasGemmGroupedBatchedEx`, CUDA 12.5+), for expert GEMMs whose row counts differ per
//! expert (dropless routing). Each product keeps the semantics of [`crate::gemm::GemmForm`].

use crate::error::GpuError;
use crate::gemm::{cublas_config, GemmDims, GemmForm};
use cudarc::cublas::sys::{cublasComputeType_t, cublasHandle_t, cudaDataType};
use cudarc::driver::result;
use cudarc::driver::sys::CUstream;
use std::ffi::c_void;

/// One product of a grouped GEMM: row-major operands at device addresses.
#[derive(Debug, Clone, Copy)]
pub struct GroupedProblem {
    /// Left operand (`[m,k]`, or `[k,m]` for [`GemmForm::Tn`]).
    pub a: u64,
    /// Right operand (`[k,n]`, or `[n,k]` for [`GemmForm::Nt`]).
    pub b: u64,
    /// Result `[m,n]`.
    pub c: u64,
    /// Its sizes.
    pub dims: GemmDims,
}

/// Bytes of device scratch a grouped call over `problems` products needs (its pointer arrays).
pub fn grouped_scratch_bytes(problems: usize) -> usize {
    3 * problems.max(1) * std::mem::size_of::<u64>()
}

/// `c_i = op(a_i) op(b_i) + beta c_i` for every problem, bf16 operands and results, f32
/// accumulation, in one cuBLAS call on the handle's stream. Empty products are skipped.
/// `scratch` is device memory of [`grouped_scratch_bytes`] that this call overwrites
/// (stream-ordered: it may be reused by the next call on the same stream).
///
/// # Safety
/// `handle` must be bound to `stream`; every operand must hold the elements its form and dims
/// address; `scratch` must hold `grouped_scratch_bytes(problems.len())` bytes.
pub unsafe fn bf16_grouped_gemm_raw(
    handle: cublasHandle_t,
    stream: CUstream,
    form: GemmForm,
    problems: &[GroupedProblem],
    beta: f32,
    scratch: u64,
) -> Result<(), GpuError> {
    const OP: &str = "bf16_grouped_gemm_raw";
    let lim = |what: &'static str, v: usize| i32::try_from(v).map_err(|_| GpuError::TooLarge { op: OP, what, value: v, limit: i32::MAX as usize });
    let live: Vec<&GroupedProblem> = problems.iter().filter(|p| p.dims.m > 0 && p.dims.n > 0).collect();
    if live.is_empty() {
        return Ok(());
    }
    let g = live.len();
    let (mut ta, mut tb, mut ms, mut ns, mut ks) = (Vec::with_capacity(g), Vec::with_capacity(g), Vec::with_capacity(g), Vec::with_capacity(g), Vec::with_capacity(g));
    let (mut lda, mut ldb, mut ldc) = (Vec::with_capacity(g), Vec::with_capacity(g), Vec::with_capacity(g));
    // Pointer arrays, cuBLAS's order: its A is our b, its B our a (see gemm::cublas_config).
    let mut ptrs = vec![0u64; 3 * g];
    for (i, p) in live.iter().enumerate() {
        let cfg = cublas_config(form, p.dims, beta, lim)?;
        ta.push(cfg.transa);
        tb.push(cfg.transb);
        ms.push(cfg.m);
        ns.push(cfg.n);
        ks.push(cfg.k);
        lda.push(cfg.lda);
        ldb.push(cfg.ldb);
        ldc.push(cfg.ldc);
        ptrs[i] = p.b;
        ptrs[g + i] = p.a;
        ptrs[2 * g + i] = p.c;
    }
    let alpha = vec![1.0f32; g];
    let betas = vec![beta; g];
    let sizes = vec![1i32; g];
    // SAFETY: scratch holds 3g u64 (caller); pageable host memory is staged before return.
    result::memcpy_htod_async(scratch, &ptrs, stream).map_err(GpuError::driver("cuMemcpyHtoDAsync"))?;
    let base = scratch as *const *const c_void;
    let status = cudarc::cublas::sys::cublasGemmGroupedBatchedEx(
        handle,
        ta.as_ptr(),
        tb.as_ptr(),
        ms.as_ptr(),
        ns.as_ptr(),
        ks.as_ptr(),
        alpha.as_ptr() as *const c_void,
        base,
        cudaDataType::CUDA_R_16BF,
        lda.as_ptr(),
        base.add(g),
        cudaDataType::CUDA_R_16BF,
        ldb.as_ptr(),
        betas.as_ptr() as *const c_void,
        base.add(2 * g) as *const *mut c_void,
        cudaDataType::CUDA_R_16BF,
        ldc.as_ptr(),
        lim("groups", g)?,
        sizes.as_ptr(),
        cublasComputeType_t::CUBLAS_COMPUTE_32F,
    );
    status.result().map_err(GpuError::cublas("cublasGemmGroupedBatchedEx"))
}
