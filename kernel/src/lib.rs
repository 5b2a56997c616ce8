//! moelab-kernel: the Jupyter kernel for Rust built on evcxr, with moelab preloaded.
//!
//! Empty for now: it will speak the Jupyter messaging protocol and expose `moelab::run`
//! and `moelab::analysis` to notebook cells.
