//! The `cuda` backend: executes plans on NVIDIA GPUs through the device layer in
//! `moelab-kernels` (NVRTC, cuBLAS, NCCL via cudarc, loaded at run time), one worker process
//! per GPU.
//!
//! - [`launch`]: starts one worker per rank, bootstraps NCCL, merges progress and traces;
//!   under torchrun/srun runs this process's rank and gathers on rank 0.
//! - [`external`]: reads torchrun's and srun's rank variables.
//! - [`rendezvous`]: rank 0's TCP rendezvous (NCCL id, spec hash) and the gathering sockets.
//! - [`rank`]: one rank's plan on one GPU: a host thread and a CUDA stream per plan stream,
//!   cross-stream dependencies as events, every op timed with CUDA events.
//! - [`exec`]: one op on one stream (kernels of `plan_ops.cu`, cuBLAS, NCCL; routing and the
//!   expert layouts on the device, from the row blocks the cpu implementation defines).
//! - [`store`]: device buffers tagged with the plan's memory categories.
//! - [`comm`]: NCCL communicators per plan group.
//! - [`bench`]: `moelab bench`, one bf16 MoE layer forward + backward against a dense GEMM.
//! - [`calibrate`]: `moelab calibrate`, the GEMM, kernel-gap, copy and NCCL sweeps behind a
//!   measured sim profile.
//! - [`check`]: the device layer's conformance suite and dense GEMM benchmark
//!   (`moelab-gpu-check`).

pub mod bench;
pub mod calibrate;
pub mod check;
pub mod comm;
pub mod exec;
pub mod external;
pub mod gpu;
pub mod launch;
pub mod pinned;
pub mod rank;
pub mod rendezvous;
pub mod store;

/// GPUs this process can use (0 without CUDA, a driver or a device); never panics.
pub fn visible_gpus() -> usize {
    match moelab_kernels::probe() {
        Ok(info) => info.device_count,
        Err(_) => 0,
    }
}
