//! The kernel registry and its compiler: one CUDA C file per op family under `kernels/cu/`,
//! embedded with `include_str!`, compiled by NVRTC to PTX for the device's compute capability
//! and cached on disk, keyed by a hash of the source, the target and the options.
//!
//! PTX targets a virtual architecture (`compute_90` on Hopper); the driver turns it into
//! machine code when the module loads (and keeps its own cache of that). NVRTC gives a cubin
//! instead of PTX when asked for a real architecture (`sm_90`), so `compute_XY` is deliberate.

use std::path::{Path, PathBuf};
use std::time::Instant;

use cudarc::nvrtc::{CompileError, CompileOptions};
use serde::Serialize;

use crate::dtype::DType;
use crate::error::{no_panic, GpuError};

/// Helpers every family uses (bf16 conversion, reductions); prepended to each family's source.
pub const COMMON_SOURCE: &str = include_str!("../cu/common.cuh");

/// Options passed to NVRTC besides the target architecture. Part of the cache key.
pub const NVRTC_OPTIONS: &[&str] = &["--std=c++17", "--generate-line-info"];

/// One `.cu` file: the unit NVRTC compiles and the driver loads as one module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Family {
    /// `cu/softmax.cu`: gating softmax over rows.
    Softmax,
    /// `cu/activation.cu`: GELU forward and backward.
    Activation,
    /// `cu/layernorm.cu`: LayerNorm forward and backward.
    Layernorm,
    /// `cu/permute.cu`: row gather (dispatch) and weighted scatter-add (combine).
    Permute,
    /// `cu/util.cu`: constant and random fills.
    Util,
}

impl Family {
    /// Every family, in source order.
    pub const ALL: [Family; 5] = [Family::Softmax, Family::Activation, Family::Layernorm, Family::Permute, Family::Util];

    /// The file name under `kernels/cu/`.
    pub fn file_name(self) -> &'static str {
        match self {
            Family::Softmax => "softmax.cu",
            Family::Activation => "activation.cu",
            Family::Layernorm => "layernorm.cu",
            Family::Permute => "permute.cu",
            Family::Util => "util.cu",
        }
    }

    /// The family's own source (without [`COMMON_SOURCE`]).
    pub fn source(self) -> &'static str {
        match self {
            Family::Softmax => include_str!("../cu/softmax.cu"),
            Family::Activation => include_str!("../cu/activation.cu"),
            Family::Layernorm => include_str!("../cu/layernorm.cu"),
            Family::Permute => include_str!("../cu/permute.cu"),
            Family::Util => include_str!("../cu/util.cu"),
        }
    }

    /// What NVRTC compiles: the common helpers, then the family, with `#line` markers so that
    /// compiler messages name the right file and line.
    pub fn full_source(self) -> String {
        format!(
            "#line 1 \"common.cuh\"\n{COMMON_SOURCE}\n#line 1 \"{}\"\n{}",
            self.file_name(),
            self.source()
        )
    }

    /// The kernels this family defines.
    pub fn kernels(self) -> impl Iterator<Item = KernelId> {
        KernelId::ALL.into_iter().filter(move |k| k.family() == self)
    }
}

/// Every kernel, named `{op}_{dtype}` exactly as its `extern "C" __global__` function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum KernelId {
    /// `softmax_rows_f32`: row softmax, f32.
    SoftmaxRowsF32,
    /// `softmax_rows_bf16`: row softmax, bf16 storage.
    SoftmaxRowsBf16,
    /// `gelu_fwd_f32`: GELU forward, f32.
    GeluFwdF32,
    /// `gelu_fwd_bf16`: GELU forward, bf16 storage.
    GeluFwdBf16,
    /// `gelu_bwd_f32`: GELU backward, f32.
    GeluBwdF32,
    /// `gelu_bwd_bf16`: GELU backward, bf16 storage.
    GeluBwdBf16,
    /// `layernorm_fwd_f32`: LayerNorm forward with (mean, rstd) stats, f32.
    LayernormFwdF32,
    /// `layernorm_fwd_bf16`: LayerNorm forward, bf16 storage, f32 stats.
    LayernormFwdBf16,
    /// `layernorm_bwd_dx_f32`: LayerNorm input gradient, f32.
    LayernormBwdDxF32,
    /// `layernorm_bwd_dx_bf16`: LayerNorm input gradient, bf16 storage.
    LayernormBwdDxBf16,
    /// `layernorm_bwd_params_f32`: LayerNorm gamma/beta gradients (f32 out), f32 inputs.
    LayernormBwdParamsF32,
    /// `layernorm_bwd_params_bf16`: LayerNorm gamma/beta gradients (f32 out), bf16 inputs.
    LayernormBwdParamsBf16,
    /// `permute_rows_f32`: row gather `out[i] = x[idx[i]]`, f32.
    PermuteRowsF32,
    /// `permute_rows_bf16`: row gather, bf16.
    PermuteRowsBf16,
    /// `combine_rows_f32`: weighted scatter-add into f32, f32 rows.
    CombineRowsF32,
    /// `combine_rows_bf16`: weighted scatter-add into f32, bf16 rows.
    CombineRowsBf16,
    /// `fill_f32`: constant fill, f32.
    FillF32,
    /// `fill_bf16`: constant fill, bf16.
    FillBf16,
    /// `fill_normal_f32`: N(0, std²) fill on the device, f32.
    FillNormalF32,
    /// `fill_normal_bf16`: N(0, std²) fill on the device, bf16.
    FillNormalBf16,
}

