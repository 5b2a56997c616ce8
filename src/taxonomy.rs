//! The closed vocabularies shared by plans, backends, traces and analysis: stages, passes,
//! streams and memory categories. Types, not strings, so a typo cannot invent a stage.

use serde::{Deserialize, Serialize};
use std::fmt;

/// What an op does, at the granularity researchers reason about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Making or loading the step's input batch.
    Data,
    /// LayerNorm.
    Layernorm,
    /// Self-attention (projections, scores, softmax, context).
    Attention,
    /// The dense MLP of the backbone.
    DenseMlp,
    /// Gate projection: logits = X * Wg.
    Gate,
    /// Softmax, top-k choice, expert counts and the load-balancing loss.
    Topk,
    /// Positions, capacity and scatter of token rows into the dispatch layout.
    Permute,
    /// The first expert GEMM (fc1).
    ExpertGemm1,
    /// The expert activation.
    Act,
    /// The second expert GEMM (fc2).
    ExpertGemm2,
    /// Gather back, multiply by gate weights, sum over the k choices.
    Combine,
    /// The training loss.
    Loss,
    /// All-to-all (possibly with per-peer counts).
    AllToAll,
    /// All-reduce.
    AllReduce,
    /// All-gather.
    AllGather,
    /// Reduce-scatter.
    ReduceScatter,
    /// Adam update.
    Optimizer,
    /// Pipeline point-to-point exchange with a neighbouring stage (activations forward,
    /// their gradients backward).
    SendRecv,
    /// Adding a micro-batch's weight gradients into the step's gradients.
    GradAccum,
}

impl Stage {
    /// Every stage, in pipeline order.
    pub const ALL: [Stage; 19] = [
        Stage::Data, Stage::Layernorm, Stage::Attention, Stage::DenseMlp, Stage::Gate, Stage::Topk,
        Stage::Permute, Stage::ExpertGemm1, Stage::Act, Stage::ExpertGemm2, Stage::Combine,
        Stage::Loss, Stage::AllToAll, Stage::AllReduce, Stage::AllGather, Stage::ReduceScatter,
        Stage::Optimizer, Stage::SendRecv, Stage::GradAccum,
    ];
    /// Whether the stage is communication (a collective or a point-to-point exchange; runs on
    /// the communication stream).
    pub fn is_comm(self) -> bool {
        matches!(self, Stage::AllToAll | Stage::AllReduce | Stage::AllGather | Stage::ReduceScatter | Stage::SendRecv)
    }
    /// snake_case name, as in TOML and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Data => "data",
            Stage::Layernorm => "layernorm",
            Stage::Attention => "attention",
            Stage::DenseMlp => "dense_mlp",
            Stage::Gate => "gate",
            Stage::Topk => "topk",
            Stage::Permute => "permute",
            Stage::ExpertGemm1 => "expert_gemm1",
            Stage::Act => "act",
            Stage::ExpertGemm2 => "expert_gemm2",
            Stage::Combine => "combine",
            Stage::Loss => "loss",
            Stage::AllToAll => "all_to_all",
            Stage::AllReduce => "all_reduce",
            Stage::AllGather => "all_gather",
            Stage::ReduceScatter => "reduce_scatter",
            Stage::Optimizer => "optimizer",
            Stage::SendRecv => "send_recv",
            Stage::GradAccum => "grad_accum",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Forward or backward (the optimizer counts as backward's tail: `Update`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pass {
    /// Forward.
    Forward,
    /// Backward.
    Backward,
    /// Gradient reduction and optimizer step.
    Update,
}

impl Pass {
    /// Suffix used in stage labels: "", "_bwd", "_upd".
    pub fn suffix(self) -> &'static str {
        match self {
            Pass::Forward => "",
            Pass::Backward => "_bwd",
            Pass::Update => "_upd",
        }
    }
}

/// A stage in a pass, labelled like `expert_gemm1_bwd`.
pub fn stage_label(stage: Stage, pass: Pass) -> String {
    format!("{}{}", stage.as_str(), pass.suffix())
}

/// An execution queue on one rank. Ops on one stream run in order; streams run concurrently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// Kernels: GEMMs, elementwise, routing.
    Compute,
    /// Collectives.
    Comm,
}

impl Stream {
    /// Name for traces.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Compute => "compute",
            Stream::Comm => "comm",
        }
    }
    /// Stable small integer (Chrome trace thread id).
    pub fn index(self) -> u32 {
        match self {
            Stream::Compute => 0,
            Stream::Comm => 1,
        }
    }
}

/// What a piece of device memory holds, for the memory breakdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemCategory {
    /// Weights (dense and expert).
    Params,
    /// Gradients of the weights.
    Grads,
    /// Adam moments.
    OptimizerState,
    /// The step's input batch and targets.
    Inputs,
    /// Tensors saved for backward or passed between ops.
    Activations,
    /// Scratch freed within the op's pass.
    Temporaries,
    /// Send/receive buffers of collectives.
    CommBuffers,
}

impl MemCategory {
    /// Every category, in table order.
    pub const ALL: [MemCategory; 7] = [
        MemCategory::Params, MemCategory::Grads, MemCategory::OptimizerState, MemCategory::Inputs,
        MemCategory::Activations, MemCategory::Temporaries, MemCategory::CommBuffers,
    ];
    /// snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            MemCategory::Params => "params",
            MemCategory::Grads => "grads",
            MemCategory::OptimizerState => "optimizer_state",
            MemCategory::Inputs => "inputs",
            MemCategory::Activations => "activations",
            MemCategory::Temporaries => "temporaries",
            MemCategory::CommBuffers => "comm_buffers",
        }
    }
    /// Position in [`MemCategory::ALL`].
    pub fn index(self) -> usize {
        MemCategory::ALL.iter().position(|c| *c == self).expect("listed")
    }
}

impl fmt::Display for MemCategory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
