//! moelab-workbench: the terminal workbench for moelab. Compose an experiment with live
//! validation and predicted memory, run it on a background thread, read its timeline per
//! rank and stream, its stage/overlap/memory breakdowns, and compare two runs.
//!
//! State ([`app`], [`composer`], [`jobs`], [`timeline`], [`runs`]), events ([`event`]) and
//! rendering ([`ui`]) are kept apart: [`app::App::update`] is the only transition and the
//! renderers only read. The crate depends on `moelab`, never the reverse; `moelab
//! workbench` starts this crate's binary.

pub mod app;
pub mod compare;
pub mod composer;
pub mod error;
pub mod event;
pub mod jobs;
pub mod loaded;
pub mod runs;
pub mod timeline;
pub mod ui;
pub mod units;

pub use app::{App, Pane};
pub use error::WorkbenchError;
