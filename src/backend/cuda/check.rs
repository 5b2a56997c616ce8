//! The GPU conformance suite: every kernel and every GEMM form against the cpu backend's
//! math (`crate::math`), then a bf16 GEMM benchmark. Shared by the `moelab-gpu-check` binary
//! and the crate's GPU test.
//!
//! Each check draws fresh normal inputs (from the run's seed and the check's name), rounds
//! them to the storage type so the reference sees exactly what the device sees, fills the
//! outputs with NaN before the launch (a kernel that skips an element cannot pass), and
//! compares `||out - ref|| / ||ref||` against the dtype's tolerance ([`BF16_TOL`],
//! [`F32_TOL`]). Any NaN in an output fails the check.

use half::bf16;
use crate::math::{activation, linalg, norm, rng, routing};
use crate::spec::Activation;
use rand::RngExt;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use moelab_kernels::device::{library_report, nccl_version, require_nccl, Device, DeviceInfo, LibraryReport};
use moelab_kernels::dtype::{from_f32_slice, round_to, to_f32_vec, DType, Dtype};
use moelab_kernels::error::{no_panic, GpuError};
use moelab_kernels::gemm::{GemmDims, GemmForm};
use moelab_kernels::nvrtc::CompileRecord;
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::CudaSlice;

/// Relative tolerance for bf16 storage (8 bits of mantissa; one rounding is about 2e-3).
pub const BF16_TOL: f64 = 1e-2;
/// Relative tolerance for f32 kernels.
pub const F32_TOL: f64 = 1e-4;

/// The named tolerance for a storage type.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => F32_TOL,
        DType::Bf16 => BF16_TOL,
    }
}

/// One comparison of a device output with its cpu reference.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// `{kernel or form}[shape]`, plus `.output` when an op has several outputs.
    pub name: String,
    /// The storage type under test.
    pub dtype: DType,
    /// `||out - ref|| / ||ref||` (the absolute norm when the reference is all zeros); NaN
    /// when the check could not run.
    pub rel_err: f64,
    /// The tolerance it was held to.
    pub tol: f64,
    /// NaN values in the device output.
    pub nan_count: usize,
    /// Within tolerance and free of NaN.
    pub passed: bool,
    /// Why the check could not run, when it could not.
    pub error: Option<String>,
}

impl CheckResult {
    /// The report line: `PASS name rel_err` or `FAIL name rel_err (why)`.
    pub fn line(&self) -> String {
        if self.passed {
            format!("PASS {} {:.3e}", self.name, self.rel_err)
        } else {
            let mut why = vec![format!("tol {:.0e}", self.tol)];
            if self.nan_count > 0 {
                why.push(format!("{} NaN", self.nan_count));
            }
            if let Some(e) = &self.error {
                why.push(e.clone());
            }
            format!("FAIL {} {:.3e} ({})", self.name, self.rel_err, why.join("; "))
        }
    }
}

/// The dense GEMM benchmark's settings.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BenchOptions {
    /// m = n = k.
    pub size: usize,
    /// Untimed runs first.
    pub warmup: usize,
    /// Timed runs; the median is reported.
    pub reps: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions { size: 8192, warmup: 3, reps: 20 }
    }
}

/// The benchmark's result.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// The product's sizes.
    pub dims: GemmDims,
    /// Storage type (bf16, f32 accumulation).
    pub dtype: DType,
    /// Untimed runs.
    pub warmup: usize,
    /// Timed runs.
    pub reps: usize,
    /// Median milliseconds per product, from CUDA events around each run.
    pub median_ms: f64,
    /// Fastest run.
    pub min_ms: f64,
    /// Slowest run.
    pub max_ms: f64,
    /// 2 m n k / median time, in TFLOP/s.
    pub tflops: f64,
    /// Every timed run, in order.
    pub all_ms: Vec<f64>,
}

