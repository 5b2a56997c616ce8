//! Plans: for each rank, a graph of ops on streams with dependencies, FLOPs, bytes and
//! memory effects. Variants are plan builders ([`builders`]); backends execute [`OpKind`]s
//! without knowing which paper a plan came from.

pub mod builders;
mod graph;
pub mod memory;
pub mod ops;
pub mod precision;

pub use graph::RankBuilder;
pub use ops::{AttnDims, OpKind};

use crate::spec::ExperimentSpec;
use crate::taxonomy::{MemCategory, Pass, Stage, Stream};
use serde::Serialize;

/// Index of a buffer in its rank's [`RankPlan::buffers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct BufId(pub u32);

/// Index of an op in its rank's [`RankPlan::ops`] (also its position in issue order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct OpId(pub u32);

/// Index of a process group in [`Plan::groups`]; the same id on every member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct GroupId(pub u32);

/// Element type of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ElemType {
    /// Values.
    F32,
    /// Indices and counts.
    I32,
}

/// A tensor the plan allocates on one rank.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BufferDesc {
    /// Readable name, e.g. `L0.moe.send`.
    pub name: String,
    /// Elements; an upper bound when `dynamic`.
    pub elems: usize,
    /// Element type.
    pub elem: ElemType,
    /// Bytes per element on the device.
    pub elem_bytes: usize,
    /// Memory category.
    pub category: MemCategory,
    /// Lives for the whole run (params, grads, optimizer state).
    pub persistent: bool,
    /// Size depends on routing (dropless); `elems` is then an upper bound.
    pub dynamic: bool,
}

impl BufferDesc {
    /// Stored as bf16 (a value buffer two bytes wide; see [`precision`]).
    pub fn is_bf16(&self) -> bool {
        precision::is_bf16(self)
    }
    /// Planned bytes (an upper bound for dynamic buffers).
    pub fn bytes(&self) -> u64 {
        (self.elems * self.elem_bytes) as u64
    }
}

/// How a parameter is initialised: a deterministic stream per (tag, layer, expert), so any
/// layout draws the same global weights.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParamInit {
    /// Stream tag, e.g. `attn.wqkv`.
    pub tag: String,
    /// Layer index.
    pub layer: u32,
    /// For expert weights: the first global expert this buffer holds and how many; each
    /// expert is a contiguous slice drawn from its own stream.
    pub experts: Option<(u32, u32)>,
    /// Mean (1 for LayerNorm gains).
    pub mean: f32,
    /// Standard deviation.
    pub std: f32,
}

/// A trainable tensor and its companions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParamDesc {
    /// The weights.
    pub value: BufId,
    /// Gradient (training only).
    pub grad: Option<BufId>,
    /// Adam first and second moments (training only).
    pub moments: Option<(BufId, BufId)>,
    /// Initialisation.
    pub init: ParamInit,
    /// Expert weights are reduced over the expert-data-parallel group, others over all ranks.
    pub expert: bool,
    /// A tensor-parallel slice: each drawn tensor (per expert) is cut to the kept part.
    /// `None`: the whole tensor, as drawn.
    pub slice: Option<ParamSlice>,
    /// The bf16 shadow of the weights that GEMMs read in bf16 plans (persistent, Params);
    /// refreshed from the f32 master by Adam. `None` in f32 plans ([`precision`]).
    pub half: Option<BufId>,
}

/// Which part of a drawn tensor a rank holds: the tensor (each expert's, for expert
/// weights) is drawn whole from its stream, viewed as `[rows, cols]`, and columns
/// `[keep.0, keep.1)` of every row are kept (row-major), so slices of all ranks together
/// equal the unsliced run's weights. A row range of `[R, C]` is columns `[r0*C, r1*C)` of `[1, R*C]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ParamSlice {
    /// Rows of the drawn tensor.
    pub rows: usize,
    /// Columns of the drawn tensor.
    pub cols: usize,
    /// Kept columns, `[start, end)`.
    pub keep: (usize, usize),
}

impl ParamSlice {
    /// Elements of the whole drawn tensor.
    pub fn full_len(&self) -> usize {
        self.rows * self.cols
    }
    /// The kept part of `full` (`[rows, cols]`), appended to `out`.
    pub fn take(&self, full: &[f32], out: &mut Vec<f32>) {
        for r in full.chunks_exact(self.cols) {
            out.extend_from_slice(&r[self.keep.0..self.keep.1]);
        }
    }
}

