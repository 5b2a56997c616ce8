//! Row-major bf16 GEMMs through cuBLASLt with a fused GELU epilogue, so an expert MLP's
//! activation costs no kernel of its own: forward `act = gelu(x w1)` also stores the
//! pre-activation `h` (`GELU_AUX`), and backward `dh = gelu'(h) * (dact)` is the epilogue of
//! the `dy w2^T` product (`DGELU`). cuBLASLt's GELU is the tanh form, moelab's definition.
//! Descriptors and the chosen algorithm are cached per shape and epilogue; with `tune` the
//! first call of a shape times up to [`TUNE_CANDIDATES`] of cuBLASLt's heuristic candidates on
//! the call's own buffers and keeps the fastest.

use crate::error::GpuError;
use crate::gemm::{cublas_config, GemmDims, GemmForm};
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;

/// What the product's epilogue does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Epilogue {
    /// Plain `c = op(a) op(b)`.
    None,
    /// `c = gelu(op(a) op(b))`, and `aux = op(a) op(b)` (the pre-activation, same layout as c).
    GeluAux,
    /// `c = gelu'(aux) * (op(a) op(b))` with `aux` the forward's pre-activation.
    DGelu,
}

struct Cached {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
    ldc: i64,
    /// Candidates still to be timed (tuning, before the first call).
    untuned: Option<Vec<sys::cublasLtMatmulAlgo_t>>,
}

/// Heuristic candidates timed per shape when tuning.
pub const TUNE_CANDIDATES: usize = 8;

/// A cuBLASLt handle with its workspace and a cache of descriptors per shape; one per stream.
pub struct LtGemm {
    handle: sys::cublasLtHandle_t,
    workspace: u64,
    workspace_bytes: usize,
    tune: bool,
    cache: HashMap<(GemmForm, usize, usize, usize, Epilogue), Cached>,
}

// SAFETY: the handle and descriptors are plain host objects used by one thread at a time.
unsafe impl Send for LtGemm {}

impl LtGemm {
    /// A handle using `workspace` (device memory of `workspace_bytes`, owned by the caller and
    /// kept alive as long as this value).
    /// `tune`: time the heuristic's candidates at a shape's first call instead of taking its
    /// first choice.
    pub fn new(workspace: u64, workspace_bytes: usize, tune: bool) -> Result<LtGemm, GpuError> {
        let handle = lt::create_handle().map_err(GpuError::cublaslt("cublasLtCreate"))?;
        Ok(LtGemm { handle, workspace, workspace_bytes, tune, cache: HashMap::new() })
    }

    /// The heuristic's candidates for a prepared problem, best first.
    fn candidates(&self, desc: sys::cublasLtMatmulDesc_t, l: [sys::cublasLtMatrixLayout_t; 3], n: usize) -> Result<Vec<sys::cublasLtMatmulAlgo_t>, GpuError> {
        let e = GpuError::cublaslt;
        let pref = lt::create_matmul_pref().map_err(e("cublasLtMatmulPreferenceCreate"))?;
        let ws = self.workspace_bytes;
        let mut out: Vec<sys::cublasLtMatmulHeuristicResult_t> = Vec::with_capacity(n);
        let mut found = 0i32;
        // SAFETY: pref and the layouts are live; `out` has room for n results.
        let r = unsafe {
            lt::set_matmul_pref_attribute(pref, sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws as *const usize as _, size_of::<usize>())
                .and_then(|_| sys::cublasLtMatmulAlgoGetHeuristic(self.handle, desc, l[0], l[1], l[2], l[2], pref, n as i32, out.as_mut_ptr(), &mut found).result())
        };
        // SAFETY: created above, destroyed once.
        unsafe { lt::destroy_matmul_pref(pref) }.map_err(e("cublasLtMatmulPreferenceDestroy"))?;
        r.map_err(e("cublasLtMatmulAlgoGetHeuristic"))?;
        // SAFETY: cuBLASLt wrote `found` results.
        unsafe { out.set_len(found.max(0) as usize) };
        let algos: Vec<_> = out.into_iter().filter(|h| h.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS).map(|h| h.algo).collect();
        if algos.is_empty() {
            return Err(e("cublasLtMatmulAlgoGetHeuristic")(lt::CublasError(sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED)));
        }
        Ok(algos)
    }

