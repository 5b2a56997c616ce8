//! Row-major matrix products through cuBLAS, with the semantics of `moelab::math::linalg`:
//! `C[m,n] (+)= A[m,k] B[k,n]` and the two transposed forms backward needs. bf16 storage
//! accumulates in f32 (`cublasGemmEx`, `CUBLAS_COMPUTE_32F`); f32 uses `cublasSgemm` in
//! cuBLAS's default math mode (no TF32).
//!
//! cuBLAS is column-major. A row-major `X[r, c]` read column-major is `X^T`, so every form is
//! computed as its transpose, `C^T = op(B)^T op(A)^T`, with the operands swapped; see
//! [`GemmForm`] for each mapping.

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::CudaSlice;
use serde::Serialize;

use crate::device::Device;
use crate::dtype::Dtype;
use crate::error::GpuError;

/// Which operand is transposed. Shapes are row-major, as in `moelab::math::linalg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GemmForm {
    /// `C[m,n] = A[m,k] B[k,n]` (`linalg::gemm`, forward). cuBLAS: `C^T[n,m] = B^T A^T`,
    /// both operands as stored.
    Nn,
    /// `C[m,n] = A[k,m]^T B[k,n]` (`linalg::gemm_tn`, weight gradients). cuBLAS:
    /// `C^T = B^T (A^T)^T`, the second operand transposed.
    Tn,
    /// `C[m,n] = A[m,k] B[n,k]^T` (`linalg::gemm_nt`, input gradients). cuBLAS:
    /// `C^T = (B^T)^T A^T`, the first operand transposed.
    Nt,
}

impl GemmForm {
    /// All three forms.
    pub const ALL: [GemmForm; 3] = [GemmForm::Nn, GemmForm::Tn, GemmForm::Nt];

    /// `nn`, `tn` or `nt`.
    pub fn name(self) -> &'static str {
        match self {
            GemmForm::Nn => "nn",
            GemmForm::Tn => "tn",
            GemmForm::Nt => "nt",
        }
    }
}

/// The sizes of one product: `C` is `[m, n]` and the contraction runs over `k`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GemmDims {
    /// Rows of C.
    pub m: usize,
    /// The contracted dimension.
    pub k: usize,
    /// Columns of C.
    pub n: usize,
}

impl GemmDims {
    /// Floating-point operations of the product (2 m k n).
    pub fn flops(self) -> f64 {
        2.0 * self.m as f64 * self.k as f64 * self.n as f64
    }
}

