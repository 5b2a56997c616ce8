//! Experiment specs: the serde/TOML description of one run (model, variant, layout, run
//! settings), its defaults, and validation that rejects bad input before any work starts.

mod load;
pub mod overrides;
mod validate;

pub use load::{blame_overrides, from_toml_str, load_file, load_file_with};
pub use validate::{Problem, SpecError};

use serde::{Deserialize, Serialize};

/// One experiment: what model, which MoE design, how it is laid out over ranks, how to run it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSpec {
    /// Short name; used in the run directory name.
    pub name: String,
    /// Free text for the researcher.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// The MoE design; selects the plan builder.
    #[serde(default)]
    pub variant: Variant,
    /// Model sizes and routing settings.
    pub model: ModelSpec,
    /// Parallel degrees.
    #[serde(default)]
    pub layout: LayoutSpec,
    /// Backend, steps, seed and mode.
    #[serde(default)]
    pub run: RunSpec,
    /// MPMoE options (`variant = "mpmoe"` only); filled with defaults on resolution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mpmoe: Option<MpmoeSpec>,
    /// Tutel options (`variant = "tutel"` only); filled with defaults on resolution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tutel: Option<TutelSpec>,
    /// DeepSpeed-TED options (`variant = "ted"` only); filled with defaults on resolution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ted: Option<TedSpec>,
    /// PPMoE options (`variant = "ppmoe"` only); filled with defaults on resolution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ppmoe: Option<PpmoeSpec>,
}

/// PPMoE options: micro-batches and the pipeline schedule of `layout.pp` stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PpmoeSpec {
    /// Micro-batches per step: each data shard's `model.batch` sequences are split into this
    /// many equal micro-batches (it must divide the batch), each routed on its own, with
    /// gradients accumulated over them and one optimizer step. Unset: the smallest divisor of
    /// the batch that is at least `layout.pp` (enough to fill the pipeline), or the batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_batches: Option<usize>,
    /// Order of the micro-batches' forward and backward passes on each stage.
    #[serde(default)]
    pub schedule: PipelineSchedule,
}

impl PpmoeSpec {
    /// Micro-batches after resolution (1 when unresolved).
    pub fn micro(&self) -> usize {
        self.micro_batches.unwrap_or(1)
    }
}

/// A pipeline schedule over micro-batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum PipelineSchedule {
    /// GPipe: every micro-batch's forward, then every backward; each stage keeps the
    /// activations of all micro-batches.
    #[serde(rename = "gpipe")]
    Gpipe,
    /// 1F1B (PipeDream-flush, Megatron): after `pp - stage - 1` warm-up forwards each stage
    /// alternates one forward and one backward, so it keeps at most `pp - stage` micro-batches'
    /// activations; same bubble as GPipe, lower activation memory.
    #[default]
    #[serde(rename = "1f1b")]
    OneFOneB,
}

impl PipelineSchedule {
    /// The spelling used in TOML.
    pub fn as_str(self) -> &'static str {
        match self {
            PipelineSchedule::Gpipe => "gpipe",
            PipelineSchedule::OneFOneB => "1f1b",
        }
    }
}

/// The MoE designs moelab knows. Each is a plan builder; backends never see this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// GShard/Switch top-k gating with all-to-all expert parallelism.
    #[default]
    Topk,
    /// Pipeline MoE: tensor-parallel experts (index slicing and one all-reduce), a
    /// tensor-parallel backbone and pipeline stages over micro-batches.
    Ppmoe,
    /// DeepSpeed-TED: tensor x expert x data parallel with duplicate-token dropping.
    Ted,
    /// Tutel: adaptive parallelism and pipelining degree, 2D hierarchical all-to-all.
    Tutel,
    /// MPMoE: pipelined all-to-all/expert chunks with memory reuse.
    Mpmoe,
    /// ScMoE: shortcut-connected MoE whose all-to-all overlaps the dense branch.
    Scmoe,
    /// DGMoE: dual top-1 gating over the previous and the current representation.
    Dgmoe,
}