    /// Median-free quick timing: the fastest of three runs of each candidate on the call's own
    /// buffers (outputs are overwritten by the real call right after).
    #[allow(clippy::too_many_arguments)]
    unsafe fn pick(&self, stream: cudarc::driver::sys::CUstream, c: &Cached, algos: &[sys::cublasLtMatmulAlgo_t], a: u64, b: u64, out: u64) -> Result<sys::cublasLtMatmulAlgo_t, GpuError> {
        use cudarc::driver::result::{event, stream as st};
        use cudarc::driver::sys::CUevent_flags;
        let d = GpuError::driver;
        let (e0, e1) = (event::create(CUevent_flags::CU_EVENT_DEFAULT).map_err(d("cuEventCreate"))?, event::create(CUevent_flags::CU_EVENT_DEFAULT).map_err(d("cuEventCreate"))?);
        let mut best = (f32::INFINITY, algos[0]);
        for algo in algos {
            let mut t = f32::INFINITY;
            for _ in 0..3 {
                event::record(e0, stream).map_err(d("cuEventRecord"))?;
                if self.launch(stream, c, algo, a, b, out).is_err() {
                    t = f32::INFINITY;
                    break;
                }
                event::record(e1, stream).map_err(d("cuEventRecord"))?;
                st::synchronize(stream).map_err(d("cuStreamSynchronize"))?;
                t = t.min(event::elapsed(e0, e1).map_err(d("cuEventElapsedTime"))?);
            }
            if t < best.0 {
                best = (t, *algo);
            }
        }
        let _ = event::destroy(e0);
        let _ = event::destroy(e1);
        Ok(best.1)
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn launch(&self, stream: cudarc::driver::sys::CUstream, c: &Cached, algo: &sys::cublasLtMatmulAlgo_t, a: u64, b: u64, out: u64) -> Result<(), GpuError> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let [la, lb, lc] = c.layouts;
        lt::matmul(
            self.handle,
            c.desc,
            &alpha as *const f32 as _,
            &beta as *const f32 as _,
            b as *const c_void,
            la,
            a as *const c_void,
            lb,
            out as *const c_void,
            lc,
            out as *mut c_void,
            lc,
            algo,
            self.workspace as *mut c_void,
            self.workspace_bytes,
            stream as _,
        )
        .map_err(GpuError::cublaslt("cublasLtMatmul"))
    }

