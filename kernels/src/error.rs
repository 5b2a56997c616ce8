//! The crate's one error type. Every variant names what failed and, where a library or device
//! is missing, how to fix it: these messages are what a user sees first on a new machine.

use cudarc::cublas::result::CublasError;
use cudarc::driver::DriverError;

/// The folder with CUDA 13.0's libraries on the device machines.
pub const CUDA_LIB_DIR_HINT: &str = "/usr/local/cuda-13.0/targets/x86_64-linux/lib";

/// Everything that can go wrong between probing for CUDA and reading a kernel's result.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// libcuda (the driver API, shipped with the NVIDIA driver) could not be loaded.
    #[error(
        "CUDA driver library not found (searched {searched:?}): install the NVIDIA driver, or add the \
         folder holding libcuda.so.1 (e.g. /usr/lib/x86_64-linux-gnu or /usr/local/nvidia/lib64) to LD_LIBRARY_PATH"
    )]
    DriverLibraryMissing {
        /// The library names that were tried.
        searched: Vec<String>,
    },
    /// The driver loaded but reports no usable device.
    #[error(
        "no CUDA device: {detail}; check `nvidia-smi`, and that CUDA_VISIBLE_DEVICES does not hide every GPU"
    )]
    NoDevice {
        /// What the driver said.
        detail: String,
    },
    /// The requested ordinal is past the visible devices.
    #[error("CUDA device {ordinal} does not exist: {count} device(s) visible")]
    BadOrdinal {
        /// The ordinal asked for.
        ordinal: usize,
        /// Devices the driver reports.
        count: usize,
    },
    /// libnvrtc (runtime compilation of the kernels) could not be loaded.
    #[error(
        "NVRTC not found (searched {searched:?}): add the CUDA toolkit's lib folder (on the device machines \
         {CUDA_LIB_DIR_HINT}) to LD_LIBRARY_PATH, or install the nvidia-cuda-nvrtc package for CUDA 13"
    )]
    NvrtcMissing {
        /// The library names that were tried.
        searched: Vec<String>,
    },
    /// libcublas or libcublasLt could not be loaded.
    #[error(
        "cuBLAS library {lib} not found (searched {searched:?}): add the CUDA toolkit's lib folder (on the \
         device machines {CUDA_LIB_DIR_HINT}) to LD_LIBRARY_PATH"
    )]
    CublasMissing {
        /// Which of cublas / cublasLt is missing.
        lib: &'static str,
        /// The library names that were tried.
        searched: Vec<String>,
    },
    /// No NCCL library at all.
    #[error(
        "NCCL not found (searched {searched:?} and libnccl.so.2): install NCCL (libnccl2) and add its folder \
         to LD_LIBRARY_PATH"
    )]
    NcclMissing {
        /// The library names that were tried.
        searched: Vec<String>,
    },
    /// NCCL is installed only as `libnccl.so.2`, a name cudarc does not try.
    #[error(
        "NCCL is installed as {found} but cudarc only loads libnccl.so (or libnccl.so.<cuda major>); fix: \
         `mkdir -p /tmp/moelab-lib && ln -sf {found} /tmp/moelab-lib/libnccl.so` and put /tmp/moelab-lib on LD_LIBRARY_PATH"
    )]
    NcclUnversionedLinkMissing {
        /// The versioned library that does load.
        found: String,
    },
    /// A CUDA driver API call failed.
    #[error("CUDA driver call failed in {op}: {source}")]
    Driver {
        /// The operation that failed.
        op: &'static str,
        /// The driver's error.
        #[source]
        source: DriverError,
    },
    /// NVRTC rejected a kernel family's source.
    #[error("NVRTC failed to compile {family} for {arch}: {log}")]
    Compile {
        /// The .cu file.
        family: &'static str,
        /// The target, e.g. compute_90.
        arch: String,
        /// The compiler's log or error.
        log: String,
    },
    /// Loading a compiled module or one of its kernels failed.
    #[error("loading {what}: {source}")]
    Load {
        /// The module or kernel name.
        what: String,
        /// The driver's error.
        #[source]
        source: DriverError,
    },
    /// A kernel launch was rejected.
    #[error("launching kernel {kernel}: {source}")]
    Launch {
        /// The kernel name, `{op}_{dtype}`.
        kernel: &'static str,
        /// The driver's error.
        #[source]
        source: DriverError,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS {op}: {source}")]
    Cublas {
        /// The operation that failed.
        op: &'static str,
        /// cuBLAS's status.
        #[source]
        source: CublasError,
    },
    /// A cuBLASLt call failed.
    #[error("cuBLASLt {op}: {source}")]
    CublasLt {
        /// The operation that failed.
        op: &'static str,
        /// cuBLASLt's status.
        #[source]
        source: cudarc::cublaslt::result::CublasError,
    },
    /// An NCCL call failed (NCCL's status, as its enum name).
    #[error("NCCL {op}: {status}")]
    Nccl {
        /// The operation that failed.
        op: &'static str,
        /// The status NCCL returned.
        status: String,
    },
    /// A buffer's length does not match the shape given.
    #[error("{op}: {what} has {got} elements, expected {expected}")]
    Shape {
        /// The operation.
        op: &'static str,
        /// Which argument.
        what: &'static str,
        /// Elements the shape implies.
        expected: usize,
        /// Elements the buffer holds.
        got: usize,
    },
    /// A size does not fit the kernel's or library's integer parameters.
    #[error("{op}: {what} = {value} exceeds the limit {limit}")]
    TooLarge {
        /// The operation.
        op: &'static str,
        /// Which size.
        what: &'static str,
        /// The size given.
        value: usize,
        /// The largest size accepted.
        limit: usize,
    },
    /// A buffer was allocated on another device or stream than the one asked to use it.
    #[error("{op}: buffer {what} belongs to another device or stream")]
    ForeignBuffer {
        /// The operation.
        op: &'static str,
        /// Which argument.
        what: &'static str,
    },
    /// cudarc panicked (a missing library or symbol it could not report as an error).
    #[error("cudarc panicked in {op}: {message}")]
    Panicked {
        /// The operation.
        op: &'static str,
        /// The panic message.
        message: String,
    },
}

impl GpuError {
    /// Wraps a driver error with the operation it came from.
    pub fn driver(op: &'static str) -> impl FnOnce(DriverError) -> GpuError {
        move |source| GpuError::Driver { op, source }
    }

    /// Wraps a cuBLAS error with the operation it came from.
    pub fn cublas(op: &'static str) -> impl FnOnce(CublasError) -> GpuError {
        move |source| GpuError::Cublas { op, source }
    }

    /// Wraps a cuBLASLt error with the operation it came from.
    pub fn cublaslt(op: &'static str) -> impl FnOnce(cudarc::cublaslt::result::CublasError) -> GpuError {
        move |source| GpuError::CublasLt { op, source }
    }

    /// True when the error says that CUDA is absent from this machine (no driver library or no
    /// device), as opposed to a present but broken or misconfigured installation.
    pub fn is_absent(&self) -> bool {
        matches!(self, GpuError::DriverLibraryMissing { .. } | GpuError::NoDevice { .. })
    }
}

/// Runs `f`, turning a panic inside cudarc into [`GpuError::Panicked`]. A last resort: the
/// library checks in `device` should catch missing libraries before cudarc panics on them.
pub fn no_panic<T>(op: &'static str, f: impl FnOnce() -> Result<T, GpuError>) -> Result<T, GpuError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(GpuError::Panicked { op, message })
        }
    }
}
