//! moelab-kernels: the device layer of moelab's `cuda` backend, on cudarc.
//!
//! - [`device`]: finding CUDA ([`probe`], never panics) and opening a [`Device`] (one context,
//!   one stream), with a typed [`GpuError`] that says what is missing and how to fix it.
//! - [`nvrtc`]: the kernel registry ([`KernelId`], one `.cu` file per op family under
//!   `kernels/cu/`) and its NVRTC compiler with an on-disk PTX cache.
//! - [`ops`]: launchers for the kernels (gating softmax, GELU, LayerNorm, row permute and
//!   combine), bf16 or f32 storage with f32 arithmetic, semantics of `moelab::math`.
//! - [`gemm`]: row-major GEMM in three forms (`nn`, `tn`, `nt`) through cuBLAS.
//!
//! The crate builds and its tests pass on machines with no CUDA at all: every CUDA library is
//! loaded at run time (cudarc's `dynamic-loading`), and absence is an error, not a panic.
//! It does not depend on moelab: the root crate depends on it, and its `backend::cuda` module
//! executes plans with these launchers and checks them against the cpu reference.

#![warn(missing_docs)]

pub mod device;
pub mod dtype;
pub mod error;
pub mod gemm;
pub mod grouped;
pub mod lt_gemm;
pub mod nvrtc;
pub mod ops;

pub use device::{probe, probe_ordinal, Device, DeviceInfo};
pub use dtype::{DType, Dtype};
pub use error::GpuError;
pub use gemm::{GemmDims, GemmForm};
pub use nvrtc::{Family, KernelId, PtxCache};
