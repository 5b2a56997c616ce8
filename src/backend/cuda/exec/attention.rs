//! The causal attention core on cuBLAS: scores and context as strided-batched SGEMMs over
//! the heads of one sequence (q, k, v are column blocks of `qkv[T, 3M]`, so a head is a
//! constant column offset), the causal softmax and its backward as row kernels. Same
//! semantics as `math::attention` (the cpu definition); the full score matrix is computed
//! and masked, so the GEMMs do twice the causal FLOPs in exchange for cuBLAS's rate.
//!
//! cuBLAS is column-major: a row-major `[rows, cols]` matrix with row stride `ld` is its
//! transpose in column-major with leading dimension `ld`, so every product below is written
//! for the transposes (`C^T = B^T A^T`).
//!
//! bf16 plans: q, k, v, the probabilities and the context are bf16; the GEMMs take bf16
//! operands with f32 accumulation (`cublasGemmStridedBatchedEx`); the scores and `dP` are f32
//! in a scratch slice of [`HEADS_PER_SLICE`] heads, which the softmax kernels read, writing bf16
//! probabilities (forward) and a bf16 `dS` scratch (backward) for the next GEMMs.

use super::{Arg, ExecError, StreamExec};
use crate::backend::cuda::store::Storage;
use crate::plan::ops::AttnDims;
use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N as N, CUBLAS_OP_T as T};
use cudarc::cublas::sys::cublasOperation_t;
use moelab_kernels::error::GpuError;

/// Heads per scratch slice: bounds the `dP` (and, in bf16 plans, score) scratch to
/// `HEADS_PER_SLICE * seq^2` floats (64 MiB at seq 2048), small beside the plan's own buffers.
/// Shared with the sim, which prices the loop at this batch.
const HEADS_PER_SLICE: usize = crate::plan::ops::ATTN_HEADS_PER_SLICE;

/// One column-major strided-batched SGEMM: `C_i = alpha op(A_i) op(B_i) + beta C_i`.
struct Sgemm {
    ta: cublasOperation_t,
    tb: cublasOperation_t,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: (u64, usize, usize),
    b: (u64, usize, usize),
    c: (u64, usize, usize),
    count: usize,
}

/// [`Sgemm`]'s bf16 form: A and B bf16, C stored as `c_st`, f32 accumulation.
struct Bgemm {
    g: Sgemm,
    c_st: Storage,
}