/// What to run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CheckOptions {
    /// Seed of every input; each run should use a fresh one (see [`fresh_seed`]).
    pub seed: u64,
    /// The GEMM benchmark, or None to skip it.
    pub bench: Option<BenchOptions>,
    /// Whether to check NCCL (a one-rank all-reduce).
    pub nccl: bool,
}

/// Everything one run found, as written to `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The device checked.
    pub device: DeviceInfo,
    /// The NVRTC target.
    pub arch: String,
    /// The loaded NVRTC's version.
    pub nvrtc_version: (i32, i32),
    /// NCCL's version, or why it did not load.
    pub nccl: Result<(i32, i32, i32), String>,
    /// Which libraries loaded.
    pub libraries: LibraryReport,
    /// The seed of this run's inputs.
    pub seed: u64,
    /// Every check, in order.
    pub checks: Vec<CheckResult>,
    /// The benchmark, if it ran and succeeded.
    pub bench: Option<BenchResult>,
    /// How each kernel family's PTX was obtained.
    pub kernels: Vec<CompileRecord>,
    /// Checks that passed.
    pub passed: usize,
    /// Checks that failed.
    pub failed: usize,
}

/// A seed that differs between runs (clock and process id).
pub fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ ((std::process::id() as u64) << 32) ^ 0x9e37_79b9_7f4a_7c15
}

/// `(||out - ref|| / ||ref||, NaN count in out)`, in f64; the absolute norm when the
/// reference is all zeros. Any NaN makes the error NaN.
pub fn compare(out: &[f32], reference: &[f32]) -> (f64, usize) {
    assert_eq!(out.len(), reference.len(), "compare: lengths differ");
    let nan_count = out.iter().filter(|v| v.is_nan()).count();
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&o, &r) in out.iter().zip(reference) {
        diff += (o as f64 - r as f64).powi(2);
        norm += (r as f64).powi(2);
    }
    let err = if norm > 0.0 { (diff / norm).sqrt() } else { diff.sqrt() };
    (if nan_count > 0 { f64::NAN } else { err }, nan_count)
}