/// One op on one rank.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Op {
    /// Position in the rank's op list.
    pub id: OpId,
    /// Readable name, e.g. `L1.expert_gemm1`.
    pub name: String,
    /// What it does.
    pub stage: Stage,
    /// Forward, backward or update.
    pub pass: Pass,
    /// Compute or comm.
    pub stream: Stream,
    /// MoE block, if any.
    pub layer: Option<u32>,
    /// Pipelining chunk, if any.
    pub chunk: Option<u32>,
    /// Ops that must finish first (the last writers of what it reads, across streams).
    pub deps: Vec<OpId>,
    /// The semantics the backend executes.
    pub kind: OpKind,
    /// Buffers read.
    pub reads: Vec<BufId>,
    /// Buffers written (allocated on first write).
    pub writes: Vec<BufId>,
    /// Buffers released after this op (their last use).
    pub frees: Vec<BufId>,
    /// Floating-point operations.
    pub flops: u64,
    /// Bytes moved through memory, or sent for collectives (upper bound when dynamic).
    pub bytes: u64,
    /// For a collective on one process group: which of the group's collectives it is (every
    /// member issues them in the same order), so a trace can line up its members' events.
    pub collective: Option<crate::trace::CollectiveRef>,
}

/// Which ranks a collective spans.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Group {
    /// What the group is for, e.g. `world`, `ep0`, `edp1`.
    pub name: String,
    /// Global ranks, in the group's rank order.
    pub ranks: Vec<u32>,
}

/// The ops, buffers and parameters of one rank for one training or inference step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankPlan {
    /// Global rank.
    pub rank: u32,
    /// Every buffer the rank uses.
    pub buffers: Vec<BufferDesc>,
    /// Ops in issue order (a valid topological order).
    pub ops: Vec<Op>,
    /// Trainable tensors.
    pub params: Vec<ParamDesc>,
}

/// A whole experiment's plan: one [`RankPlan`] per rank plus the process groups.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// The resolved spec it was built from.
    pub spec: ExperimentSpec,
    /// Process groups referenced by collectives.
    pub groups: Vec<Group>,
    /// Per-rank plans, index = rank.
    pub ranks: Vec<RankPlan>,
}

impl Plan {
    /// Build the plan for a validated spec with its variant's builder.
    pub fn build(spec: &ExperimentSpec) -> Result<Plan, builders::PlanError> {
        builders::build(spec)
    }
    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.ranks.len()
    }
    /// Members of each process group, index = group id (what a trace needs to line up a
    /// collective's events).
    pub fn group_sizes(&self) -> Vec<u32> {
        self.groups.iter().map(|g| g.ranks.len() as u32).collect()
    }
    /// Total ops over all ranks.
    pub fn op_count(&self) -> usize {
        self.ranks.iter().map(|r| r.ops.len()).sum()
    }
}

impl RankPlan {
    /// Find a buffer by name.
    pub fn buffer_id(&self, name: &str) -> Option<BufId> {
        self.buffers.iter().position(|b| b.name == name).map(|i| BufId(i as u32))
    }
    /// The descriptor of a buffer.
    pub fn buffer(&self, id: BufId) -> &BufferDesc {
        &self.buffers[id.0 as usize]
    }
    /// Find an op by name, e.g. `L0.dispatch_a2a`.
    pub fn op_named(&self, name: &str) -> Option<&Op> {
        self.ops.iter().find(|o| o.name == name)
    }
    /// Whether op `later` waits for op `earlier` through any chain of dependencies: when it
    /// does not, a backend may run them at the same time on different streams.
    pub fn depends_on(&self, later: OpId, earlier: OpId) -> bool {
        let mut seen = vec![false; self.ops.len()];
        let mut stack = vec![later];
        while let Some(o) = stack.pop() {
            if o == earlier {
                return true;
            }
            for d in &self.ops[o.0 as usize].deps {
                if !seen[d.0 as usize] {
                    seen[d.0 as usize] = true;
                    stack.push(*d);
                }
            }
        }
        false
    }
}