impl Variant {
    /// Every variant, in documentation order.
    pub const ALL: [Variant; 7] = [
        Variant::Topk,
        Variant::Ppmoe,
        Variant::Ted,
        Variant::Tutel,
        Variant::Mpmoe,
        Variant::Scmoe,
        Variant::Dgmoe,
    ];
    /// The spelling used in TOML.
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Topk => "topk",
            Variant::Ppmoe => "ppmoe",
            Variant::Ted => "ted",
            Variant::Tutel => "tutel",
            Variant::Mpmoe => "mpmoe",
            Variant::Scmoe => "scmoe",
            Variant::Dgmoe => "dgmoe",
        }
    }
    /// Whether this build has a plan builder for the variant.
    pub fn is_implemented(self) -> bool {
        matches!(self, Variant::Topk | Variant::Mpmoe | Variant::Scmoe | Variant::Dgmoe | Variant::Tutel | Variant::Ted | Variant::Ppmoe)
    }
}

/// MPMoE options: the pipelining degree and the memory-reuse strategy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MpmoeSpec {
    /// Pipelining degree n: the kept rows of every (source rank, expert) block are split into
    /// n chunks, each a full all-to-all, so chunk g+1's communication overlaps chunk g's experts.
    /// `"auto"`: the performance model (`crate::run::mpmoe_auto`) picks n at run start.
    #[serde(default = "default_chunks")]
    pub chunks: Degree,
    /// What backward restores instead of keeping every chunk's expert buffers; `"auto"`: the
    /// performance model picks it at run start.
    #[serde(default)]
    pub reuse: Reuse,
    /// Largest predicted peak memory per rank, in MiB, that an automatic choice may pick
    /// (`chunks` or `reuse` = `"auto"`); unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_budget_mib: Option<f64>,
}

impl MpmoeSpec {
    /// Largest accepted pipelining degree (MPMoE's own search tries 2 to 8).
    pub const MAX_CHUNKS: usize = 64;
}

impl Default for MpmoeSpec {
    fn default() -> Self {
        MpmoeSpec { chunks: default_chunks(), reuse: Reuse::None, memory_budget_mib: None }
    }
}

fn default_chunks() -> Degree {
    Degree::Fixed(2)
}

/// MPMoE memory reuse: which per-chunk expert buffers are released after forward and how
/// backward gets them back. "Dispatched input" is a chunk's expert input `[E_local, R_c, M]`;
/// "middle" is its fc1 output and activation `[E_local, R_c, H]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reuse {
    /// No reuse: every chunk's dispatched input and middle are kept for backward.
    #[default]
    None,
    /// Middle buffers are reused across chunks; backward recomputes fc1 and the activation
    /// from the kept dispatched input.
    Recompute,
    /// Dispatched-input buffers are reused across chunks; backward re-runs the chunk's
    /// dispatch all-to-all (re-communication).
    Recomm,
    /// Both are reused: backward re-communicates the dispatched input, then recomputes the
    /// middle from it.
    ReuseBuffers,
    /// Chosen at run start by MPMoE's performance model among [`Reuse::ALL`]; a plan built
    /// directly from it (outside `run`) keeps everything, as `None`.
    Auto,
}

impl Reuse {
    /// Every strategy, in documentation order.
    pub const ALL: [Reuse; 4] = [Reuse::None, Reuse::Recompute, Reuse::Recomm, Reuse::ReuseBuffers];
    /// The spelling used in TOML.
    pub fn as_str(self) -> &'static str {
        match self {
            Reuse::None => "none",
            Reuse::Recompute => "recompute",
            Reuse::Recomm => "recomm",
            Reuse::ReuseBuffers => "reuse_buffers",
            Reuse::Auto => "auto",
        }
    }
    /// Whether backward re-runs the dispatch all-to-all instead of keeping the expert input.
    pub fn recomm(self) -> bool {
        matches!(self, Reuse::Recomm | Reuse::ReuseBuffers)
    }
    /// Whether backward recomputes fc1 and the activation instead of keeping them.
    pub fn recompute(self) -> bool {
        matches!(self, Reuse::Recompute | Reuse::ReuseBuffers)
    }
}