impl KernelId {
    /// Every kernel.
    pub const ALL: [KernelId; 20] = [
        KernelId::SoftmaxRowsF32,
        KernelId::SoftmaxRowsBf16,
        KernelId::GeluFwdF32,
        KernelId::GeluFwdBf16,
        KernelId::GeluBwdF32,
        KernelId::GeluBwdBf16,
        KernelId::LayernormFwdF32,
        KernelId::LayernormFwdBf16,
        KernelId::LayernormBwdDxF32,
        KernelId::LayernormBwdDxBf16,
        KernelId::LayernormBwdParamsF32,
        KernelId::LayernormBwdParamsBf16,
        KernelId::PermuteRowsF32,
        KernelId::PermuteRowsBf16,
        KernelId::CombineRowsF32,
        KernelId::CombineRowsBf16,
        KernelId::FillF32,
        KernelId::FillBf16,
        KernelId::FillNormalF32,
        KernelId::FillNormalBf16,
    ];

    /// The CUDA function name.
    pub fn name(self) -> &'static str {
        match self {
            KernelId::SoftmaxRowsF32 => "softmax_rows_f32",
            KernelId::SoftmaxRowsBf16 => "softmax_rows_bf16",
            KernelId::GeluFwdF32 => "gelu_fwd_f32",
            KernelId::GeluFwdBf16 => "gelu_fwd_bf16",
            KernelId::GeluBwdF32 => "gelu_bwd_f32",
            KernelId::GeluBwdBf16 => "gelu_bwd_bf16",
            KernelId::LayernormFwdF32 => "layernorm_fwd_f32",
            KernelId::LayernormFwdBf16 => "layernorm_fwd_bf16",
            KernelId::LayernormBwdDxF32 => "layernorm_bwd_dx_f32",
            KernelId::LayernormBwdDxBf16 => "layernorm_bwd_dx_bf16",
            KernelId::LayernormBwdParamsF32 => "layernorm_bwd_params_f32",
            KernelId::LayernormBwdParamsBf16 => "layernorm_bwd_params_bf16",
            KernelId::PermuteRowsF32 => "permute_rows_f32",
            KernelId::PermuteRowsBf16 => "permute_rows_bf16",
            KernelId::CombineRowsF32 => "combine_rows_f32",
            KernelId::CombineRowsBf16 => "combine_rows_bf16",
            KernelId::FillF32 => "fill_f32",
            KernelId::FillBf16 => "fill_bf16",
            KernelId::FillNormalF32 => "fill_normal_f32",
            KernelId::FillNormalBf16 => "fill_normal_bf16",
        }
    }

    /// The `.cu` file that defines it.
    pub fn family(self) -> Family {
        use KernelId::*;
        match self {
            SoftmaxRowsF32 | SoftmaxRowsBf16 => Family::Softmax,
            GeluFwdF32 | GeluFwdBf16 | GeluBwdF32 | GeluBwdBf16 => Family::Activation,
            LayernormFwdF32 | LayernormFwdBf16 | LayernormBwdDxF32 | LayernormBwdDxBf16 | LayernormBwdParamsF32
            | LayernormBwdParamsBf16 => Family::Layernorm,
            PermuteRowsF32 | PermuteRowsBf16 | CombineRowsF32 | CombineRowsBf16 => Family::Permute,
            FillF32 | FillBf16 | FillNormalF32 | FillNormalBf16 => Family::Util,
        }
    }

    /// The storage type it reads and writes (f32 side buffers such as stats aside).
    pub fn dtype(self) -> DType {
        if self.name().ends_with("_bf16") {
            DType::Bf16
        } else {
            DType::F32
        }
    }

    /// Picks the f32 or the bf16 variant of one op.
    pub fn pick(dtype: DType, f32_variant: KernelId, bf16_variant: KernelId) -> KernelId {
        match dtype {
            DType::F32 => f32_variant,
            DType::Bf16 => bf16_variant,
        }
    }
}

