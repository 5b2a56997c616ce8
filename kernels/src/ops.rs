//! Launchers for the NVRTC kernels: shape checks on the host, then one launch on the device's
//! stream. Semantics follow `moelab::math` (the cpu backend's oracle); shapes are row-major
//! and given in the doc comments as `[rows, cols]`. Launches are asynchronous: errors inside
//! a kernel surface at the next synchronising call ([`Device::synchronize`], a download).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::device::Device;
use crate::dtype::Dtype;
use crate::error::GpuError;
use crate::nvrtc::KernelId;

/// LayerNorm's epsilon, as in `moelab::math::norm`.
pub const LAYERNORM_EPS: f32 = 1e-5;

/// Threads per block for the elementwise and row kernels.
const BLOCK: u32 = 256;
/// Rows of the LayerNorm parameter-gradient block; must match LN_PARAM_ROWS in layernorm.cu.
const LN_PARAM_ROWS: u32 = 8;

fn check_len<T>(op: &'static str, what: &'static str, s: &CudaSlice<T>, expected: usize) -> Result<(), GpuError> {
    if s.len() == expected {
        Ok(())
    } else {
        Err(GpuError::Shape { op, what, expected, got: s.len() })
    }
}

fn to_i32(op: &'static str, what: &'static str, v: usize) -> Result<i32, GpuError> {
    i32::try_from(v).map_err(|_| GpuError::TooLarge { op, what, value: v, limit: i32::MAX as usize })
}

fn product(op: &'static str, what: &'static str, a: usize, b: usize) -> Result<usize, GpuError> {
    a.checked_mul(b).ok_or(GpuError::TooLarge { op, what, value: usize::MAX, limit: usize::MAX })
}

fn launch_err(id: KernelId) -> impl FnOnce(cudarc::driver::DriverError) -> GpuError {
    move |source| GpuError::Launch { kernel: id.name(), source }
}

impl Device {
    /// Blocks for a grid-stride loop over `n` items: enough to fill every SM, no more.
    fn grid_stride_blocks(&self, n: usize, per_block: usize) -> u32 {
        let want = n.div_ceil(per_block.max(1)).max(1);
        let cap = (self.info().sm_count.max(1) as usize) * 32;
        want.min(cap) as u32
    }

    /// Threads for one block that walks a row of `cols` items: a multiple of 32, at most 256.
    fn row_block(cols: usize) -> u32 {
        (cols.div_ceil(32) * 32).clamp(32, BLOCK as usize) as u32
    }