/// One output of a check: a suffix naming it (empty for single-output ops), the device's
/// values and the reference's, both as f32.
type Part = (&'static str, Vec<f32>, Vec<f32>);

fn normal(seed: u64, tag: &str, n: usize, std: f32, mean: f32) -> Vec<f32> {
    let mut r = rng::stream(seed, tag, n as u64, 0);
    let mut v = vec![0.0; n];
    rng::fill_normal(&mut r, &mut v, std);
    for x in v.iter_mut() {
        *x += mean;
    }
    v
}

/// Indices in `[0, bound)`, about one in ten replaced by -1 (an empty slot / a dropped row).
fn indices(r: &mut ChaCha8Rng, n: usize, bound: usize) -> Vec<i32> {
    (0..n)
        .map(|_| {
            if r.random::<u32>() % 10 == 0 {
                -1
            } else {
                (r.random::<u32>() % bound as u32) as i32
            }
        })
        .collect()
}

/// Rounds `host` to T in place and uploads it.
fn input<T: Dtype>(dev: &Device, host: &mut [f32]) -> Result<CudaSlice<T>, GpuError> {
    round_to::<T>(host);
    dev.upload(&from_f32_slice::<T>(host))
}

/// A buffer filled with NaN.
fn poisoned<T: Dtype>(dev: &Device, n: usize) -> Result<CudaSlice<T>, GpuError> {
    let mut s = dev.alloc_zeros::<T>(n)?;
    dev.fill(&mut s, f32::NAN)?;
    Ok(s)
}

fn fetch<T: Dtype>(dev: &Device, s: &CudaSlice<T>) -> Result<Vec<f32>, GpuError> {
    Ok(to_f32_vec(&dev.download(s)?))
}

fn check_softmax<T: Dtype>(dev: &Device, seed: u64, rows: usize, cols: usize) -> Result<Vec<Part>, GpuError> {
    let mut x = normal(seed, "softmax.x", rows * cols, 2.0, 0.0);
    let xd = input::<T>(dev, &mut x)?;
    let mut yd = poisoned::<T>(dev, rows * cols)?;
    dev.softmax_rows(&xd, &mut yd, rows, cols)?;
    let mut want = vec![0.0; rows * cols];
    routing::softmax_rows(&x, &mut want, cols);
    Ok(vec![("", fetch(dev, &yd)?, want)])
}

fn check_gelu_fwd<T: Dtype>(dev: &Device, seed: u64, n: usize) -> Result<Vec<Part>, GpuError> {
    let mut h = normal(seed, "gelu.h", n, 2.0, 0.0);
    let hd = input::<T>(dev, &mut h)?;
    let mut od = poisoned::<T>(dev, n)?;
    dev.gelu_forward(&hd, &mut od)?;
    let mut want = vec![0.0; n];
    activation::forward(Activation::Gelu, &h, &mut want);
    Ok(vec![("", fetch(dev, &od)?, want)])
}

fn check_gelu_bwd<T: Dtype>(dev: &Device, seed: u64, n: usize) -> Result<Vec<Part>, GpuError> {
    let mut h = normal(seed, "gelu_bwd.h", n, 2.0, 0.0);
    let mut da = normal(seed, "gelu_bwd.da", n, 1.0, 0.0);
    let hd = input::<T>(dev, &mut h)?;
    let dad = input::<T>(dev, &mut da)?;
    let mut dhd = poisoned::<T>(dev, n)?;
    dev.gelu_backward(&hd, &dad, &mut dhd)?;
    let mut want = vec![0.0; n];
    activation::backward(Activation::Gelu, &h, &da, &mut want);
    Ok(vec![("", fetch(dev, &dhd)?, want)])
}

/// LayerNorm inputs: x off-centre (mean 3) so that the centring matters; gamma near 1.
fn layernorm_inputs(seed: u64, rows: usize, cols: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    (
        normal(seed, "ln.x", rows * cols, 1.0, 3.0),
        normal(seed, "ln.gamma", cols, 0.1, 1.0),
        normal(seed, "ln.beta", cols, 0.1, 0.0),
    )
}

fn check_layernorm_fwd<T: Dtype>(dev: &Device, seed: u64, rows: usize, cols: usize) -> Result<Vec<Part>, GpuError> {
    let (mut x, mut g, mut b) = layernorm_inputs(seed, rows, cols);
    let xd = input::<T>(dev, &mut x)?;
    let gd = input::<T>(dev, &mut g)?;
    let bd = input::<T>(dev, &mut b)?;
    let mut yd = poisoned::<T>(dev, rows * cols)?;
    let mut sd = poisoned::<f32>(dev, 2 * rows)?;
    dev.layernorm_forward(&xd, &gd, &bd, &mut yd, &mut sd, rows, cols)?;
    let (mut y, mut stats) = (vec![0.0; rows * cols], vec![0.0; 2 * rows]);
    norm::forward(&x, &g, &b, &mut y, &mut stats);
    Ok(vec![("y", fetch(dev, &yd)?, y), ("stats", fetch(dev, &sd)?, stats)])
}

fn check_layernorm_bwd<T: Dtype>(dev: &Device, seed: u64, rows: usize, cols: usize) -> Result<Vec<Part>, GpuError> {
    let (mut x, mut g, mut b) = layernorm_inputs(seed, rows, cols);
    let mut dy = normal(seed, "ln.dy", rows * cols, 1.0, 0.0);
    round_to::<T>(&mut x);
    round_to::<T>(&mut g);
    round_to::<T>(&mut b);
    // Both sides use the reference forward's stats, so the check isolates the backward.
    let (mut y, mut stats) = (vec![0.0; rows * cols], vec![0.0; 2 * rows]);
    norm::forward(&x, &g, &b, &mut y, &mut stats);
    let xd = input::<T>(dev, &mut x)?;
    let gd = input::<T>(dev, &mut g)?;
    let dyd = input::<T>(dev, &mut dy)?;
    let sd = dev.upload(&stats)?;
    let mut dxd = poisoned::<T>(dev, rows * cols)?;
    let mut dgd = poisoned::<f32>(dev, cols)?;
    let mut dbd = poisoned::<f32>(dev, cols)?;
    dev.layernorm_backward(&xd, &gd, &sd, &dyd, &mut dxd, &mut dgd, &mut dbd, rows, cols)?;
    let (mut dx, mut dg, mut db) = (vec![0.0; rows * cols], vec![0.0; cols], vec![0.0; cols]);
    norm::backward(&x, &g, &stats, &dy, &mut dx, &mut dg, &mut db);
    Ok(vec![("dx", fetch(dev, &dxd)?, dx), ("dgamma", fetch(dev, &dgd)?, dg), ("dbeta", fetch(dev, &dbd)?, db)])
}

fn check_permute<T: Dtype>(dev: &Device, seed: u64, n_in: usize, n_out: usize, cols: usize) -> Result<Vec<Part>, GpuError> {
    let mut x = normal(seed, "permute.x", n_in * cols, 1.0, 0.0);
    let idx = indices(&mut rng::stream(seed, "permute.idx", n_out as u64, 0), n_out, n_in);
    let xd = input::<T>(dev, &mut x)?;
    let id = dev.upload_i32(&idx)?;
    let mut od = poisoned::<T>(dev, n_out * cols)?;
    dev.permute_rows(&xd, &id, &mut od, n_in, n_out, cols)?;
    let mut want = vec![0.0; n_out * cols];
    for (i, &s) in idx.iter().enumerate() {
        if s >= 0 {
            let s = s as usize;
            want[i * cols..(i + 1) * cols].copy_from_slice(&x[s * cols..(s + 1) * cols]);
        }
    }
    Ok(vec![("", fetch(dev, &od)?, want)])
}

fn check_combine<T: Dtype>(dev: &Device, seed: u64, n_in: usize, n_out: usize, cols: usize) -> Result<Vec<Part>, GpuError> {
    let mut y = normal(seed, "combine.y", n_in * cols, 1.0, 0.0);
    let w = normal(seed, "combine.w", n_in, 0.5, 0.5);
    // The accumulator starts from a residual, as the cpu backend's Combine does.
    let residual = normal(seed, "combine.residual", n_out * cols, 1.0, 0.0);
    let idx = indices(&mut rng::stream(seed, "combine.idx", n_in as u64, 0), n_in, n_out);
    let yd = input::<T>(dev, &mut y)?;
    let wd = dev.upload(&w)?;
    let id = dev.upload_i32(&idx)?;
    let mut od = dev.upload(&residual)?;
    dev.combine_rows(&yd, &wd, &id, &mut od, n_in, n_out, cols)?;
    let mut want = residual;
    for (i, &d) in idx.iter().enumerate() {
        if d >= 0 {
            let d = d as usize;
            for (o, v) in want[d * cols..(d + 1) * cols].iter_mut().zip(&y[i * cols..(i + 1) * cols]) {
                *o += w[i] * v;
            }
        }
    }
    Ok(vec![("", fetch(dev, &od)?, want)])
}

fn check_gemm<T: Dtype>(dev: &Device, seed: u64, form: GemmForm, d: GemmDims, accumulate: bool) -> Result<Vec<Part>, GpuError>
where
    CudaBlas: Gemm<T>,
{
    let GemmDims { m, k, n } = d;
    let mut a = normal(seed, "gemm.a", m * k, 1.0, 0.0);
    let mut b = normal(seed, "gemm.b", k * n, 1.0, 0.0);
    let ad = input::<T>(dev, &mut a)?;
    let bd = input::<T>(dev, &mut b)?;
    let mut want = if accumulate { normal(seed, "gemm.c", m * n, 1.0, 0.0) } else { vec![0.0; m * n] };
    let mut cd = if accumulate { input::<T>(dev, &mut want)? } else { poisoned::<T>(dev, m * n)? };
    dev.gemm(form, &ad, &bd, &mut cd, d, accumulate)?;
    match form {
        GemmForm::Nn => linalg::gemm(&a, &b, &mut want, m, k, n, accumulate),
        GemmForm::Tn => linalg::gemm_tn(&a, &b, &mut want, k, m, n, accumulate),
        GemmForm::Nt => linalg::gemm_nt(&a, &b, &mut want, m, k, n, accumulate),
    }
    Ok(vec![("", fetch(dev, &cd)?, want)])
}

/// A one-rank NCCL communicator on this device and an all-reduce (sum) through it: the
/// result must equal the input. Proves NCCL loads, initialises and runs on the stream.
fn check_nccl(dev: &Device, seed: u64, n: usize) -> Result<Vec<Part>, GpuError> {
    require_nccl()?;
    let x = normal(seed, "nccl.x", n, 1.0, 0.0);
    let xd = dev.upload(&x)?;
    let mut yd = poisoned::<f32>(dev, n)?;
    no_panic("nccl all_reduce", || {
        let nccl_err = |op: &'static str| move |e: cudarc::nccl::result::NcclError| GpuError::Nccl { op, status: format!("{:?}", e.0) };
        let comms = cudarc::nccl::Comm::from_devices(vec![dev.stream().clone()]).map_err(nccl_err("ncclCommInitAll"))?;
        comms[0]
            .all_reduce(&xd, &mut yd, &cudarc::nccl::ReduceOp::Sum)
            .map_err(nccl_err("ncclAllReduce"))?;
        dev.synchronize()
    })?;
    Ok(vec![("", fetch(dev, &yd)?, x)])
}

/// Times `size`³ bf16 products (CUDA events around each run), then recomputes 64 sampled
/// entries of the result on the host as a check that the timed product is right.
fn bench_gemm(dev: &Device, seed: u64, o: BenchOptions) -> Result<(BenchResult, Vec<Part>), GpuError> {
    let s = o.size;
    let dims = GemmDims { m: s, k: s, n: s };
    let mut a = dev.alloc_zeros::<bf16>(s * s)?;
    let mut b = dev.alloc_zeros::<bf16>(s * s)?;
    dev.fill_normal(&mut a, seed ^ 0xa, 1.0)?;
    dev.fill_normal(&mut b, seed ^ 0xb, 1.0)?;
    let mut c = poisoned::<bf16>(dev, s * s)?;
    for _ in 0..o.warmup {
        dev.gemm(GemmForm::Nn, &a, &b, &mut c, dims, false)?;
    }
    dev.synchronize()?;
    let (start, end) = (dev.timing_event()?, dev.timing_event()?);
    let mut all_ms = Vec::with_capacity(o.reps);
    for _ in 0..o.reps {
        start.record(dev.stream()).map_err(GpuError::driver("cuEventRecord"))?;
        dev.gemm(GemmForm::Nn, &a, &b, &mut c, dims, false)?;
        end.record(dev.stream()).map_err(GpuError::driver("cuEventRecord"))?;
        all_ms.push(start.elapsed_ms(&end).map_err(GpuError::driver("cuEventElapsedTime"))? as f64);
    }
    let mut sorted = all_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let median_ms = if sorted.is_empty() {
        f64::NAN
    } else if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2]
    } else {
        0.5 * (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2])
    };
    let result = BenchResult {
        dims,
        dtype: DType::Bf16,
        warmup: o.warmup,
        reps: o.reps,
        median_ms,
        min_ms: sorted.first().copied().unwrap_or(f64::NAN),
        max_ms: sorted.last().copied().unwrap_or(f64::NAN),
        tflops: dims.flops() / (median_ms * 1e-3) / 1e12,
        all_ms,
    };
    let (ah, bh, ch) = (dev.download(&a)?, dev.download(&b)?, dev.download(&c)?);
    let mut r = rng::stream(seed, "bench.sample", 0, 0);
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for _ in 0..64 {
        let (i, j) = ((r.random::<u32>() as usize) % s, (r.random::<u32>() as usize) % s);
        let dot: f64 = (0..s).map(|p| ah[i * s + p].to_f64() * bh[p * s + j].to_f64()).sum();
        got.push(ch[i * s + j].to_f32());
        want.push(dot as f32);
    }
    Ok((result, vec![("", got, want)]))
}