/// DeepSpeed-TED options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TedSpec {
    /// Duplicate-token dropping: before each all-to-all every tensor-parallel rank keeps only
    /// its 1/tp slice of the rows (the TP ranks hold the same tokens), and an all-gather over
    /// the TP group restores the full set afterwards. Off: every TP rank sends everything.
    #[serde(default = "yes")]
    pub duplicate_dropping: bool,
    /// Activation checkpointing of the MoE layers (DeepSpeed-TED's communication-aware
    /// checkpointing): `"none"` keeps every activation, `"full"` keeps only the layer input and
    /// recomputes the layer's forward in backward (all-to-alls and all-gathers included),
    /// `"comm_aware"` also keeps the outputs of the forward's communication and recomputes
    /// only the compute.
    #[serde(default)]
    pub checkpoint: Checkpoint,
}

impl Default for TedSpec {
    fn default() -> Self {
        TedSpec { duplicate_dropping: true, checkpoint: Checkpoint::default() }
    }
}

/// Activation checkpointing of an MoE layer (Singh et al., ICS 2023, section 4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Checkpoint {
    /// Keep every activation for backward.
    #[default]
    None,
    /// Keep the layer input only; backward re-runs the whole forward, communication included.
    Full,
    /// Keep the layer input and the outputs of the forward's all-to-alls and all-gathers;
    /// backward recomputes the compute only and issues no extra communication.
    CommAware,
}

impl Checkpoint {
    /// The spelling used in specs.
    pub fn as_str(self) -> &'static str {
        match self {
            Checkpoint::None => "none",
            Checkpoint::Full => "full",
            Checkpoint::CommAware => "comm_aware",
        }
    }
}

fn yes() -> bool {
    true
}

/// One MoE layer's Tutel execution when the choice is made per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TutelLayer {
    /// Parallelism of this layer (0: data parallel, 1: expert parallel).
    pub r: usize,
    /// Pipelining degree of this layer (1 when r = 0).
    pub degree: usize,
}

/// Tutel options: the pipelining degree and the all-to-all algorithm.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TutelSpec {
    /// Pipelining degree d: the kept rows of every (source rank, expert) block are split into
    /// d chunks whose all-to-alls overlap the previous chunk's experts; `"auto"` times the
    /// candidates {1, 2, 4} on the run's backend (cuda: a job per candidate) before the
    /// measured steps and keeps the fastest.
    #[serde(default)]
    pub degree: Degree,
    /// All-to-all algorithm: flat, or Tutel's 2D hierarchical (intra-node, then inter-node).
    #[serde(default)]
    pub a2a: A2aKind,
    /// Ranks per node for the 2D all-to-all (must divide `layout.ep` when `a2a = "2d"`).
    #[serde(default = "default_gpus_per_node")]
    pub gpus_per_node: usize,
    /// Parallelism r over the same (expert-parallel) parameter layout: 1 = expert parallel
    /// (tokens travel to the experts by all-to-all), 0 = data parallel (every rank all-gathers
    /// the expert weights over its expert-parallel group, computes all experts on its own
    /// tokens, and reduce-scatters the expert gradients back to their owners).
    #[serde(default = "default_r")]
    pub r: usize,
    /// How r is chosen: `"fixed"` uses `r`; `"auto"` times r = 1 (at each candidate degree)
    /// and r = 0 (degree 1) on the run's backend before the measured steps and keeps the fastest.
    #[serde(default)]
    pub parallelism: ParallelismChoice,
    /// One choice per MoE layer, in layer order: each layer runs with its own r and degree
    /// over the one parameter layout (switching moves no tensors). Empty: every layer uses `r`
    /// and `degree`. `parallelism = "auto"` fills it: every candidate is timed and each layer
    /// takes the one under which its own MoE sublayer was fastest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<TutelLayer>,
}

/// How Tutel's parallelism r is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParallelismChoice {
    /// Use `r` as given.
    #[default]
    Fixed,
    /// Time the layouts that share the parameter layout (r = 0 and r = 1) and keep the fastest.
    Auto,
}