impl StreamExec<'_> {
    fn sgemm_cm(&self, g: Sgemm) -> Result<(), ExecError> {
        let i = |v: usize| v as i32;
        let beta = 0.0f32;
        self.gemm_calls.set(self.gemm_calls.get() + 1);
        // SAFETY: the handle is bound to this stream; the call sites pass pointers into live
        // buffers sized for (leading dimension, batch stride, count) as computed from `dims`.
        unsafe {
            cudarc::cublas::result::sgemm_strided_batched(
                self.s.blas, g.ta, g.tb, i(g.m), i(g.n), i(g.k), &g.alpha,
                g.a.0 as *const f32, i(g.a.1), g.a.2 as i64,
                g.b.0 as *const f32, i(g.b.1), g.b.2 as i64,
                &beta, g.c.0 as *mut f32, i(g.c.1), g.c.2 as i64, i(g.count),
            )
        }
        .map_err(GpuError::cublas("sgemm_strided_batched"))?;
        Ok(())
    }

    fn bgemm_cm(&self, bg: Bgemm) -> Result<(), ExecError> {
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cudaDataType};
        let g = bg.g;
        let i = |v: usize| v as i32;
        let beta = 0.0f32;
        self.gemm_calls.set(self.gemm_calls.get() + 1);
        let bf = cudaDataType::CUDA_R_16BF;
        let ct = match bg.c_st {
            Storage::F32 => cudaDataType::CUDA_R_32F,
            Storage::Bf16 => bf,
        };
        // SAFETY: as sgemm_cm, with bf16 A and B and C of `c_st`; alpha and beta are f32 as
        // CUBLAS_COMPUTE_32F requires.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                self.s.blas, g.ta, g.tb, i(g.m), i(g.n), i(g.k), &g.alpha as *const f32 as *const _,
                g.a.0 as *const _, bf, i(g.a.1), g.a.2 as i64,
                g.b.0 as *const _, bf, i(g.b.1), g.b.2 as i64,
                &beta as *const f32 as *const _, g.c.0 as *mut _, ct, i(g.c.1), g.c.2 as i64, i(g.count),
                cublasComputeType_t::CUBLAS_COMPUTE_32F, cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(GpuError::cublas("cublasGemmStridedBatchedEx"))?;
        Ok(())
    }

    /// `probs = softmax(causal(q k^T / sqrt(dh)))`, `ctx = probs v`.
    pub(super) fn attention_fwd(&self, qkv: u64, probs: u64, ctx: u64, d: &AttnDims) -> Result<(), ExecError> {
        if self.bf16 {
            return self.attention_fwd_bf16(qkv, probs, ctx, d);
        }
        let (l, h, m) = (d.seq, d.heads, d.d_model);
        let dh = m / h;
        let scale = 1.0 / (dh as f32).sqrt();
        let f = 4u64;
        for b in 0..d.batch {
            let q = qkv + f * (b * l * 3 * m) as u64;
            let (k, v) = (q + f * m as u64, q + f * (2 * m) as u64);
            let p = probs + f * (b * h * l * l) as u64;
            // S^T[j, i] = k_j . q_i: A = k^T (dh x l, ld 3m), B = q^T.
            self.sgemm_cm(Sgemm { ta: T, tb: N, m: l, n: l, k: dh, alpha: scale, a: (k, 3 * m, dh), b: (q, 3 * m, dh), c: (p, l, l * l), count: h })?;
            self.launch("attn_softmax_causal", self.warp_grid(h * l), &[Arg::P(p), Arg::I64((h * l) as i64), Arg::I32(l as i32)])?;
            // ctx^T (dh x l, ld m) = v^T P^T.
            let c = ctx + f * (b * l * m) as u64;
            self.sgemm_cm(Sgemm { ta: N, tb: N, m: dh, n: l, k: l, alpha: 1.0, a: (v, 3 * m, dh), b: (p, l, l * l), c: (c, m, dh), count: h })?;
        }
        Ok(())
    }

    /// [`StreamExec::attention_fwd`] on bf16 buffers: per slice of heads, f32 scores into a
    /// scratch, the causal softmax into bf16 `probs`, then `ctx`.
    fn attention_fwd_bf16(&self, qkv: u64, probs: u64, ctx: u64, d: &AttnDims) -> Result<(), ExecError> {
        let (l, h, m) = (d.seq, d.heads, d.d_model);
        let dh = m / h;
        let scale = 1.0 / (dh as f32).sqrt();
        let f = 2u64;
        let slice = HEADS_PER_SLICE.min(h).max(1);
        let scores = self.scratch(slice * l * l * 4)?;
        for b in 0..d.batch {
            for h0 in (0..h).step_by(slice) {
                let nh = slice.min(h - h0);
                let col = f * (h0 * dh) as u64;
                let q = qkv + f * (b * l * 3 * m) as u64 + col;
                let (k, v) = (q + f * m as u64, q + f * (2 * m) as u64);
                let p = probs + f * ((b * h + h0) * l * l) as u64;
                // S^T[j, i] = k_j . q_i (f32).
                let g = Sgemm { ta: T, tb: N, m: l, n: l, k: dh, alpha: scale, a: (k, 3 * m, dh), b: (q, 3 * m, dh), c: (scores, l, l * l), count: nh };
                self.bgemm_cm(Bgemm { g, c_st: Storage::F32 })?;
                self.launch("attn_softmax_causal_bf16", self.warp_grid(nh * l), &[Arg::P(scores), Arg::P(p), Arg::I64((nh * l) as i64), Arg::I32(l as i32)])?;
                // ctx^T (dh x l, ld m) = v^T P^T.
                let c = ctx + f * (b * l * m) as u64 + col;
                let g = Sgemm { ta: N, tb: N, m: dh, n: l, k: l, alpha: 1.0, a: (v, 3 * m, dh), b: (p, l, l * l), c: (c, m, dh), count: nh };
                self.bgemm_cm(Bgemm { g, c_st: Storage::Bf16 })?;
            }
        }
        self.scratch_free(scores)?;
        Ok(())
    }

    /// [`StreamExec::attention_bwd`] on bf16 buffers: `dP` in an f32 scratch, `dS` in a bf16 one.
    fn attention_bwd_bf16(&self, qkv: u64, probs: u64, dctx: u64, dqkv: u64, d: &AttnDims) -> Result<(), ExecError> {
        let (l, h, m) = (d.seq, d.heads, d.d_model);
        let dh = m / h;
        let scale = 1.0 / (dh as f32).sqrt();
        let f = 2u64;
        let slice = HEADS_PER_SLICE.min(h).max(1);
        let dp = self.scratch(slice * l * l * 4)?;
        let ds = self.scratch(slice * l * l * 2)?;
        for b in 0..d.batch {
            for h0 in (0..h).step_by(slice) {
                let nh = slice.min(h - h0);
                let col = f * (h0 * dh) as u64;
                let q = qkv + f * (b * l * 3 * m) as u64 + col;
                let (k, v) = (q + f * m as u64, q + f * (2 * m) as u64);
                let dq = dqkv + f * (b * l * 3 * m) as u64 + col;
                let (dk, dv) = (dq + f * m as u64, dq + f * (2 * m) as u64);
                let p = probs + f * ((b * h + h0) * l * l) as u64;
                let dc = dctx + f * (b * l * m) as u64 + col;
                // dv^T (dh x l) = dctx^T P.
                let g = Sgemm { ta: N, tb: T, m: dh, n: l, k: l, alpha: 1.0, a: (dc, m, dh), b: (p, l, l * l), c: (dv, 3 * m, dh), count: nh };
                self.bgemm_cm(Bgemm { g, c_st: Storage::Bf16 })?;
                // dP^T[j, i] = v_j . dctx_i (f32).
                let g = Sgemm { ta: T, tb: N, m: l, n: l, k: dh, alpha: 1.0, a: (v, 3 * m, dh), b: (dc, m, dh), c: (dp, l, l * l), count: nh };
                self.bgemm_cm(Bgemm { g, c_st: Storage::F32 })?;
                self.launch("attn_softmax_causal_bwd_bf16", self.warp_grid(nh * l), &[Arg::P(p), Arg::P(dp), Arg::P(ds), Arg::I64((nh * l) as i64), Arg::I32(l as i32), Arg::F32(scale)])?;
                // dq^T (dh x l) = k^T dS^T; dk^T = q^T dS.
                let g = Sgemm { ta: N, tb: N, m: dh, n: l, k: l, alpha: 1.0, a: (k, 3 * m, dh), b: (ds, l, l * l), c: (dq, 3 * m, dh), count: nh };
                self.bgemm_cm(Bgemm { g, c_st: Storage::Bf16 })?;
                let g = Sgemm { ta: N, tb: T, m: dh, n: l, k: l, alpha: 1.0, a: (q, 3 * m, dh), b: (ds, l, l * l), c: (dk, 3 * m, dh), count: nh };
                self.bgemm_cm(Bgemm { g, c_st: Storage::Bf16 })?;
            }
        }
        self.scratch_free(dp)?;
        self.scratch_free(ds)?;
        Ok(())
    }

    /// `dqkv` (overwritten) from `dctx`: dv = P^T dctx, dP = dctx v^T, dS = P (dP - rowsum(dP P))
    /// / sqrt(dh), dq = dS k, dk = dS^T q.
    pub(super) fn attention_bwd(&self, qkv: u64, probs: u64, dctx: u64, dqkv: u64, d: &AttnDims) -> Result<(), ExecError> {
        if self.bf16 {
            return self.attention_bwd_bf16(qkv, probs, dctx, dqkv, d);
        }
        let (l, h, m) = (d.seq, d.heads, d.d_model);
        let dh = m / h;
        let scale = 1.0 / (dh as f32).sqrt();
        let f = 4u64;
        let slice = HEADS_PER_SLICE.min(h);
        let scratch = self.scratch(slice * l * l * 4)?;
        for b in 0..d.batch {
            for h0 in (0..h).step_by(slice) {
                let nh = slice.min(h - h0);
                let col = f * (h0 * dh) as u64;
                let q = qkv + f * (b * l * 3 * m) as u64 + col;
                let (k, v) = (q + f * m as u64, q + f * (2 * m) as u64);
                let dq = dqkv + f * (b * l * 3 * m) as u64 + col;
                let (dk, dv) = (dq + f * m as u64, dq + f * (2 * m) as u64);
                let p = probs + f * ((b * h + h0) * l * l) as u64;
                let dc = dctx + f * (b * l * m) as u64 + col;
                // dv^T (dh x l) = dctx^T P.
                self.sgemm_cm(Sgemm { ta: N, tb: T, m: dh, n: l, k: l, alpha: 1.0, a: (dc, m, dh), b: (p, l, l * l), c: (dv, 3 * m, dh), count: nh })?;
                // dP^T[j, i] = v_j . dctx_i.
                self.sgemm_cm(Sgemm { ta: T, tb: N, m: l, n: l, k: dh, alpha: 1.0, a: (v, 3 * m, dh), b: (dc, m, dh), c: (scratch, l, l * l), count: nh })?;
                self.launch("attn_softmax_causal_bwd", self.warp_grid(nh * l), &[Arg::P(p), Arg::P(scratch), Arg::I64((nh * l) as i64), Arg::I32(l as i32), Arg::F32(scale)])?;
                // dq^T (dh x l) = k^T dS^T; dk^T = q^T dS.
                self.sgemm_cm(Sgemm { ta: N, tb: N, m: dh, n: l, k: l, alpha: 1.0, a: (k, 3 * m, dh), b: (scratch, l, l * l), c: (dq, 3 * m, dh), count: nh })?;
                self.sgemm_cm(Sgemm { ta: N, tb: T, m: dh, n: l, k: l, alpha: 1.0, a: (q, 3 * m, dh), b: (scratch, l, l * l), c: (dk, 3 * m, dh), count: nh })?;
            }
        }
        self.scratch_free(scratch)?;
        Ok(())
    }
}