/// The NVRTC target for a compute capability: `compute_90` for (9, 0).
pub fn arch_for(major: i32, minor: i32) -> String {
    format!("compute_{major}{minor}")
}

/// 64-bit FNV-1a: stable across Rust versions and machines (unlike `DefaultHasher`), which a
/// key of files on disk needs.
fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so that ("ab", "c") and ("a", "bc") differ.
        h = (h ^ 0xff).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The cache key of one compilation: source, target, options and the NVRTC version.
pub fn cache_key(source: &str, arch: &str, nvrtc_version: (i32, i32)) -> u64 {
    let version = format!("{}.{}", nvrtc_version.0, nvrtc_version.1);
    let options = NVRTC_OPTIONS.join(" ");
    fnv1a64(&[source.as_bytes(), arch.as_bytes(), options.as_bytes(), version.as_bytes()])
}

/// Where compiled PTX is kept between runs.
#[derive(Debug, Clone)]
pub struct PtxCache {
    dir: Option<PathBuf>,
}

impl PtxCache {
    /// `$MOELAB_PTX_CACHE` if set (`off` disables the cache), else `$XDG_CACHE_HOME/moelab/ptx`,
    /// else `~/.cache/moelab/ptx`; disabled when none of these is known.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let dir = match var("MOELAB_PTX_CACHE") {
            Some(v) if v == "off" => None,
            Some(v) => Some(PathBuf::from(v)),
            None => var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .map(|base| base.join("moelab").join("ptx")),
        };
        PtxCache { dir }
    }

    /// A cache in the given folder.
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        PtxCache { dir: Some(dir.into()) }
    }

    /// No cache: every module is compiled.
    pub fn disabled() -> Self {
        PtxCache { dir: None }
    }

    /// The folder, if caching.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    #[cfg(test)]
    fn path(&self, family: Family, arch: &str, key: u64) -> Option<PathBuf> {
        self.path_for(family.file_name().trim_end_matches(".cu"), arch, key)
    }

    fn path_for(&self, stem: &str, arch: &str, key: u64) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("{stem}-{arch}-{key:016x}.ptx")))
    }
}

/// How one family's PTX was obtained, for reports.
#[derive(Debug, Clone, Serialize)]
pub struct CompileRecord {
    /// The family.
    pub family: Family,
    /// The NVRTC target.
    pub arch: String,
    /// The cache key, in hex.
    pub key: String,
    /// True when the PTX came from the disk cache.
    pub cache_hit: bool,
    /// Milliseconds spent compiling (0 on a cache hit).
    pub compile_ms: f64,
    /// The cache file read or written.
    pub cache_path: Option<PathBuf>,
    /// Why the cache could not be written, when it could not (not an error: the PTX is in hand).
    pub cache_error: Option<String>,
}

/// The version of the loaded NVRTC, as (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32), GpuError> {
    no_panic("nvrtcVersion", || {
        let (mut major, mut minor) = (0i32, 0i32);
        // SAFETY: nvrtcVersion writes two ints through valid pointers; the library was found
        // by the caller (Device::open checks NVRTC first) and a panic is caught around us.
        let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        status.result().map_err(|e| GpuError::Compile {
            family: "(version query)",
            arch: String::new(),
            log: format!("{e:?}"),
        })?;
        Ok((major, minor))
    })
}

/// Compiles one family to PTX for `arch` (e.g. `compute_90`), or reads it from `cache`.
/// A cache that cannot be written is reported in the record, not as an error.
pub fn compile_family(family: Family, arch: &str, cache: &PtxCache) -> Result<(String, CompileRecord), GpuError> {
    let stem = family.file_name().trim_end_matches(".cu");
    compile_source(family.file_name(), stem, &family.full_source(), arch, cache, family)
}