/// The cuBLAS call (column-major) that computes `form` on row-major buffers.
pub(crate) fn cublas_config<T: Dtype>(form: GemmForm, d: GemmDims, beta: T, lim: impl Fn(&'static str, usize) -> Result<i32, GpuError>) -> Result<GemmConfig<T>, GpuError> {
    use cublasOperation_t::{CUBLAS_OP_N as N, CUBLAS_OP_T as T_};
    let (m, k, n) = (lim("m", d.m)?, lim("k", d.k)?, lim("n", d.n)?);
    // cuBLAS's (m, n, k) are ours swapped: it computes C^T[n, m]; its first operand is our B.
    let (transa, lda, transb, ldb) = match form {
        // B[k,n] row-major = B^T[n,k] col-major (ld n); A[m,k] = A^T[k,m] (ld k).
        GemmForm::Nn => (N, n, N, k),
        // B[k,n] as in Nn; A[k,m] row-major = A^T[m,k] col-major (ld m), transposed to [k,m].
        GemmForm::Tn => (N, n, T_, m),
        // B[n,k] row-major = B^T[k,n] col-major (ld k), transposed to [n,k]; A as in Nn.
        GemmForm::Nt => (T_, k, N, k),
    };
    Ok(GemmConfig {
        transa,
        transb,
        m: n,
        n: m,
        k,
        alpha: T::from_f32(1.0),
        lda: lda.max(1),
        ldb: ldb.max(1),
        beta,
        ldc: n.max(1),
    })
}

/// Strides of a batched GEMM: `count` products, operand `i` at `a + i * a_stride` (elements).
#[derive(Debug, Clone, Copy)]
pub struct Batch {
    /// Products in the batch.
    pub count: usize,
    /// Elements between consecutive A operands.
    pub a_stride: usize,
    /// Elements between consecutive B operands.
    pub b_stride: usize,
    /// Elements between consecutive C results.
    pub c_stride: usize,
}

/// Row-major f32 GEMM on raw device pointers: `c[m,n] = op(a) op(b) + beta * c` in `form`,
/// optionally batched. For executors that manage their own buffers (the cuda backend).
///
/// # Safety
/// `handle` must be a live cuBLAS handle bound to the stream that orders the buffers; `a`,
/// `b`, `c` must point to device memory holding at least the elements the form and `batch`
/// address (m*k, k*n, m*n per product).
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_raw(
    handle: cudarc::cublas::sys::cublasHandle_t,
    form: GemmForm,
    a: u64,
    b: u64,
    c: u64,
    dims: GemmDims,
    beta: f32,
    batch: Option<Batch>,
) -> Result<(), GpuError> {
    const OP: &str = "sgemm_raw";
    let lim = |what: &'static str, v: usize| i32::try_from(v).map_err(|_| GpuError::TooLarge { op: OP, what, value: v, limit: i32::MAX as usize });
    let cfg = cublas_config(form, dims, beta, lim)?;
    if dims.m == 0 || dims.n == 0 {
        return Ok(());
    }
    let alpha = 1.0f32;
    // cuBLAS's first operand is our b, its second our a (see cublas_config).
    let r = match batch {
        None => cudarc::cublas::result::sgemm(
            handle, cfg.transa, cfg.transb, cfg.m, cfg.n, cfg.k, &alpha, b as *const f32, cfg.lda, a as *const f32, cfg.ldb, &cfg.beta,
            c as *mut f32, cfg.ldc,
        ),
        Some(bt) => {
            if bt.count == 0 {
                return Ok(());
            }
            cudarc::cublas::result::sgemm_strided_batched(
                handle, cfg.transa, cfg.transb, cfg.m, cfg.n, cfg.k, &alpha, b as *const f32, cfg.lda, bt.b_stride as i64, a as *const f32,
                cfg.ldb, bt.a_stride as i64, &cfg.beta, c as *mut f32, cfg.ldc, bt.c_stride as i64, lim("batch", bt.count)?,
            )
        }
    };
    r.map_err(GpuError::cublas("sgemm"))
}

/// Row-major bf16 GEMM on raw device pointers with f32 accumulation: `c = op(a) op(b) + beta c`,
/// where `a` and `b` are bf16 and `c` is bf16 (`c_f32 = false`) or f32 (`c_f32 = true`).
///
/// # Safety
/// As [`sgemm_raw`], with bf16 (2-byte) elements in `a` and `b`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn bf16_gemm_raw(
    handle: cudarc::cublas::sys::cublasHandle_t,
    form: GemmForm,
    a: u64,
    b: u64,
    c: u64,
    dims: GemmDims,
    beta: f32,
    c_f32: bool,
) -> Result<(), GpuError> {
    bf16_gemm_raw_batched(handle, form, a, b, c, dims, beta, c_f32, None)
}

