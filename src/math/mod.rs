//! The cpu backend's numerics: pure functions on row-major f32 slices, each with its
//! hand-written backward. Shapes are given in the doc comments as `[rows, cols]`.

pub mod activation;
pub mod attention;
pub mod bf16;
pub mod linalg;
pub mod norm;
pub mod rng;
pub mod routing;