    fn prepare(&mut self, form: GemmForm, dims: GemmDims, epi: Epilogue) -> Result<&Cached, GpuError> {
        let key = (form, dims.m, dims.k, dims.n, epi);
        if !self.cache.contains_key(&key) {
            const OP: &str = "lt_gemm";
            let lim = |what: &'static str, v: usize| i32::try_from(v).map_err(|_| GpuError::TooLarge { op: OP, what, value: v, limit: i32::MAX as usize });
            let cfg = cublas_config(form, dims, 0.0f32, lim)?;
            let e = GpuError::cublaslt;
            let bf = sys::cudaDataType_t::CUDA_R_16BF;
            let (m, n, k) = (cfg.m as u64, cfg.n as u64, cfg.k as u64);
            let ta = cfg.transa == cublasOperation_t::CUBLAS_OP_T;
            let tb = cfg.transb == cublasOperation_t::CUBLAS_OP_T;
            // cuBLAS's operands: its A is our b (op(A) is m x k), its B our a (op(B) is k x n).
            let a_shape = if ta { (k, m) } else { (m, k) };
            let b_shape = if tb { (n, k) } else { (k, n) };
            let la = lt::create_matrix_layout(bf, a_shape.0, a_shape.1, cfg.lda as i64).map_err(e("cublasLtMatrixLayoutCreate"))?;
            let lb = lt::create_matrix_layout(bf, b_shape.0, b_shape.1, cfg.ldb as i64).map_err(e("cublasLtMatrixLayoutCreate"))?;
            let lc = lt::create_matrix_layout(bf, m, n, cfg.ldc as i64).map_err(e("cublasLtMatrixLayoutCreate"))?;
            let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType_t::CUDA_R_32F).map_err(e("cublasLtMatmulDescCreate"))?;
            let set = |attr, v: *const c_void, size| unsafe { lt::set_matmul_desc_attribute(desc, attr, v, size) }.map_err(e("cublasLtMatmulDescSetAttribute"));
            let (opa, opb) = (cfg.transa as i32, cfg.transb as i32);
            set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &opa as *const i32 as _, size_of::<i32>())?;
            set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &opb as *const i32 as _, size_of::<i32>())?;
            let epilogue = match epi {
                Epilogue::None => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
                Epilogue::GeluAux => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_AUX,
                Epilogue::DGelu => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DGELU,
            };
            set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue as *const _ as _, size_of::<sys::cublasLtEpilogue_t>())?;
            let ldc = cfg.ldc as i64;
            if epi != Epilogue::None {
                set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ldc as *const i64 as _, size_of::<i64>())?;
                // The heuristic wants an aux pointer set; the real one is set per call.
                let placeholder = self.workspace;
                set(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &placeholder as *const u64 as _, size_of::<u64>())?;
            }
            let algos = self.candidates(desc, [la, lb, lc], if self.tune { TUNE_CANDIDATES } else { 1 })?;
            self.cache.insert(key, Cached { desc, layouts: [la, lb, lc], algo: algos[0], ldc, untuned: (algos.len() > 1).then_some(algos) });
        }
        Ok(&self.cache[&key])
    }

    /// `c = epilogue(op(a) op(b))` on row-major bf16 buffers in `form` (f32 accumulation),
    /// enqueued on `stream`; `aux` is the pre-activation buffer (written by
    /// [`Epilogue::GeluAux`], read by [`Epilogue::DGelu`]; laid out like `c`).
    ///
    /// # Safety
    /// `a`, `b`, `c` (and `aux` for a GELU epilogue) must hold the elements the form and dims
    /// address, on memory ordered by `stream`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(&mut self, stream: cudarc::driver::sys::CUstream, form: GemmForm, a: u64, b: u64, c: u64, dims: GemmDims, epi: Epilogue, aux: u64) -> Result<(), GpuError> {
        if dims.m == 0 || dims.n == 0 {
            return Ok(());
        }
        let key = (form, dims.m, dims.k, dims.n, epi);
        self.prepare(form, dims, epi)?;
        let cached = &self.cache[&key];
        if epi != Epilogue::None {
            lt::set_matmul_desc_attribute(cached.desc, sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux as *const u64 as _, size_of::<u64>())
                .map_err(GpuError::cublaslt("cublasLtMatmulDescSetAttribute"))?;
        }
        if let Some(algos) = &cached.untuned {
            let best = self.pick(stream, cached, algos, a, b, c)?;
            let entry = self.cache.get_mut(&key).expect("prepared");
            entry.algo = best;
            entry.untuned = None;
        }
        let cached = &self.cache[&key];
        debug_assert!(cached.ldc > 0);
        self.launch(stream, cached, &cached.algo, a, b, c)
    }
}

impl Drop for LtGemm {
    fn drop(&mut self) {
        // SAFETY: every descriptor and the handle were created here and are destroyed once.
        unsafe {
            for (_, c) in self.cache.drain() {
                let _ = lt::destroy_matmul_desc(c.desc);
                for l in c.layouts {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
            let _ = lt::destroy_handle(self.handle);
        }
    }
}