/// Compiles a kernel source that lives outside this crate (the cuda backend's plan kernels)
/// with the same options and the same on-disk cache as the families. `name` names it in
/// errors and in the cache file (`<name>-<arch>-<key>.ptx`); `common.cuh` is prepended.
pub fn compile_extra(name: &'static str, source: &str, arch: &str, cache: &PtxCache) -> Result<String, GpuError> {
    let full = format!("{COMMON_SOURCE}\n{source}");
    compile_source(name, name.trim_end_matches(".cu"), &full, arch, cache, Family::Util).map(|(ptx, _)| ptx)
}

fn compile_source(file: &'static str, stem: &str, source: &str, arch: &str, cache: &PtxCache, family: Family) -> Result<(String, CompileRecord), GpuError> {
    let key = cache_key(source, arch, nvrtc_version()?);
    let path = cache.path_for(stem, arch, key);
    let mut record = CompileRecord {
        family,
        arch: arch.to_string(),
        key: format!("{key:016x}"),
        cache_hit: false,
        compile_ms: 0.0,
        cache_path: path.clone(),
        cache_error: None,
    };
    if let Some(p) = &path {
        if let Ok(ptx) = std::fs::read_to_string(p) {
            if ptx.contains(".entry") {
                record.cache_hit = true;
                return Ok((ptx, record));
            }
        }
    }
    let start = Instant::now();
    let mut options: Vec<String> = NVRTC_OPTIONS.iter().map(|s| s.to_string()).collect();
    options.push(format!("--gpu-architecture={arch}"));
    let opts = CompileOptions { options, name: Some(file.to_string()), ..Default::default() };
    let ptx = no_panic("nvrtc compile", || {
        cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| GpuError::Compile {
            family: file,
            arch: arch.to_string(),
            log: compile_log(&e),
        })
    })?;
    let ptx = ptx.to_src();
    record.compile_ms = start.elapsed().as_secs_f64() * 1e3;
    if let Some(p) = &path {
        if let Err(e) = write_atomically(p, &ptx) {
            record.cache_error = Some(format!("{}: {e}", p.display()));
        }
    }
    Ok((ptx, record))
}

fn compile_log(e: &CompileError) -> String {
    match e {
        CompileError::CompileError { nvrtc, log, .. } => {
            format!("{nvrtc:?}\n{}", log.to_string_lossy())
        }
        other => format!("{other:?}"),
    }
}

/// Writes through a temporary file and a rename, so that a concurrent reader never sees half
/// a file (two processes compiling the same family write the same bytes).
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Names of the `extern "C" __global__ void NAME(` functions in a source.
    fn declared_kernels(src: &str) -> BTreeSet<String> {
        src.split("extern \"C\" __global__ void ")
            .skip(1)
            .filter_map(|rest| rest.split('(').next())
            .map(|s| s.trim().to_string())
            .collect()
    }

    #[test]
    fn every_cu_kernel_is_registered_and_every_id_is_defined() {
        for family in Family::ALL {
            let declared = declared_kernels(family.source());
            let registered: BTreeSet<String> = family.kernels().map(|k| k.name().to_string()).collect();
            assert_eq!(declared, registered, "{}", family.file_name());
        }
        assert!(declared_kernels(COMMON_SOURCE).is_empty(), "common.cuh holds helpers, not kernels");
    }

    #[test]
    fn kernel_names_are_unique_and_end_in_their_dtype() {
        let names: BTreeSet<&str> = KernelId::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(names.len(), KernelId::ALL.len());
        for k in KernelId::ALL {
            assert!(k.name().ends_with(&format!("_{}", k.dtype().name())), "{}", k.name());
        }
    }

    #[test]
    fn cache_key_depends_on_source_arch_and_version() {
        let a = cache_key("x", "compute_90", (13, 0));
        assert_eq!(a, cache_key("x", "compute_90", (13, 0)));
        assert_ne!(a, cache_key("y", "compute_90", (13, 0)));
        assert_ne!(a, cache_key("x", "compute_80", (13, 0)));
        assert_ne!(a, cache_key("x", "compute_90", (13, 1)));
        assert_eq!(arch_for(9, 0), "compute_90");
    }

    #[test]
    fn cache_dir_follows_the_environment_rules() {
        let c = PtxCache::at("/tmp/somewhere");
        let p = c.path(Family::Softmax, "compute_90", 0xab).unwrap();
        assert_eq!(p, PathBuf::from("/tmp/somewhere/softmax-compute_90-00000000000000ab.ptx"));
        assert!(PtxCache::disabled().path(Family::Util, "compute_90", 1).is_none());
    }
}
