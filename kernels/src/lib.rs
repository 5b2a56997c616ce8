//! moelab-kernels: the CUDA C sources (gating, permute, combine, activation, layernorm,
//! attention softmax) and the cudarc device layer of the `cuda` backend.
//!
//! Empty for now: the cuda backend is its own piece of work and lands here, so that CUDA
//! code and its build stay out of the root crate (which builds and tests with no GPU).