/// [`bf16_gemm_raw`], optionally strided-batched (`cublasGemmStridedBatchedEx`; strides in
/// elements of each operand's own type): the cuda plan executor's bf16 expert GEMMs.
///
/// # Safety
/// As [`sgemm_raw`], with bf16 (2-byte) elements in `a` and `b`, and `c` of the chosen type.
#[allow(clippy::too_many_arguments)]
pub unsafe fn bf16_gemm_raw_batched(
    handle: cudarc::cublas::sys::cublasHandle_t,
    form: GemmForm,
    a: u64,
    b: u64,
    c: u64,
    dims: GemmDims,
    beta: f32,
    c_f32: bool,
    batch: Option<Batch>,
) -> Result<(), GpuError> {
    use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType};
    const OP: &str = "bf16_gemm_raw";
    let lim = |what: &'static str, v: usize| i32::try_from(v).map_err(|_| GpuError::TooLarge { op: OP, what, value: v, limit: i32::MAX as usize });
    let cfg = cublas_config(form, dims, beta, lim)?;
    if dims.m == 0 || dims.n == 0 {
        return Ok(());
    }
    let alpha = 1.0f32;
    let ctype = if c_f32 { cudaDataType::CUDA_R_32F } else { cudaDataType::CUDA_R_16BF };
    let bf = cudaDataType::CUDA_R_16BF;
    // cuBLAS's first operand is our b, its second our a (see cublas_config).
    match batch {
        None => cudarc::cublas::result::gemm_ex(
            handle, cfg.transa, cfg.transb, cfg.m, cfg.n, cfg.k, &alpha as *const f32 as *const _, b as *const _, bf, cfg.lda,
            a as *const _, bf, cfg.ldb, &cfg.beta as *const f32 as *const _, c as *mut _, ctype, cfg.ldc,
            cublasComputeType_t::CUBLAS_COMPUTE_32F, cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .map_err(GpuError::cublas("cublasGemmEx")),
        Some(bt) => {
            if bt.count == 0 {
                return Ok(());
            }
            cudarc::cublas::result::gemm_strided_batched_ex(
                handle, cfg.transa, cfg.transb, cfg.m, cfg.n, cfg.k, &alpha as *const f32 as *const _, b as *const _, bf, cfg.lda,
                bt.b_stride as i64, a as *const _, bf, cfg.ldb, bt.a_stride as i64, &cfg.beta as *const f32 as *const _, c as *mut _, ctype,
                cfg.ldc, bt.c_stride as i64, lim("batch", bt.count)?, cublasComputeType_t::CUBLAS_COMPUTE_32F, cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
            .map_err(GpuError::cublas("cublasGemmStridedBatchedEx"))
        }
    }
}

impl Device {
    /// `c[m,n] (+)= op(a) op(b)` in the given form; `accumulate` adds to `c` (beta = 1)
    /// instead of overwriting it. `a` holds m*k elements, `b` k*n, `c` m*n.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm<T: Dtype>(
        &self,
        form: GemmForm,
        a: &CudaSlice<T>,
        b: &CudaSlice<T>,
        c: &mut CudaSlice<T>,
        dims: GemmDims,
        accumulate: bool,
    ) -> Result<(), GpuError>
    where
        CudaBlas: Gemm<T>,
    {
        const OP: &str = "gemm";
        let GemmDims { m, k, n } = dims;
        let len = |x: usize, y: usize| x.checked_mul(y).ok_or(GpuError::TooLarge { op: OP, what: "matrix elements", value: usize::MAX, limit: usize::MAX });
        for (what, got, expected) in [("a", a.len(), len(m, k)?), ("b", b.len(), len(k, n)?), ("c", c.len(), len(m, n)?)] {
            if got != expected {
                return Err(GpuError::Shape { op: OP, what, expected, got });
            }
        }
        self.check_owned(OP, "a", a)?;
        self.check_owned(OP, "b", b)?;
        self.check_owned(OP, "c", c)?;
        let lim = |what: &'static str, v: usize| i32::try_from(v).map_err(|_| GpuError::TooLarge { op: OP, what, value: v, limit: i32::MAX as usize });
        let beta = T::from_f32(if accumulate { 1.0 } else { 0.0 });
        let cfg = cublas_config(form, dims, beta, lim)?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let blas = self.blas()?;
        // SAFETY: the handle is bound to this device's stream, on which a, b and c live
        // (checked); their lengths are m*k, k*n and m*n (checked), and cublas_config gives
        // leading dimensions that keep every access of the column-major view inside them
        // (lda/ldb/ldc are the row lengths of the row-major buffers). With k == 0 cuBLAS only
        // scales C by beta, as the reference does.
        unsafe { blas.gemm(cfg, b, a, c) }.map_err(GpuError::cublas("gemm"))
    }

    /// `c[m,n] (+)= a[m,k] b[k,n]`, argument order as `moelab::math::linalg::gemm`.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul<T: Dtype>(&self, a: &CudaSlice<T>, b: &CudaSlice<T>, c: &mut CudaSlice<T>, m: usize, k: usize, n: usize, accumulate: bool) -> Result<(), GpuError>
    where
        CudaBlas: Gemm<T>,
    {
        self.gemm(GemmForm::Nn, a, b, c, GemmDims { m, k, n }, accumulate)
    }

    /// `c[m,n] (+)= a[k,m]^T b[k,n]`, argument order as `moelab::math::linalg::gemm_tn`.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_tn<T: Dtype>(&self, a: &CudaSlice<T>, b: &CudaSlice<T>, c: &mut CudaSlice<T>, k: usize, m: usize, n: usize, accumulate: bool) -> Result<(), GpuError>
    where
        CudaBlas: Gemm<T>,
    {
        self.gemm(GemmForm::Tn, a, b, c, GemmDims { m, k, n }, accumulate)
    }

    /// `c[m,n] (+)= a[m,k] b[n,k]^T`, argument order as `moelab::math::linalg::gemm_nt`.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_nt<T: Dtype>(&self, a: &CudaSlice<T>, b: &CudaSlice<T>, c: &mut CudaSlice<T>, m: usize, k: usize, n: usize, accumulate: bool) -> Result<(), GpuError>
    where
        CudaBlas: Gemm<T>,
    {
        self.gemm(GemmForm::Nt, a, b, c, GemmDims { m, k, n }, accumulate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A column-major GEMM on the host, as cuBLAS defines it, to check the row-major mapping
    /// without a GPU.
    fn colmajor_gemm(cfg: &GemmConfig<f32>, a: &[f32], b: &[f32], c: &mut [f32]) {
        let (m, n, k) = (cfg.m as usize, cfg.n as usize, cfg.k as usize);
        let (lda, ldb, ldc) = (cfg.lda as usize, cfg.ldb as usize, cfg.ldc as usize);
        let ta = cfg.transa == cublasOperation_t::CUBLAS_OP_T;
        let tb = cfg.transb == cublasOperation_t::CUBLAS_OP_T;
        for j in 0..n {
            for i in 0..m {
                let mut s = 0.0;
                for p in 0..k {
                    let av = if ta { a[p + i * lda] } else { a[i + p * lda] };
                    let bv = if tb { b[j + p * ldb] } else { b[p + j * ldb] };
                    s += av * bv;
                }
                // beta == 0 means C is not read (it may hold NaN), as cuBLAS documents.
                let old = if cfg.beta == 0.0 { 0.0 } else { cfg.beta * c[i + j * ldc] };
                c[i + j * ldc] = cfg.alpha * s + old;
            }
        }
    }

    #[test]
    fn row_major_mapping_matches_linalg_for_every_form() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 104_729) % 11) as f32 - 5.0).collect();
        let lim = |_: &'static str, v: usize| Ok(v as i32);
        for form in GemmForm::ALL {
            let mut want = vec![0.0; m * n];
            // Row-major references: nn C = A B with A [m,k]; tn C = A^T B with A stored [k,m];
            // nt C = A B^T with B stored [n,k].
            for i in 0..m {
                for j in 0..n {
                    want[i * n + j] = (0..k)
                        .map(|p| match form {
                            GemmForm::Nn => a[i * k + p] * b[p * n + j],
                            GemmForm::Tn => a[p * m + i] * b[p * n + j],
                            GemmForm::Nt => a[i * k + p] * b[j * k + p],
                        })
                        .sum();
                }
            }
            let cfg = cublas_config(form, GemmDims { m, k, n }, 0.0f32, lim).unwrap();
            let mut got = vec![f32::NAN; m * n];
            // cuBLAS's first operand is our b, its second our a.
            colmajor_gemm(&cfg, &b, &a, &mut got);
            assert_eq!(got, want, "{form:?}");
        }
    }
}