    /// Row-wise softmax: `y[rows, cols] = softmax(x[rows, cols])` along each row (gating).
    pub fn softmax_rows<T: Dtype>(&self, x: &CudaSlice<T>, y: &mut CudaSlice<T>, rows: usize, cols: usize) -> Result<(), GpuError> {
        const OP: &str = "softmax_rows";
        let n = product(OP, "rows * cols", rows, cols)?;
        check_len(OP, "x", x, n)?;
        check_len(OP, "y", y, n)?;
        self.check_owned(OP, "x", x)?;
        self.check_owned(OP, "y", y)?;
        let (rows_i, cols_i) = (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
        if n == 0 {
            return Ok(());
        }
        let id = KernelId::pick(T::KIND, KernelId::SoftmaxRowsF32, KernelId::SoftmaxRowsBf16);
        let f = self.function(id)?;
        let warps = BLOCK / 32;
        let cfg = LaunchConfig { grid_dim: ((rows as u32).div_ceil(warps), 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut b = self.stream().launch_builder(&f);
        b.arg(x).arg(y).arg(&rows_i).arg(&cols_i);
        // SAFETY: the arguments match softmax_rows_{f32,bf16}(const T*, T*, int, int); x and y
        // hold rows * cols elements of T (checked above) and the kernel reads and writes only
        // rows < `rows`, columns < `cols`; both buffers live on this device's stream.
        unsafe { b.launch(cfg) }.map_err(launch_err(id))?;
        Ok(())
    }

    /// GELU (tanh approximation): `out = gelu(h)` elementwise; `h` and `out` have equal length.
    pub fn gelu_forward<T: Dtype>(&self, h: &CudaSlice<T>, out: &mut CudaSlice<T>) -> Result<(), GpuError> {
        const OP: &str = "gelu_forward";
        let n = h.len();
        check_len(OP, "out", out, n)?;
        self.check_owned(OP, "h", h)?;
        self.check_owned(OP, "out", out)?;
        if n == 0 {
            return Ok(());
        }
        let n_i = n as i64;
        let id = KernelId::pick(T::KIND, KernelId::GeluFwdF32, KernelId::GeluFwdBf16);
        let f = self.function(id)?;
        let cfg = LaunchConfig { grid_dim: (self.grid_stride_blocks(n, BLOCK as usize), 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut b = self.stream().launch_builder(&f);
        b.arg(h).arg(out).arg(&n_i);
        // SAFETY: the arguments match gelu_fwd_{f32,bf16}(const T*, T*, long long); both buffers
        // hold n elements (checked) and the grid-stride loop stops at n; one stream.
        unsafe { b.launch(cfg) }.map_err(launch_err(id))?;
        Ok(())
    }

    /// GELU backward: `dh = da * gelu'(h)` elementwise; all three have equal length.
    pub fn gelu_backward<T: Dtype>(&self, h: &CudaSlice<T>, da: &CudaSlice<T>, dh: &mut CudaSlice<T>) -> Result<(), GpuError> {
        const OP: &str = "gelu_backward";
        let n = h.len();
        check_len(OP, "da", da, n)?;
        check_len(OP, "dh", dh, n)?;
        self.check_owned(OP, "h", h)?;
        self.check_owned(OP, "da", da)?;
        self.check_owned(OP, "dh", dh)?;
        if n == 0 {
            return Ok(());
        }
        let n_i = n as i64;
        let id = KernelId::pick(T::KIND, KernelId::GeluBwdF32, KernelId::GeluBwdBf16);
        let f = self.function(id)?;
        let cfg = LaunchConfig { grid_dim: (self.grid_stride_blocks(n, BLOCK as usize), 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut b = self.stream().launch_builder(&f);
        b.arg(h).arg(da).arg(dh).arg(&n_i);
        // SAFETY: the arguments match gelu_bwd_{f32,bf16}(const T*, const T*, T*, long long);
        // all three buffers hold n elements (checked); the loop stops at n; one stream.
        unsafe { b.launch(cfg) }.map_err(launch_err(id))?;
        Ok(())
    }

    /// LayerNorm forward over `x[rows, cols]` with `gamma[cols]`, `beta[cols]`: writes
    /// `y[rows, cols]` and `stats[rows, 2]` = (mean, rstd) in f32, eps [`LAYERNORM_EPS`].
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_forward<T: Dtype>(
        &self,
        x: &CudaSlice<T>,
        gamma: &CudaSlice<T>,
        beta: &CudaSlice<T>,
        y: &mut CudaSlice<T>,
        stats: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
    ) -> Result<(), GpuError> {
        const OP: &str = "layernorm_forward";
        let n = product(OP, "rows * cols", rows, cols)?;
        check_len(OP, "x", x, n)?;
        check_len(OP, "y", y, n)?;
        check_len(OP, "gamma", gamma, cols)?;
        check_len(OP, "beta", beta, cols)?;
        check_len(OP, "stats", stats, 2 * rows)?;
        for (what, owned) in [("x", x.stream()), ("gamma", gamma.stream()), ("beta", beta.stream()), ("y", y.stream()), ("stats", stats.stream())] {
            if !std::sync::Arc::ptr_eq(owned, self.stream()) {
                return Err(GpuError::ForeignBuffer { op: OP, what });
            }
        }
        let (rows_i, cols_i) = (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
        if n == 0 {
            return Ok(());
        }
        let id = KernelId::pick(T::KIND, KernelId::LayernormFwdF32, KernelId::LayernormFwdBf16);
        let f = self.function(id)?;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (Self::row_block(cols), 1, 1), shared_mem_bytes: 0 };
        let eps = LAYERNORM_EPS;
        let mut b = self.stream().launch_builder(&f);
        b.arg(x).arg(gamma).arg(beta).arg(y).arg(stats).arg(&rows_i).arg(&cols_i).arg(&eps);
        // SAFETY: the arguments match layernorm_fwd_{f32,bf16}(const T*, const T*, const T*, T*,
        // float*, int, int, float); lengths are checked above (x, y: rows*cols; gamma, beta:
        // cols; stats: 2*rows); one block per row with a multiple-of-32 block size, as
        // block_sum requires; one stream.
        unsafe { b.launch(cfg) }.map_err(launch_err(id))?;
        Ok(())
    }

    /// LayerNorm backward: from `x[rows, cols]`, `gamma[cols]`, the forward's `stats[rows, 2]`
    /// and `dy[rows, cols]`, writes `dx[rows, cols]` and overwrites the f32 parameter
    /// gradients `dgamma[cols]`, `dbeta[cols]` (summed over rows).
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward<T: Dtype>(
        &self,
        x: &CudaSlice<T>,
        gamma: &CudaSlice<T>,
        stats: &CudaSlice<f32>,
        dy: &CudaSlice<T>,
        dx: &mut CudaSlice<T>,
        dgamma: &mut CudaSlice<f32>,
        dbeta: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
    ) -> Result<(), GpuError> {
        const OP: &str = "layernorm_backward";
        let n = product(OP, "rows * cols", rows, cols)?;
        check_len(OP, "x", x, n)?;
        check_len(OP, "dy", dy, n)?;
        check_len(OP, "dx", dx, n)?;
        check_len(OP, "gamma", gamma, cols)?;
        check_len(OP, "stats", stats, 2 * rows)?;
        check_len(OP, "dgamma", dgamma, cols)?;
        check_len(OP, "dbeta", dbeta, cols)?;
        for (what, owned) in [
            ("x", x.stream()),
            ("gamma", gamma.stream()),
            ("stats", stats.stream()),
            ("dy", dy.stream()),
            ("dx", dx.stream()),
            ("dgamma", dgamma.stream()),
            ("dbeta", dbeta.stream()),
        ] {
            if !std::sync::Arc::ptr_eq(owned, self.stream()) {
                return Err(GpuError::ForeignBuffer { op: OP, what });
            }
        }
        let (rows_i, cols_i) = (to_i32(OP, "rows", rows)?, to_i32(OP, "cols", cols)?);
        if cols == 0 {
            return Ok(());
        }
        if rows > 0 {
            let id = KernelId::pick(T::KIND, KernelId::LayernormBwdDxF32, KernelId::LayernormBwdDxBf16);
            let f = self.function(id)?;
            let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (Self::row_block(cols), 1, 1), shared_mem_bytes: 0 };
            let mut b = self.stream().launch_builder(&f);
            b.arg(x).arg(gamma).arg(stats).arg(dy).arg(&mut *dx).arg(&rows_i).arg(&cols_i);
            // SAFETY: the arguments match layernorm_bwd_dx_{f32,bf16}(const T*, const T*,
            // const float*, const T*, T*, int, int); lengths checked above; one block per row
            // with a multiple-of-32 block size (block_sum); one stream.
            unsafe { b.launch(cfg) }.map_err(launch_err(id))?;
        }
        let id = KernelId::pick(T::KIND, KernelId::LayernormBwdParamsF32, KernelId::LayernormBwdParamsBf16);
        let f = self.function(id)?;
        let cfg = LaunchConfig {
            grid_dim: ((cols as u32).div_ceil(32), 1, 1),
            block_dim: (32, LN_PARAM_ROWS, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream().launch_builder(&f);
        b.arg(x).arg(stats).arg(dy).arg(dgamma).arg(dbeta).arg(&rows_i).arg(&cols_i);
        // SAFETY: the arguments match layernorm_bwd_params_{f32,bf16}(const T*, const float*,
        // const T*, float*, float*, int, int); lengths checked above; the block is
        // (32, LN_PARAM_ROWS) as the kernel's shared arrays assume; columns past `cols` are
        // masked; one stream. With rows == 0 it writes zeros, as the reference does.
        unsafe { b.launch(cfg) }.map_err(launch_err(id))?;
        Ok(())
    }

    /// Row gather (expert dispatch): `out[i, :] = x[idx[i], :]` for `x[n_in, cols]`,
    /// `idx[n_out]`, `out[n_out, cols]`. An index outside `[0, n_in)` (by convention -1, an
    /// empty slot) gives a zero row.
    pub fn permute_rows<T: Dtype>(
        &self,
        x: &CudaSlice<T>,
        idx: &CudaSlice<i32>,
        out: &mut CudaSlice<T>,
        n_in: usize,
        n_out: usize,
        cols: usize,
    ) -> Result<(), GpuError> {
        const OP: &str = "permute_rows";
        check_len(OP, "x", x, product(OP, "n_in * cols", n_in, cols)?)?;
        check_len(OP, "idx", idx, n_out)?;
        check_len(OP, "out", out, product(OP, "n_out * cols", n_out, cols)?)?;
        self.check_owned(OP, "x", x)?;
        self.check_owned(OP, "idx", idx)?;
        self.check_owned(OP, "out", out)?;
        let (n_in_i, n_out_i, cols_i) = (to_i32(OP, "n_in", n_in)?, to_i32(OP, "n_out", n_out)?, to_i32(OP, "cols", cols)?);
        if n_out == 0 || cols == 0 {
            return Ok(());
        }
        let id = KernelId::pick(T::KIND, KernelId::PermuteRowsF32, KernelId::PermuteRowsBf16);
        let f = self.function(id)?;
        let cfg = LaunchConfig { grid_dim: (self.grid_stride_blocks(n_out, 1), 1, 1), block_dim: (Self::row_block(cols), 1, 1), shared_mem_bytes: 0 };
        let mut b = self.stream().launch_builder(&f);
        b.arg(x).arg(idx).arg(out).arg(&n_out_i).arg(&n_in_i).arg(&cols_i);
        // SAFETY: the arguments match permute_rows_{f32,bf16}(const T*, const int*, T*, int n_out,
        // int n_in, int cols); lengths checked above; the kernel bounds-checks every index
        // against n_in before reading x; one stream.
        unsafe { b.launch(cfg) }.map_err(launch_err(id))?;
        Ok(())
    }

    /// Weighted scatter-add (expert combine): `out[idx[i], :] += w[i] * y[i, :]` for
    /// `y[n_in, cols]`, `w[n_in]`, `idx[n_in]` and the f32 accumulator `out[n_out, cols]`. An
    /// index outside `[0, n_out)` is skipped. Rows sharing a destination add via f32 atomics.
    #[allow(clippy::too_many_arguments)]
    pub fn combine_rows<T: Dtype>(
        &self,
        y: &CudaSlice<T>,
        w: &CudaSlice<f32>,
        idx: &CudaSlice<i32>,
        out: &mut CudaSlice<f32>,
        n_in: usize,
        n_out: usize,
        cols: usize,
    ) -> Result<(), GpuError> {
        const OP: &str = "combine_rows";
        check_len(OP, "y", y, product(OP, "n_in * cols", n_in, cols)?)?;
        check_len(OP, "w", w, n_in)?;
        check_len(OP, "idx", idx, n_in)?;
        check_len(OP, "out", out, product(OP, "n_out * cols", n_out, cols)?)?;
        self.check_owned(OP, "y", y)?;
        self.check_owned(OP, "w", w)?;
        self.check_owned(OP, "idx", idx)?;
        self.check_owned(OP, "out", out)?;
        let (n_in_i, n_out_i, cols_i) = (to_i32(OP, "n_in", n_in)?, to_i32(OP, "n_out", n_out)?, to_i32(OP, "cols", cols)?);
        if n_in == 0 || cols == 0 {
            return Ok(());
        }
        let id = KernelId::pick(T::KIND, KernelId::CombineRowsF32, KernelId::CombineRowsBf16);
        let f = self.function(id)?;
        let cfg = LaunchConfig { grid_dim: (self.grid_stride_blocks(n_in, 1), 1, 1), block_dim: (Self::row_block(cols), 1, 1), shared_mem_bytes: 0 };
        let mut b = self.stream().launch_builder(&f);
        b.arg(y).arg(w).arg(idx).arg(out).arg(&n_in_i).arg(&n_out_i).arg(&cols_i);
        // SAFETY: the arguments match combine_rows_{f32,bf16}(const T*, const float*, const int*,
        // float*, int n_in, int n_out, int cols); lengths checked above; the kernel
        // bounds-checks every index against n_out before writing; one stream.
        unsafe { b.launch(cfg) }.map_err(launch_err(id))?;
        Ok(())
    }

    /// Sets every element to `value` (rounded to `T`); NaN poisons a buffer before a check.
    pub fn fill<T: Dtype>(&self, buf: &mut CudaSlice<T>, value: f32) -> Result<(), GpuError> {
        const OP: &str = "fill";
        self.check_owned(OP, "buf", buf)?;
        let n = buf.len();
        if n == 0 {
            return Ok(());
        }
        let n_i = n as i64;
        let id = KernelId::pick(T::KIND, KernelId::FillF32, KernelId::FillBf16);
        let f = self.function(id)?;
        let cfg = LaunchConfig { grid_dim: (self.grid_stride_blocks(n, BLOCK as usize), 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut b = self.stream().launch_builder(&f);
        b.arg(buf).arg(&n_i).arg(&value);
        // SAFETY: the arguments match fill_{f32,bf16}(T*, long long, float); the loop stops at
        // the buffer's length; one stream.
        unsafe { b.launch(cfg) }.map_err(launch_err(id))?;
        Ok(())
    }

    /// Fills with N(0, std²) samples drawn on the device; element i depends only on
    /// (seed, i), so the same seed gives the same buffer.
    pub fn fill_normal<T: Dtype>(&self, buf: &mut CudaSlice<T>, seed: u64, std: f32) -> Result<(), GpuError> {
        const OP: &str = "fill_normal";
        self.check_owned(OP, "buf", buf)?;
        let n = buf.len();
        if n == 0 {
            return Ok(());
        }
        let n_i = n as i64;
        let id = KernelId::pick(T::KIND, KernelId::FillNormalF32, KernelId::FillNormalBf16);
        let f = self.function(id)?;
        let cfg = LaunchConfig { grid_dim: (self.grid_stride_blocks(n, BLOCK as usize), 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        let mut b = self.stream().launch_builder(&f);
        b.arg(buf).arg(&n_i).arg(&seed).arg(&std);
        // SAFETY: the arguments match fill_normal_{f32,bf16}(T*, long long, unsigned long long,
        // float); the loop stops at the buffer's length; one stream.
        unsafe { b.launch(cfg) }.map_err(launch_err(id))?;
        Ok(())
    }
}