fn default_r() -> usize {
    1
}

impl TutelSpec {
    /// Largest accepted fixed degree (as MPMoE's chunk bound).
    pub const MAX_DEGREE: usize = 64;
    /// The degrees `"auto"` tries, in order.
    pub const AUTO_CANDIDATES: [usize; 3] = [1, 2, 4];
}

impl Default for TutelSpec {
    fn default() -> Self {
        TutelSpec {
            degree: Degree::default(),
            a2a: A2aKind::default(),
            gpus_per_node: default_gpus_per_node(),
            r: default_r(),
            parallelism: ParallelismChoice::default(),
            layers: Vec::new(),
        }
    }
}

fn default_gpus_per_node() -> usize {
    8
}

/// A pipelining degree (Tutel's degree, MPMoE's chunks): a fixed chunk count, or chosen at
/// run start (Tutel: by timing; MPMoE: by its performance model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Degree {
    /// Exactly this many chunks (>= 1).
    Fixed(usize),
    /// Chosen at run start among a few candidates (Tutel: [`TutelSpec::AUTO_CANDIDATES`]).
    Auto,
}

impl Default for Degree {
    fn default() -> Self {
        Degree::Fixed(1)
    }
}

impl Serialize for Degree {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Degree::Fixed(n) => s.serialize_u64(*n as u64),
            Degree::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for Degree {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Degree;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a chunk count (integer >= 1) or \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Degree, E> {
                Ok(Degree::Fixed(usize::try_from(v).unwrap_or(usize::MAX)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Degree, E> {
                if v < 0 {
                    Err(E::invalid_value(serde::de::Unexpected::Signed(v), &self))
                } else {
                    self.visit_u64(v as u64)
                }
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Degree, E> {
                if v == "auto" {
                    Ok(Degree::Auto)
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Str(v), &self))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Which all-to-all algorithm carries the dispatch and combine rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum A2aKind {
    /// One all-to-all over the expert-parallel group.
    #[default]
    Flat,
    /// Tutel's 2D hierarchical all-to-all: among the node's GPUs, then among the
    /// same-local-index GPUs of every node.
    #[serde(rename = "2d")]
    TwoD,
}

impl A2aKind {
    /// The spelling used in TOML.
    pub fn as_str(self) -> &'static str {
        match self {
            A2aKind::Flat => "flat",
            A2aKind::TwoD => "2d",
        }
    }
}

/// Expert activation function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// GELU, tanh approximation (as GPT-2 and Megatron use).
    #[default]
    Gelu,
    /// max(0, x).
    Relu,
}

/// Storage precision of activations and weights on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// 32-bit float everywhere.
    #[default]
    F32,
    /// bfloat16 storage with f32 accumulation and f32 master weights (cuda backend).
    Bf16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }
}

/// Model sizes and routing. Token counts are per rank of the data-parallel group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Hidden size M.
    pub d_model: usize,
    /// Expert hidden size H (each expert is fc1 [M,H], activation, fc2 [H,M]).
    pub d_ffn: usize,
    /// Number of experts E per MoE layer.
    pub n_experts: usize,
    /// Experts chosen per token.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// Capacity factor cf, as Tutel's: cf > 0: each expert takes at most
    /// ceil(cf * k * T_global / E) tokens; cf = 0: dropless (resolves to `dropless = true`);
    /// cf < 0: at most min(ceil(|cf| * k * T_global / E), the step's largest expert load).
    /// Leave unset with `dropless = true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_factor: Option<f64>,
    /// No token is dropped: capacity becomes the largest expert load of the step.
    #[serde(default)]
    pub dropless: bool,
    /// Renormalize the k selected gate probabilities to sum to one (Mixtral, GShard top-2).
    #[serde(default)]
    pub renormalize: bool,
    /// Weight of the GShard load-balancing loss.
    #[serde(default = "default_aux")]
    pub aux_loss_coef: f64,
    /// Expert activation.
    #[serde(default)]
    pub activation: Activation,
    /// Number of MoE blocks.
    #[serde(default = "one")]
    pub n_layers: usize,
    /// Tokens each data-parallel rank processes per step (= batch * seq_len).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_rank: Option<usize>,
    /// Sequences per rank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
    /// Tokens per sequence (attention is causal within a sequence).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq_len: Option<usize>,
    /// Storage precision.
    #[serde(default)]
    pub dtype: DType,
    /// Optional dense backbone per block: attention and/or a dense MLP before the MoE layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backbone: Option<BackboneSpec>,
}

/// The dense part of a block: `x += Attn(LN(x))`, `x += MLP(LN(x))`, then the MoE sublayer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackboneSpec {
    /// Attention heads; 0 leaves attention out. Must divide d_model.
    #[serde(default)]
    pub n_heads: usize,
    /// Hidden size of the dense MLP; 0 leaves it out.
    #[serde(default)]
    pub d_mlp: usize,
}