/// The run in progress: results so far and the callback that prints them.
struct Run<'a> {
    checks: Vec<CheckResult>,
    on_result: &'a mut dyn FnMut(&CheckResult),
}

impl Run<'_> {
    fn record(&mut self, name: String, dtype: DType, tol: f64, outcome: Result<Vec<Part>, GpuError>) {
        let results: Vec<CheckResult> = match outcome {
            Ok(parts) => {
                let single = parts.len() == 1;
                parts
                    .into_iter()
                    .map(|(suffix, got, want)| {
                        let (rel_err, nan_count) = compare(&got, &want);
                        let name = if single || suffix.is_empty() { name.clone() } else { format!("{name}.{suffix}") };
                        CheckResult { name, dtype, rel_err, tol, nan_count, passed: nan_count == 0 && rel_err <= tol, error: None }
                    })
                    .collect()
            }
            Err(e) => vec![CheckResult {
                name,
                dtype,
                rel_err: f64::NAN,
                tol,
                nan_count: 0,
                passed: false,
                error: Some(e.to_string()),
            }],
        };
        for r in results {
            (self.on_result)(&r);
            self.checks.push(r);
        }
    }

    /// Runs one check for both dtypes.
    fn both<F32, B16>(&mut self, op: &str, shape: &str, f32_check: F32, bf16_check: B16)
    where
        F32: FnOnce() -> Result<Vec<Part>, GpuError>,
        B16: FnOnce() -> Result<Vec<Part>, GpuError>,
    {
        self.record(format!("{op}_f32[{shape}]"), DType::F32, F32_TOL, no_panic("check", f32_check));
        self.record(format!("{op}_bf16[{shape}]"), DType::Bf16, BF16_TOL, no_panic("check", bf16_check));
    }
}

