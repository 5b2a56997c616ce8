//! Finding CUDA and opening a device.
//!
//! cudarc loads libcuda, NVRTC, cuBLAS and NCCL at run time and panics on first use of a
//! library it cannot find. This module asks first (cudarc's `is_culib_present` per library)
//! and turns absence into a [`GpuError`] that says what is missing and how to fix it; a
//! `catch_unwind` around each probe is the last resort. [`probe`] never panics, with or
//! without CUDA on the machine.
//!
//! A [`Device`] owns one context and one stream. Every buffer it hands out lives on that stream
//! and every kernel and GEMM runs on it, so work is ordered by the stream alone: cudarc's
//! per-buffer event tracking (which adds an event record and wait around every use) is turned
//! off for the device's context.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};
use cudarc::driver::{result, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaSlice, CudaStream};
use cudarc::nvrtc::Ptx;
use serde::Serialize;

use crate::dtype::Dtype;
use crate::error::{no_panic, GpuError};
use crate::nvrtc::{arch_for, compile_family, nvrtc_version, CompileRecord, Family, KernelId, PtxCache};

/// What [`probe`] learns about a device without creating a context on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    /// The CUDA ordinal.
    pub ordinal: usize,
    /// Devices visible to this process.
    pub device_count: usize,
    /// The marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// (major, minor), e.g. (9, 0) for Hopper.
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors.
    pub sm_count: i32,
    /// Device memory in bytes.
    pub total_memory_bytes: usize,
    /// L2 cache in bytes.
    pub l2_cache_bytes: i32,
    /// The most shared memory one block may opt in to, in bytes.
    pub max_shared_memory_per_block_optin: i32,
    /// The CUDA version the driver supports, (major, minor), e.g. (13, 0).
    pub driver_cuda_version: (i32, i32),
}

/// Which CUDA libraries load on this machine, for reports. Each entry is `None` when the
/// library loads and the error message when it does not.
#[derive(Debug, Clone, Serialize)]
pub struct LibraryReport {
    /// libcuda.
    pub driver: Option<String>,
    /// libnvrtc.
    pub nvrtc: Option<String>,
    /// libcublas and libcublasLt.
    pub cublas: Option<String>,
    /// libnccl.
    pub nccl: Option<String>,
}