fn default_top_k() -> usize {
    2
}
fn default_aux() -> f64 {
    0.01
}
fn one() -> usize {
    1
}

/// Parallel degrees. `world = dp * ep * tp * pp`; expert-parallel groups are cut from the
/// data-parallel group (DeepSpeed's convention), so dense weights are replicated `dp * ep`
/// times and each expert `dp` times.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayoutSpec {
    /// Total ranks; defaults to the product of the degrees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world: Option<usize>,
    /// Replicas of each expert.
    #[serde(default = "one")]
    pub dp: usize,
    /// Tensor-parallel degree.
    #[serde(default = "one")]
    pub tp: usize,
    /// Expert-parallel degree: experts are split over this many ranks.
    #[serde(default = "one")]
    pub ep: usize,
    /// Pipeline stages.
    #[serde(default = "one")]
    pub pp: usize,
}

impl Default for LayoutSpec {
    fn default() -> Self {
        LayoutSpec { world: None, dp: 1, tp: 1, ep: 1, pp: 1 }
    }
}

impl LayoutSpec {
    /// The world size the degrees imply.
    pub fn product(&self) -> usize {
        self.dp.saturating_mul(self.ep).saturating_mul(self.tp).saturating_mul(self.pp)
    }
}

/// Which executor runs the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// cuda when there is a visible GPU for every rank, else cpu.
    #[default]
    Auto,
    /// Reference executor: f32 math, one thread per rank.
    Cpu,
    /// NVIDIA GPUs through cudarc, one process per GPU.
    Cuda,
    /// Discrete-event simulation of the plan on a hardware profile (`run.profile`): predicted
    /// times and memory, no math.
    Sim,
}

impl BackendKind {
    /// The spelling used in TOML.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Auto => "auto",
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
            BackendKind::Sim => "sim",
        }
    }
}

/// Forward only, or forward + backward + optimizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Forward, backward, gradient reduction and Adam.
    #[default]
    Training,
    /// Forward only.
    Inference,
}

/// How the experiment runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// Executor.
    #[serde(default)]
    pub backend: BackendKind,
    /// Measured steps.
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// Unmeasured steps before them.
    #[serde(default = "one")]
    pub warmup: usize,
    /// Seed for weights and data.
    #[serde(default)]
    pub seed: u64,
    /// Training or inference.
    #[serde(default)]
    pub mode: Mode,
    /// Adam learning rate.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Hardware profile of the `sim` backend: a built-in name (`"h100"`, `"h200"`) or a path
    /// to a profile TOML; resolved to `"h100"` when unset (sim only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// GPUs per node of the simulated cluster (sim only); the profile's when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus_per_node: Option<usize>,
    /// Nodes of the simulated cluster (sim only); enough for the world when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<usize>,
    /// The fullest expert's load over the mean in a dropless plan (sim only, at least 1):
    /// executors size every expert's block to the fullest one, so its element-wise passes
    /// scale with it. 1 (balanced routing) when unset; `moelab predict` sets the measured one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropless_imbalance: Option<f64>,
    /// Share of the routed assignments a capacity plan keeps, `1 - dropped / routed` (sim
    /// only, in (0, 1]): the row-moving ops (dispatch, expert layouts, combine) read only the
    /// kept rows. 1 (balanced routing, nothing dropped) when unset; `moelab predict` sets the
    /// measured one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_share: Option<f64>,
    /// Rows each expert-parallel rank's experts take, relative to one another (sim only;
    /// `layout.ep` positive numbers, scaled to mean 1). Dropless: the busiest rank runs longer
    /// expert GEMMs and all-to-alls. Capacity: a rank's blocks hold fewer zero rows, so its
    /// bf16 expert GEMMs run slower (on a profile with `kernels.zero_row_gain`; in an f32
    /// capacity plan the loads change nothing, and the run warns). The others wait for it. Balanced when unset; `moelab predict`
    /// sets the measured ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank_loads: Option<Vec<f64>>,
    /// Whether the simulated executor keeps host copies of the routing tables it reads
    /// (sim only): true (the cuda executor since 2026-11-24) copies each table down once and
    /// issues the ops that read it again without waiting for the stream; false prices a
    /// synchronising copy at every read, as earlier executors did. True when unset;
    /// `moelab predict` sets what the measured run's executor did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_copies: Option<bool>,
}

