//! moelab: a research workbench for distributed Mixture-of-Experts training.
//!
//! The path is experiment spec ([`spec`]) -> per-rank op graph ([`plan`]) -> executor
//! ([`backend`]) -> timed events ([`trace`]) -> tables and overlap figures ([`analysis`]).

pub mod analysis;
pub mod spec;
pub mod taxonomy;
pub mod trace;
pub mod math;
pub mod plan;
pub mod backend;
pub mod run;
pub mod notebook;