/// The file names cudarc tries for a library, without repeats.
fn candidates(lib: &str) -> Vec<String> {
    let mut names = cudarc::get_lib_name_candidates(lib);
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// Asks cudarc whether a library loads; a panic counts as absent.
fn present(check: unsafe fn() -> bool) -> bool {
    // SAFETY: the is_culib_present functions only try dlopen on a list of names and drop
    // what they open; no symbol is called.
    std::panic::catch_unwind(|| unsafe { check() }).unwrap_or(false)
}

/// Errors unless libcuda loads.
pub fn require_driver() -> Result<(), GpuError> {
    if present(cudarc::driver::sys::is_culib_present) {
        Ok(())
    } else {
        Err(GpuError::DriverLibraryMissing { searched: candidates("cuda") })
    }
}

/// Errors unless libnvrtc loads.
pub fn require_nvrtc() -> Result<(), GpuError> {
    if present(cudarc::nvrtc::sys::is_culib_present) {
        Ok(())
    } else {
        Err(GpuError::NvrtcMissing { searched: candidates("nvrtc") })
    }
}

/// Errors unless libcublas and libcublasLt load.
pub fn require_cublas() -> Result<(), GpuError> {
    if !present(cudarc::cublaslt::sys::is_culib_present) {
        return Err(GpuError::CublasMissing { lib: "libcublasLt", searched: candidates("cublasLt") });
    }
    if !present(cudarc::cublas::sys::is_culib_present) {
        return Err(GpuError::CublasMissing { lib: "libcublas", searched: candidates("cublas") });
    }
    Ok(())
}

/// Errors unless NCCL loads under a name cudarc tries. Many systems ship only `libnccl.so.2`
/// (the `libnccl.so` link comes with the -dev package), which cudarc does not try: that case
/// gets its own error with the one-line fix.
pub fn require_nccl() -> Result<(), GpuError> {
    if present(cudarc::nccl::sys::is_culib_present) {
        return Ok(());
    }
    // SAFETY: loading NCCL runs only its library constructors, which have no preconditions;
    // the handle is dropped at once.
    let so2 = unsafe { libloading::Library::new("libnccl.so.2") };
    if so2.is_ok() {
        return Err(GpuError::NcclUnversionedLinkMissing { found: find_on_library_path("libnccl.so.2") });
    }
    Err(GpuError::NcclMissing { searched: candidates("nccl") })
}

/// The full path of a library file in LD_LIBRARY_PATH or the usual system folders, or the bare
/// name when it is elsewhere (the dynamic loader found it, so it exists somewhere).
fn find_on_library_path(file: &str) -> String {
    let from_env = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
    let dirs = from_env
        .split(':')
        .filter(|d| !d.is_empty())
        .map(str::to_string)
        .chain(["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/local/lib", "/lib/x86_64-linux-gnu"].map(String::from));
    for dir in dirs {
        let p = std::path::Path::new(&dir).join(file);
        if p.exists() {
            return p.display().to_string();
        }
    }
    file.to_string()
}

/// The NCCL version as (major, minor, patch).
pub fn nccl_version() -> Result<(i32, i32, i32), GpuError> {
    require_nccl()?;
    no_panic("ncclGetVersion", || {
        let code = cudarc::nccl::result::get_nccl_version()
            .map_err(|e| GpuError::Nccl { op: "ncclGetVersion", status: format!("{:?}", e.0) })?;
        // NCCL_VERSION_CODE is major * 10000 + minor * 100 + patch since NCCL 2.9.
        Ok((code / 10000, (code / 100) % 100, code % 100))
    })
}

/// Which libraries load, without failing on any.
pub fn library_report() -> LibraryReport {
    let msg = |r: Result<(), GpuError>| r.err().map(|e| e.to_string());
    LibraryReport {
        driver: msg(require_driver()),
        nvrtc: msg(require_nvrtc()),
        cublas: msg(require_cublas()),
        nccl: msg(require_nccl()),
    }
}

/// Probes device 0. Never panics; errors say what is missing (see [`GpuError::is_absent`]).
pub fn probe() -> Result<DeviceInfo, GpuError> {
    probe_ordinal(0)
}

/// Probes one device: loads the driver, initialises it and reads the device's attributes,
/// creating no context. Never panics.
pub fn probe_ordinal(ordinal: usize) -> Result<DeviceInfo, GpuError> {
    require_driver()?;
    no_panic("probe", || {
        // cuInit fails on a machine with the driver library but no usable GPU (no device
        // nodes, a driver older than the library, a container without the GPU): all of these
        // mean "no device" to the caller, with the driver's words as the detail.
        result::init().map_err(|e| GpuError::NoDevice { detail: format!("cuInit failed: {e}") })?;
        let count = result::device::get_count().map_err(GpuError::driver("cuDeviceGetCount"))?;
        let count = usize::try_from(count).unwrap_or(0);
        if count == 0 {
            return Err(GpuError::NoDevice { detail: "the driver reports 0 devices".into() });
        }
        if ordinal >= count {
            return Err(GpuError::BadOrdinal { ordinal, count });
        }
        let dev = result::device::get(ordinal as i32).map_err(GpuError::driver("cuDeviceGet"))?;
        let attr = |a: CUdevice_attribute| {
            // SAFETY: `dev` came from cuDeviceGet above.
            unsafe { result::device::get_attribute(dev, a) }.map_err(GpuError::driver("cuDeviceGetAttribute"))
        };
        let major = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let sm_count = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let l2_cache_bytes = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?;
        let smem = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        // SAFETY: `dev` came from cuDeviceGet above.
        let total_memory_bytes = unsafe { result::device::total_mem(dev) }.map_err(GpuError::driver("cuDeviceTotalMem"))?;
        let name = result::device::get_name(dev).map_err(GpuError::driver("cuDeviceGetName"))?;
        let mut version = 0i32;
        // SAFETY: cuDriverGetVersion writes one int through a valid pointer.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
            .result()
            .map_err(GpuError::driver("cuDriverGetVersion"))?;
        Ok(DeviceInfo {
            ordinal,
            device_count: count,
            name,
            compute_capability: (major, minor),
            sm_count,
            total_memory_bytes,
            l2_cache_bytes,
            max_shared_memory_per_block_optin: smem,
            driver_cuda_version: (version / 1000, (version % 1000) / 10),
        })
    })
}

/// One GPU with its context, its stream, its compiled kernels and its cuBLAS handle.
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    arch: String,
    nvrtc_version: (i32, i32),
    cache: PtxCache,
    modules: Mutex<HashMap<Family, Arc<CudaModule>>>,
    functions: Mutex<HashMap<KernelId, CudaFunction>>,
    records: Mutex<Vec<CompileRecord>>,
    blas: Mutex<Option<Arc<CudaBlas>>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("info", &self.info).field("arch", &self.arch).finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves a map that is still consistent (inserts
    // are single calls), so a poisoned lock is safe to keep using.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Device {
    /// Opens device `ordinal` with the PTX cache from the environment ([`PtxCache::from_env`]).
    /// Fails with a typed error when the driver, the device, NVRTC or cuBLAS is missing.
    pub fn open(ordinal: usize) -> Result<Device, GpuError> {
        Device::open_with_cache(ordinal, PtxCache::from_env())
    }

    /// Opens device `ordinal` with the given PTX cache.
    pub fn open_with_cache(ordinal: usize, cache: PtxCache) -> Result<Device, GpuError> {
        let info = probe_ordinal(ordinal)?;
        require_nvrtc()?;
        require_cublas()?;
        let nvrtc_version = nvrtc_version()?;
        no_panic("Device::open", || {
            let ctx = CudaContext::new(ordinal).map_err(GpuError::driver("CudaContext::new"))?;
            // SAFETY: nothing has been allocated in this context object yet, and every buffer
            // this Device allocates and every kernel it launches uses `stream` alone, so the
            // stream orders all accesses and cudarc's cross-stream events are not needed.
            // Buffers from elsewhere are refused (GpuError::ForeignBuffer).
            unsafe { ctx.disable_event_tracking() };
            let stream = ctx.new_stream().map_err(GpuError::driver("cuStreamCreate"))?;
            let (major, minor) = info.compute_capability;
            Ok(Device {
                arch: arch_for(major, minor),
                ctx,
                stream,
                info,
                nvrtc_version,
                cache,
                modules: Mutex::new(HashMap::new()),
                functions: Mutex::new(HashMap::new()),
                records: Mutex::new(Vec::new()),
                blas: Mutex::new(None),
            })
        })
    }

    /// What the probe read.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The NVRTC target, e.g. `compute_90`.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The loaded NVRTC's (major, minor) version.
    pub fn nvrtc_version(&self) -> (i32, i32) {
        self.nvrtc_version
    }

    /// The cudarc context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The one stream all of this device's work runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for all work on the stream; reports errors from earlier asynchronous launches.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        self.stream.synchronize().map_err(GpuError::driver("cuStreamSynchronize"))
    }

    /// (free, total) device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize), GpuError> {
        self.ctx.mem_get_info().map_err(GpuError::driver("cuMemGetInfo"))
    }

    /// How each family's PTX was obtained so far (compiled or from the cache).
    pub fn compile_records(&self) -> Vec<CompileRecord> {
        lock(&self.records).clone()
    }

    /// The module of one family: compiled (or read from the cache) and loaded on first use,
    /// then kept for the life of the device.
    pub fn module(&self, family: Family) -> Result<Arc<CudaModule>, GpuError> {
        let mut modules = lock(&self.modules);
        if let Some(m) = modules.get(&family) {
            return Ok(m.clone());
        }
        let (ptx, record) = compile_family(family, &self.arch, &self.cache)?;
        let module = self
            .ctx
            .load_module(Ptx::from_src(ptx))
            .map_err(|source| GpuError::Load { what: family.file_name().to_string(), source })?;
        lock(&self.records).push(record);
        modules.insert(family, module.clone());
        Ok(module)
    }

    /// Compiles and loads every family now, instead of on first use.
    pub fn load_all(&self) -> Result<(), GpuError> {
        for family in Family::ALL {
            self.module(family)?;
        }
        Ok(())
    }

    /// A kernel's function handle (its family is loaded on first use).
    pub fn function(&self, id: KernelId) -> Result<CudaFunction, GpuError> {
        if let Some(f) = lock(&self.functions).get(&id) {
            return Ok(f.clone());
        }
        let module = self.module(id.family())?;
        let f = module
            .load_function(id.name())
            .map_err(|source| GpuError::Load { what: id.name().to_string(), source })?;
        lock(&self.functions).insert(id, f.clone());
        Ok(f)
    }

    /// The cuBLAS handle, bound to this device's stream (created on first use).
    pub fn blas(&self) -> Result<Arc<CudaBlas>, GpuError> {
        let mut blas = lock(&self.blas);
        if let Some(b) = blas.as_ref() {
            return Ok(b.clone());
        }
        let b = no_panic("cublasCreate", || {
            CudaBlas::new(self.stream.clone()).map_err(GpuError::cublas("cublasCreate"))
        })?;
        let b = Arc::new(b);
        *blas = Some(b.clone());
        Ok(b)
    }

    /// An event that records time (cudarc's default events do not).
    pub fn timing_event(&self) -> Result<CudaEvent, GpuError> {
        self.ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(GpuError::driver("cuEventCreate"))
    }

    /// A zero-filled buffer of `len` elements on this device's stream.
    pub fn alloc_zeros<T: Dtype>(&self, len: usize) -> Result<CudaSlice<T>, GpuError> {
        self.stream.alloc_zeros(len).map_err(GpuError::driver("alloc_zeros"))
    }

    /// A zero-filled index buffer (i32) on this device's stream.
    pub fn alloc_zeros_i32(&self, len: usize) -> Result<CudaSlice<i32>, GpuError> {
        self.stream.alloc_zeros(len).map_err(GpuError::driver("alloc_zeros"))
    }

    /// Copies host values to a new buffer.
    pub fn upload<T: Dtype>(&self, host: &[T]) -> Result<CudaSlice<T>, GpuError> {
        self.stream.clone_htod(host).map_err(GpuError::driver("memcpy htod"))
    }

    /// Copies host indices to a new buffer.
    pub fn upload_i32(&self, host: &[i32]) -> Result<CudaSlice<i32>, GpuError> {
        self.stream.clone_htod(host).map_err(GpuError::driver("memcpy htod"))
    }

    /// Copies host values into an existing buffer of the same length.
    pub fn upload_into<T: Dtype>(&self, host: &[T], dst: &mut CudaSlice<T>) -> Result<(), GpuError> {
        self.check_owned("upload_into", "dst", dst)?;
        if host.len() != dst.len() {
            return Err(GpuError::Shape { op: "upload_into", what: "host", expected: dst.len(), got: host.len() });
        }
        self.stream.memcpy_htod(host, dst).map_err(GpuError::driver("memcpy htod"))
    }

    /// Copies a buffer back to the host (waits for the stream).
    pub fn download<T: Dtype>(&self, src: &CudaSlice<T>) -> Result<Vec<T>, GpuError> {
        self.check_owned("download", "src", src)?;
        let host = self.stream.clone_dtoh(src).map_err(GpuError::driver("memcpy dtoh"))?;
        // A copy into pageable memory already waits for the stream; the explicit sync makes
        // that a guarantee here and reports errors of earlier launches against this call.
        self.synchronize()?;
        Ok(host)
    }

    /// Refuses buffers that live on another stream (and so another device or context): the
    /// stream is what orders this device's work (see the module docs).
    pub(crate) fn check_owned<T>(&self, op: &'static str, what: &'static str, s: &CudaSlice<T>) -> Result<(), GpuError> {
        if Arc::ptr_eq(s.stream(), &self.stream) {
            Ok(())
        } else {
            Err(GpuError::ForeignBuffer { op, what })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_never_panics() {
        // On a machine without CUDA this is an error that says so; with CUDA, a device.
        match probe() {
            Ok(info) => assert!(info.device_count > 0),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
        let _ = library_report();
        let _ = probe_ordinal(1_000);
    }
}