fn default_steps() -> usize {
    3
}
fn default_lr() -> f64 {
    1e-3
}

impl Default for RunSpec {
    fn default() -> Self {
        RunSpec {
            backend: BackendKind::Auto,
            steps: default_steps(),
            warmup: 1,
            seed: 0,
            mode: Mode::Training,
            lr: default_lr(),
            profile: None,
            gpus_per_node: None,
            nodes: None,
            dropless_imbalance: None,
            kept_share: None,
            rank_loads: None,
            host_copies: None,
        }
    }
}

/// Capacity rule after resolution.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Capacity {
    /// ceil(cf * k * T_global / E) slots per expert.
    Factor(f64),
    /// Slots = the largest expert load of the step.
    Dropless,
    /// Tutel's negative capacity factor (`capacity_factor = -f`): slots =
    /// min(ceil(f * k * T_global / E), the largest expert load of the step), the load agreed
    /// over every data rank from the all-gathered routing counts. Buffers are sized at run time.
    Bounded(f64),
}

impl ExperimentSpec {
    /// The keys and tables a spec file may have at its top level.
    pub const TOP_LEVEL_KEYS: [&'static str; 10] = ["name", "description", "variant", "model", "layout", "run", "mpmoe", "tutel", "ted", "ppmoe"];

    /// Tokens per rank after resolution (validated specs always have it).
    pub fn tokens_per_rank(&self) -> usize {
        self.model.tokens_per_rank.expect("spec is resolved")
    }
    /// Sequence length after resolution.
    pub fn seq_len(&self) -> usize {
        self.model.seq_len.expect("spec is resolved")
    }
    /// World size after resolution.
    pub fn world(&self) -> usize {
        self.layout.world.unwrap_or_else(|| self.layout.product())
    }
    /// The capacity rule.
    pub fn capacity(&self) -> Capacity {
        match (self.model.dropless, self.model.capacity_factor) {
            (true, _) => Capacity::Dropless,
            (false, Some(cf)) if cf < 0.0 => Capacity::Bounded(-cf),
            (false, cf) => Capacity::Factor(cf.unwrap_or(1.25)),
        }
    }
    /// Experts each token is sent to by one router: `model.top_k`, except DGMoE, whose
    /// gates are top-1 each. Lets a backend size expected routing loads without knowing the
    /// variant.
    pub fn routed_k(&self) -> usize {
        if self.variant == Variant::Dgmoe { 1 } else { self.model.top_k }
    }
    /// GPUs per node that the design itself names (Tutel's 2D all-to-all groups ranks by
    /// `tutel.gpus_per_node`), for a backend that models nodes when the run does not say.
    pub fn node_size_hint(&self) -> Option<usize> {
        self.tutel.as_ref().filter(|t| self.variant == Variant::Tutel && t.a2a == A2aKind::TwoD).map(|t| t.gpus_per_node)
    }
    /// Serialize back to TOML (what `moelab run` accepts unchanged).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("specs always serialize")
    }
}
