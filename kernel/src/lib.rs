//! moelab-kernel: a Jupyter kernel for Rust built on the evcxr library, with moelab
//! preloaded (`use moelab::notebook::{DataFrame, Experiment, FrameDisplay, Runs}`), and a `%%experiment` cell magic
//! that runs a TOML spec in the kernel process without compiling Rust.
//!
//! Layers, outside in: [`server`] (ZeroMQ sockets, signature checks, the requests that need
//! no evaluation) -> [`engine`] (one thread that runs cells in order) -> [`evaluator`] (evcxr)
//! and [`experiment`] (the magic). [`wire`] is the message format and HMAC signing,
//! [`outbox`] the single queue every outgoing message passes through.

pub mod cells;
pub mod connection;
pub mod engine;
pub mod evaluator;
pub mod experiment;
pub mod history;
pub mod install;
pub mod outbox;
pub mod server;
pub mod wire;
pub mod workdir;