/// Runs every check (and the benchmark, if asked), calling `on_result` as each result comes
/// in. A check that cannot run is a failed check with its error, not an error of the run.
pub fn run(dev: &Device, opts: &CheckOptions, on_result: &mut dyn FnMut(&CheckResult)) -> Report {
    let seed = opts.seed;
    let mut run = Run { checks: Vec::new(), on_result };

    for (rows, cols) in [(1000, 64), (37, 1000)] {
        run.both("softmax_rows", &format!("{rows}x{cols}"), || check_softmax::<f32>(dev, seed, rows, cols), || check_softmax::<bf16>(dev, seed, rows, cols));
    }
    let n = 1_000_003;
    run.both("gelu_fwd", &n.to_string(), || check_gelu_fwd::<f32>(dev, seed, n), || check_gelu_fwd::<bf16>(dev, seed, n));
    run.both("gelu_bwd", &n.to_string(), || check_gelu_bwd::<f32>(dev, seed, n), || check_gelu_bwd::<bf16>(dev, seed, n));
    for (rows, cols) in [(300, 1024), (57, 1000), (5, 7)] {
        let shape = format!("{rows}x{cols}");
        run.both("layernorm_fwd", &shape, || check_layernorm_fwd::<f32>(dev, seed, rows, cols), || check_layernorm_fwd::<bf16>(dev, seed, rows, cols));
        run.both("layernorm_bwd", &shape, || check_layernorm_bwd::<f32>(dev, seed, rows, cols), || check_layernorm_bwd::<bf16>(dev, seed, rows, cols));
    }
    // 1000 columns take the 16-byte path for both dtypes; 333 the scalar one.
    for (n_in, n_out, cols) in [(500, 700, 1000), (300, 257, 333)] {
        let shape = format!("{n_in}to{n_out}x{cols}");
        run.both("permute_rows", &shape, || check_permute::<f32>(dev, seed, n_in, n_out, cols), || check_permute::<bf16>(dev, seed, n_in, n_out, cols));
        // Combine maps n_out rows back onto n_in: rows share destinations, so atomics collide.
        run.both("combine_rows", &format!("{n_out}to{n_in}x{cols}"), || check_combine::<f32>(dev, seed, n_out, n_in, cols), || check_combine::<bf16>(dev, seed, n_out, n_in, cols));
    }
    for form in GemmForm::ALL {
        for (d, accumulate) in [
            (GemmDims { m: 384, k: 512, n: 320 }, false),
            (GemmDims { m: 127, k: 65, n: 33 }, false),
            (GemmDims { m: 256, k: 96, n: 160 }, true),
        ] {
            let shape = format!("{}x{}x{}{}", d.m, d.k, d.n, if accumulate { "+acc" } else { "" });
            let op = format!("gemm_{}", form.name());
            run.both(&op, &shape, || check_gemm::<f32>(dev, seed, form, d, accumulate), || check_gemm::<bf16>(dev, seed, form, d, accumulate));
        }
    }
    if opts.nccl {
        let outcome = no_panic("nccl", || check_nccl(dev, seed, 1 << 16));
        run.record("nccl_allreduce_1rank_f32".into(), DType::F32, F32_TOL, outcome);
    }
    let mut bench = None;
    if let Some(o) = opts.bench {
        let outcome = no_panic("bench", || bench_gemm(dev, seed, o));
        let name = format!("gemm_bench_bf16[{0}x{0}x{0}].sample", o.size);
        let outcome = outcome.map(|(result, parts)| {
            bench = Some(result);
            parts
        });
        run.record(name, DType::Bf16, BF16_TOL, outcome);
    }

    let passed = run.checks.iter().filter(|c| c.passed).count();
    let failed = run.checks.len() - passed;
    Report {
        device: dev.info().clone(),
        arch: dev.arch().to_string(),
        nvrtc_version: dev.nvrtc_version(),
        nccl: nccl_version().map_err(|e| e.to_string()),
        libraries: library_report(),
        seed,
        checks: run.checks,
        bench,
        kernels: dev.compile_records(),
        passed,
        failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_is_relative_and_fails_on_nan() {
        let (e, n) = compare(&[1.0, 2.0], &[1.0, 2.0]);
        assert_eq!((e, n), (0.0, 0));
        let (e, _) = compare(&[1.1, 0.0], &[1.0, 0.0]);
        assert!((e - 0.1).abs() < 1e-6, "{e}");
        let (e, n) = compare(&[f32::NAN, 0.0], &[1.0, 0.0]);
        assert!(e.is_nan());
        assert_eq!(n, 1);
        let (e, _) = compare(&[0.5], &[0.0]);
        assert_eq!(e, 0.5);
    }

    #[test]
    fn lines_follow_the_report_format() {
        let mut r = CheckResult { name: "x_bf16[2x2]".into(), dtype: DType::Bf16, rel_err: 1e-3, tol: BF16_TOL, nan_count: 0, passed: true, error: None };
        assert_eq!(r.line(), "PASS x_bf16[2x2] 1.000e-3");
        r.passed = false;
        r.nan_count = 2;
        assert!(r.line().starts_with("FAIL x_bf16[2x2] "), "{}", r.line());
    }

    #[test]
    fn indices_stay_in_bounds_and_include_empty_slots() {
        let idx = indices(&mut rng::stream(1, "t", 0, 0), 10_000, 7);
        assert!(idx.iter().all(|&i| (-1..7).contains(&i)));
        assert!(idx.contains(&-1));
    }
}
