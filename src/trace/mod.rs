//! The one trace format every backend produces: timed op events per rank and stream, and
//! memory events per rank and category. Times are nanoseconds since the run's epoch.

pub mod chrome;
pub mod chrome_import;

use crate::taxonomy::{MemCategory, Pass, Stage, Stream};
use serde::{Deserialize, Serialize};

/// One executed op.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpEvent {
    /// Global rank.
    pub rank: u32,
    /// Measured step index (0-based; warmup steps are not traced).
    pub step: u32,
    /// Stream the op ran on.
    pub stream: Stream,
    /// What the op does.
    pub stage: Stage,
    /// Forward, backward or update.
    pub pass: Pass,
    /// The op's name in the plan, e.g. `L0.expert_gemm1`.
    pub name: String,
    /// MoE block index, when the op belongs to one.
    pub layer: Option<u32>,
    /// Pipelining chunk, when the op belongs to one.
    pub chunk: Option<u32>,
    /// Start, ns since the run epoch.
    pub start_ns: u64,
    /// End, ns since the run epoch.
    pub end_ns: u64,
    /// Floating-point operations the op performs.
    pub flops: u64,
    /// Bytes the op moves (memory traffic, or bytes sent for collectives).
    pub bytes: u64,
    /// The collective this op is, when it is one on a single process group: the events of
    /// the group's members with the same reference and step are one collective.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collective: Option<CollectiveRef>,
    /// Host time inside the span: from the op's first synchronising copy back from the
    /// device to the end of its host work (routing tables, row maps), while the stream waits
    /// on the host. `None` for ops without host work and for backends that have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ns: Option<u64>,
    /// Host time spent issuing the op: its launches, allocations, host work, and the wait in
    /// its first synchronising copy for the device to catch up. An op with no synchronising
    /// copy whose issue time nears its span waited on the host. `None` where nothing is
    /// issued ahead of a device (cpu, sim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issue_ns: Option<u64>,
    /// cuBLAS GEMM calls the op made (the cuda backend; `None` for ops without GEMMs and for
    /// other backends): shows, e.g., whether a dropless expert op ran one GEMM per expert or
    /// one batched GEMM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gemm_calls: Option<u32>,
}

/// One collective of a process group: the group (index into the plan's groups) and its
/// position among that group's collectives in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CollectiveRef {
    /// Process group.
    pub group: u32,
    /// Position among the group's collectives, from 0 in each step.
    pub seq: u32,
}

impl OpEvent {
    /// Duration in ns.
    pub fn dur_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }
}

/// Memory in use on one rank for one category changed to `bytes_in_use`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemEvent {
    /// Global rank.
    pub rank: u32,
    /// When, ns since the run epoch.
    pub t_ns: u64,
    /// Which category changed.
    pub category: MemCategory,
    /// Signed change in bytes.
    pub delta: i64,
}

/// Span of one measured step on one rank.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepSpan {
    /// Global rank.
    pub rank: u32,
    /// Measured step index.
    pub step: u32,
    /// Start, ns since the run epoch.
    pub start_ns: u64,
    /// End, ns since the run epoch.
    pub end_ns: u64,
}

/// Everything a backend measured in one run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// Backend name (`cpu`, `cuda`, `sim`).
    pub backend: String,
    /// Number of ranks.
    pub world: u32,
    /// Op events, any order.
    pub ops: Vec<OpEvent>,
    /// Memory events in time order per rank, from the start of the run (params included).
    pub memory: Vec<MemEvent>,
    /// Measured steps per rank.
    pub steps: Vec<StepSpan>,
    /// Members of each of the plan's process groups (index = [`CollectiveRef::group`]), for
    /// lining up a collective's events across ranks; empty in traces that predate it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub group_sizes: Vec<u32>,
}
