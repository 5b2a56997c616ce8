//! Hardware profiles: what the simulator knows about a GPU kind, its links and its cluster.
//! A profile is a TOML file (`profiles/h100.toml`, `profiles/h200.toml` ship built in; any
//! other file can be named by path). Parsing rejects unknown fields, and every error names
//! the dotted field and says how to fix it, as spec validation does.
//!
//! The GEMM model is a roofline with an efficiency curve: `time = flops / (peak * eff)` with
//! `eff(m, n, k) = eff_max * tiles(m, n) * k / (k + k_half)`, where `tiles` is the useful
//! share of the tensor-core work after tile and wave quantization on the GPU's SMs. `eff_max`
//! (and `k_half`, given two or more shapes) is fitted to the measured points in the file.
//!
//! Non-GEMM ops run at a per-class share of the copy bandwidth, and ops that the executor
//! runs through the host pay its round trips (`[kernels]`, optional: see [`KernelProfile`]).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

/// The profiles compiled into the binary, by name: `run.profile = "h100"` needs no file.
/// `h100`/`h200` are measured by `moelab calibrate`; the `-datasheet` ones are the public
/// numbers and stated assumptions they were calibrated from (and the base for recalibrating).
pub const BUILTIN: [(&str, &str); 4] = [
    ("h100", include_str!("../../../profiles/h100.toml")),
    ("h200", include_str!("../../../profiles/h200.toml")),
    ("h100-datasheet", include_str!("../../../profiles/h100-datasheet.toml")),
    ("h200-datasheet", include_str!("../../../profiles/h200-datasheet.toml")),
];

/// The profile a sim run uses when `run.profile` is not given.
pub const DEFAULT_PROFILE: &str = "h100";

/// Kinds of links between GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkKind {
    /// NVLink through NVSwitch, within a node: one port per GPU, non-blocking between ports.
    Nvlink,
    /// InfiniBand between nodes: `nics_per_node` NICs per node, GPUs share them evenly.
    Infiniband,
    /// Ethernet (RoCE) between nodes, modelled like InfiniBand with its own numbers.
    Ethernet,
}

impl LinkKind {
    /// The spelling used in profile files.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkKind::Nvlink => "nvlink",
            LinkKind::Infiniband => "infiniband",
            LinkKind::Ethernet => "ethernet",
        }
    }
}

/// Kinds of collectives, each with its own latency and achievable bandwidth per link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CollectiveKind {
    /// Every member sends a slice of its buffer to every other member.
    AllToAll,
    /// Sum over members, everyone gets the result.
    AllReduce,
    /// Everyone gets every member's buffer.
    AllGather,
    /// Sum over members, everyone keeps a slice.
    ReduceScatter,
}

impl CollectiveKind {
    /// Every kind, in profile order.
    pub const ALL: [CollectiveKind; 4] =
        [CollectiveKind::AllToAll, CollectiveKind::AllReduce, CollectiveKind::AllGather, CollectiveKind::ReduceScatter];
    /// The spelling used in profile files.
    pub fn as_str(self) -> &'static str {
        match self {
            CollectiveKind::AllToAll => "all_to_all",
            CollectiveKind::AllReduce => "all_reduce",
            CollectiveKind::AllGather => "all_gather",
            CollectiveKind::ReduceScatter => "reduce_scatter",
        }
    }
    /// Latency steps of the algorithm NCCL uses on `n` members: one message per peer for
    /// all-to-all, a tree (2 log2 n) for all-reduce, log2 n (PAT) for all-gather and
    /// reduce-scatter. Zero for a single member.
    pub fn latency_steps(self, n: usize) -> f64 {
        if n <= 1 {
            return 0.0;
        }
        let log = (n as f64).log2().ceil();
        match self {
            CollectiveKind::AllToAll => (n - 1) as f64,
            CollectiveKind::AllReduce => 2.0 * log,
            CollectiveKind::AllGather | CollectiveKind::ReduceScatter => log,
        }
    }
    /// Bytes each member puts on the wire when its payload is `bytes` (the send buffer:
    /// the whole buffer for all-to-all, all-reduce and reduce-scatter, its own piece for
    /// all-gather), with ring algorithms for the reductions and gathers.
    pub fn wire_bytes(self, bytes: f64, n: usize) -> f64 {
        let n_f = n as f64;
        if n <= 1 {
            return 0.0;
        }
        match self {
            CollectiveKind::AllToAll | CollectiveKind::ReduceScatter => bytes * (n_f - 1.0) / n_f,
            CollectiveKind::AllReduce => 2.0 * bytes * (n_f - 1.0) / n_f,
            CollectiveKind::AllGather => bytes * (n_f - 1.0),
        }
    }
}

impl fmt::Display for CollectiveKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Element types the GEMM model has numbers for (the spec's `model.dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmDtype {
    /// bf16 inputs, f32 accumulation (tensor cores).
    Bf16,
    /// f32 everywhere.
    F32,
}

/// Which GEMM of a linear layer: the forward product or one of the two backward ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GemmPass {
    /// `y = x w`.
    Forward,
    /// `dx = dy w^T`.
    InputGrad,
    /// `dw = x^T dy`: the rows are the reduction.
    WeightGrad,
}

impl GemmPass {
    /// Every pass.
    pub const ALL: [GemmPass; 3] = [GemmPass::Forward, GemmPass::InputGrad, GemmPass::WeightGrad];
    /// The name in profiles and the calibrate probe's lines.
    pub fn as_str(self) -> &'static str {
        match self {
            GemmPass::Forward => "forward",
            GemmPass::InputGrad => "input_grad",
            GemmPass::WeightGrad => "weight_grad",
        }
    }
}

/// The shares of the copy rate at which a bf16 GEMM's f32 output moves its extra bytes when
/// the GEMM reduces over `k` (`[[kernels.f32_output_by_k]]`, fitted by `moelab calibrate`):
/// `write_share` for an output written (2 extra bytes per element), `add_share` for one
/// added to (6: MPMoE's chunks after the first).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct F32OutputPoint {
    /// Reduction length (the rows of a weight gradient).
    pub k: usize,
    /// Share of the copy rate for an f32 output written.
    pub write_share: f64,
    /// Share of the copy rate for an f32 output added to (read and written).
    pub add_share: f64,
}

impl KernelProfile {
    /// Seconds a bf16 GEMM reducing over `k` spends on `bytes` of f32 output beyond a bf16
    /// output's, written or (`add`) added to, at `mem_bandwidth`: the points by `k`
    /// interpolated in log k (clamped to the first and last), else `f32_output_share`; zero
    /// when neither is given.
    pub fn f32_output_seconds(&self, bytes: f64, k: usize, add: bool, mem_bandwidth: f64) -> f64 {
        let pts = &self.f32_output_by_k;
        if pts.is_empty() {
            return self.f32_output_share.map_or(0.0, |share| bytes / (mem_bandwidth * share));
        }
        let per_byte = |p: &F32OutputPoint| 1.0 / (mem_bandwidth * if add { p.add_share } else { p.write_share });
        let seconds_per_byte = match pts.iter().position(|p| p.k >= k) {
            Some(0) => per_byte(&pts[0]),
            None => per_byte(&pts[pts.len() - 1]),
            Some(i) => {
                let (a, b) = (&pts[i - 1], &pts[i]);
                let t = ((k as f64).ln() - (a.k as f64).ln()) / ((b.k as f64).ln() - (a.k as f64).ln());
                per_byte(a) + t * (per_byte(b) - per_byte(a))
            }
        };
        bytes * seconds_per_byte
    }
}

/// How much faster a bf16 expert GEMM runs per share of its rows that are zero (a capacity
/// plan's unfilled capacity), per pass: time = time at full rows / (1 + gain x zero share).
/// Zero operands draw less power, so a power-capped GPU clocks higher over them;
/// `moelab calibrate`'s zero-rows probe fits the gains (`kernels.zero_row_gain`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZeroRowGain {
    /// Of the forward GEMM.
    pub forward: f64,
    /// Of the input-gradient GEMM.
    pub input_grad: f64,
    /// Of the weight-gradient GEMM (zero rows on both operands, along the reduction).
    pub weight_grad: f64,
}

impl ZeroRowGain {
    /// The gain of one pass.
    pub fn of(&self, pass: GemmPass) -> f64 {
        match pass {
            GemmPass::Forward => self.forward,
            GemmPass::InputGrad => self.input_grad,
            GemmPass::WeightGrad => self.weight_grad,
        }
    }
}

/// A fitted GEMM throughput model for one element type.
#[derive(Debug, Clone, PartialEq)]
pub struct GemmModel {
    /// Peak FLOP/s.
    pub peak_flops: f64,
    /// Best achievable share of the peak (fitted).
    pub eff_max: f64,
    /// `k` at which the k-term halves the efficiency (fitted or given).
    pub k_half: f64,
    /// Output tile rows of the GEMM kernels.
    pub tile_m: usize,
    /// Output tile columns.
    pub tile_n: usize,
    /// Streaming multiprocessors (one tile each per wave).
    pub sms: usize,
    /// The measured points the fit used, with the model's prediction for each.
    pub points: Vec<GemmPoint>,
}

/// Squared log distance (summed over m, n, k) at which a measured point's correction of the
/// fitted curve has faded to `corr^(1/e)`: one dimension off by a factor of e^4 (about 55x),
/// or all three by about 10x. (Checked against the cuda backend's mixtral-ish runs: a reach of
/// 1 moved the predicted step 3-5 points further from the measurement, no fading 1 point
/// closer; the fade keeps shapes far from every measurement on the fitted curve.)
pub const CORRECTION_REACH: f64 = 16.0;

/// Smallest side (m, n or k) of a measured GEMM that the curve fit uses (one tile); thinner
/// shapes (the routers' 8- and 64-column GEMMs, which f32 kernels run with narrower tiles than
/// the curve's) only correct their own neighbourhood.
pub const FIT_MIN_SIDE: usize = 128;

/// One measured GEMM throughput.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GemmPoint {
    /// Rows of the output.
    pub m: usize,
    /// Columns of the output.
    pub n: usize,
    /// Reduction length.
    pub k: usize,
    /// Products per call (a strided-batched GEMM, e.g. a slice of attention heads); 1 when
    /// absent.
    #[serde(default = "one")]
    pub batch: usize,
    /// Measured TFLOP/s.
    pub tflops: f64,
    /// Where the number comes from (device, tool, date).
    pub source: String,
}

impl GemmModel {
    /// Share of the peak that a batch of `batch` GEMMs of `[m, k] x [k, n]` achieves.
    ///
    /// The fitted curve (peak x `eff_max` x tile, wave and k terms) gives the shape's trend;
    /// it is then scaled by measured over fitted at the nearest measured shape (squared log
    /// distance d in m, n, k), the correction fading as `corr^exp(-d / CORRECTION_REACH)`:
    /// a measured shape (at batch 1, as measured) comes back exactly as measured, its near
    /// neighbours inherit its deviation from the curve (cuBLAS picks other tiles and split-k
    /// for thin shapes than one fixed tile assumes), and far shapes follow the curve.
    pub fn efficiency(&self, m: usize, n: usize, k: usize, batch: usize) -> f64 {
        if m == 0 || n == 0 || k == 0 || batch == 0 {
            return self.eff_max;
        }
        let curve = self.eff_max * self.shape_term(m, n, k, batch);
        // Rows count over the whole batch (a grouped GEMM of 8 x 640 rows fills the GPU like
        // one of 5,120 rows), and the batch itself.
        let dist = |p: &GemmPoint| {
            let l = |a: usize, b: usize| ((a as f64) / (b as f64)).ln().powi(2);
            l(m * batch, p.m * p.batch) + l(n, p.n) + l(k, p.k) + l(batch, p.batch)
        };
        let nearest = self.points.iter().map(|p| (dist(p), p)).min_by(|a, b| a.0.total_cmp(&b.0));
        let correction = nearest.map_or(1.0, |(d, p)| {
            let fitted = self.eff_max * self.shape_term(p.m, p.n, p.k, p.batch);
            let full = if fitted > 0.0 { p.tflops * 1e12 / self.peak_flops / fitted } else { 1.0 };
            full.powf((-d / CORRECTION_REACH).exp())
        });
        (curve * correction).min(1.0)
    }
    /// The shape-dependent factor of the efficiency: tile and wave quantization times the
    /// k-term, in (0, 1].
    fn shape_term(&self, m: usize, n: usize, k: usize, batch: usize) -> f64 {
        let tm = m.div_ceil(self.tile_m);
        let tn = n.div_ceil(self.tile_n);
        let tiles = (tm * tn * batch) as f64;
        let tile_use = (m * n) as f64 / ((tm * self.tile_m * tn * self.tile_n) as f64);
        let waves = (tiles / self.sms as f64).ceil();
        let wave_use = tiles / (waves * self.sms as f64);
        let k_term = k as f64 / (k as f64 + self.k_half);
        tile_use * wave_use * k_term
    }
    /// Seconds for `flops` of GEMM work of the given shape.
    pub fn seconds(&self, flops: f64, m: usize, n: usize, k: usize, batch: usize) -> f64 {
        flops / (self.peak_flops * self.efficiency(m, n, k, batch))
    }
    /// Predicted TFLOP/s of one `m x n x k` GEMM.
    pub fn predicted_tflops(&self, m: usize, n: usize, k: usize) -> f64 {
        self.peak_flops * self.efficiency(m, n, k, 1) / 1e12
    }
}

/// Per collective kind on one link kind: `time = latency_us + step_us * steps(kind, n) +
/// wire_bytes / (bandwidth * efficiency)`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectiveParams {
    /// Fixed start-up time of the collective, microseconds.
    pub latency_us: f64,
    /// Time per latency step of the algorithm, microseconds.
    pub step_us: f64,
    /// Achievable share of the link bandwidth (bus bandwidth over link bandwidth).
    pub efficiency: f64,
}

/// One kind of link.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkProfile {
    /// Which kind.
    pub kind: LinkKind,
    /// Bandwidth per direction of one port (NVLink: per GPU; NIC: per NIC), bytes/s.
    pub bandwidth: f64,
    /// Numbers per collective kind, in [`CollectiveKind::ALL`] order.
    pub collectives: [CollectiveParams; 4],
}

impl LinkProfile {
    /// The numbers of one collective kind.
    pub fn collective(&self, kind: CollectiveKind) -> &CollectiveParams {
        &self.collectives[CollectiveKind::ALL.iter().position(|k| *k == kind).expect("listed")]
    }
}

/// The GPU side of a profile.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuProfile {
    /// Device memory, bytes.
    pub memory_bytes: f64,
    /// Streaming multiprocessors.
    pub sms: usize,
    /// Time from one kernel's end to the next one's start on a stream, seconds.
    pub launch_s: f64,
    /// Achievable memory bandwidth for elementwise kernels, bytes/s (peak x efficiency).
    pub mem_bandwidth: f64,
    /// Non-tensor f32 FLOP/s (elementwise arithmetic).
    pub vector_flops: f64,
    /// bf16 GEMMs.
    pub bf16: GemmModel,
    /// f32 GEMMs.
    pub f32: GemmModel,
    /// Per kernel class bandwidth shares and the host round-trip price (`[kernels]`).
    pub kernels: KernelProfile,
}

/// Classes of non-GEMM kernels, each with its own achieved share of the copy bandwidth:
/// a LayerNorm reads a row twice and reduces it, an activation streams, a layout gathers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelClass {
    /// LayerNorm forward.
    Layernorm,
    /// LayerNorm backward (input gradient and the parameter column sums).
    LayernormBwd,
    /// Activation forward.
    Act,
    /// Activation backward.
    ActBwd,
    /// Row-moving layout ops (dispatch, expert layouts, chunks): a row gather.
    Layout,
    /// Weighted combine of expert outputs.
    Combine,
    /// Combine backward (row gradients and per-assignment weight gradients).
    CombineBwd,
    /// Routing softmax / top-k (and its backward where a profile has no `route_bwd`).
    Route,
    /// The routing backward: the gate-probability gradient per token.
    RouteBwd,
    /// The loss and its gradient.
    Loss,
    /// The optimizer update (Adam, gradient accumulation).
    Optimizer,
    /// Drawing the batch on the device (a random-number kernel).
    Data,
    /// The attention core's causal softmax over the score matrix (a row kernel between its
    /// GEMMs).
    Softmax,
    /// The attention core's softmax backward.
    SoftmaxBwd,
    /// Any other elementwise op.
    Elementwise,
}

impl KernelClass {
    /// Every class, in profile order.
    pub const ALL: [KernelClass; 15] = [
        KernelClass::Layernorm, KernelClass::LayernormBwd, KernelClass::Act, KernelClass::ActBwd, KernelClass::Layout,
        KernelClass::Combine, KernelClass::CombineBwd, KernelClass::Route, KernelClass::RouteBwd, KernelClass::Loss,
        KernelClass::Optimizer, KernelClass::Data, KernelClass::Softmax, KernelClass::SoftmaxBwd, KernelClass::Elementwise,
    ];
    /// The spelling used in profile files (`[kernels.<name>]`).
    pub fn as_str(self) -> &'static str {
        match self {
            KernelClass::Layernorm => "layernorm",
            KernelClass::LayernormBwd => "layernorm_bwd",
            KernelClass::Act => "act",
            KernelClass::ActBwd => "act_bwd",
            KernelClass::Layout => "layout",
            KernelClass::Combine => "combine",
            KernelClass::CombineBwd => "combine_bwd",
            KernelClass::Route => "route",
            KernelClass::RouteBwd => "route_bwd",
            KernelClass::Loss => "loss",
            KernelClass::Optimizer => "optimizer",
            KernelClass::Data => "data",
            KernelClass::Softmax => "softmax",
            KernelClass::SoftmaxBwd => "softmax_bwd",
            KernelClass::Elementwise => "elementwise",
        }
    }
}

/// One kernel class: `time = fixed_us + bytes / (mem_bandwidth * bandwidth_share)`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct KernelClassParams {
    /// Achieved bandwidth over the copy bandwidth (`gpu.hbm_tbps * gpu.hbm_efficiency`).
    pub bandwidth_share: f64,
    /// The share in bf16 plans, where the class's kernels move half the bytes with other
    /// code (8 values per 16-byte word, f32 math); absent: `bandwidth_share`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bf16_bandwidth_share: Option<f64>,
    /// Fixed time per op on top of the launch gap, microseconds.
    #[serde(default)]
    pub fixed_us: f64,
    /// Host bandwidth of this class's host work, GB/s (the executor's layouts compute their
    /// row maps on the host: a few ns per row); absent: `kernels.host_gbps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_gbps: Option<f64>,
}

impl KernelClassParams {
    /// The bandwidth share for a plan whose activations are bf16 (`bf16`) or f32.
    pub fn share(&self, bf16: bool) -> f64 {
        if bf16 {
            self.bf16_bandwidth_share.unwrap_or(self.bandwidth_share)
        } else {
            self.bandwidth_share
        }
    }
}

impl Default for KernelClassParams {
    fn default() -> Self {
        KernelClassParams { bandwidth_share: 1.0, bf16_bandwidth_share: None, fixed_us: 0.0, host_gbps: None }
    }
}

/// Non-GEMM kernel classes and host round trips (`[kernels]`; absent: every class at the
/// copy bandwidth and no host round-trip cost, the datasheet assumption).
///
/// `host_sync_us` and `host_gbps` price a property of the executor, not of the plan: an op
/// whose executor reads a routing table on the host (the cuda backend downloads routing
/// tables and syncs its stream in Route, RouteBwd, CombineBwd and the layout ops, see
/// `cost::host_traffic`) pays one `host_sync_us` per synchronising copy plus the bytes it
/// moves across at `host_gbps`.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelProfile {
    /// One host round trip: a small device-to-host copy and a stream synchronize, seconds.
    pub host_sync_s: f64,
    /// Host <-> device copy rate of the (pageable) routing tables, bytes/s.
    pub host_bandwidth: f64,
    /// Host time per GEMM call of an expert op that runs one GEMM per expert (dropless):
    /// with many small experts the host's calls, not the GPU, set the pace. Seconds.
    pub gemm_call_s: f64,
    /// Host time to issue one op on the cuda executor (its bookkeeping: events, buffers,
    /// allocations) before its kernels, seconds (`kernels.host_op_us`; zero when absent);
    /// compute ops and collectives alike.
    pub host_op_s: f64,
    /// Host time per kernel an op launches, seconds (`kernels.host_launch_us`). With
    /// `host_op_s` it is the op's issue time, which the host thread spends ahead of the GPU:
    /// it shows only where the GPU waits for the host, in strings of short kernels.
    pub host_launch_s: f64,
    /// Share of `mem_bandwidth` at which a bf16 GEMM's f32 output (the weight gradients of a
    /// bf16 plan) moves its bytes beyond a bf16 output's (6 per element when the GEMM adds to
    /// it): `moelab calibrate` fits it. `None`: those bytes are not priced. Where
    /// `f32_output_by_k` has points, they price the bytes instead.
    pub f32_output_share: Option<f64>,
    /// The same shares fitted at each reduction length the sweep timed, sorted by `k`
    /// (`[[kernels.f32_output_by_k]]`): a short reduction leaves the output bytes nothing to
    /// hide under, a long one hides part of them. Empty: `f32_output_share` for every `k`.
    pub f32_output_by_k: Vec<F32OutputPoint>,
    /// Speed-up of bf16 expert GEMMs over zero rows (`kernels.zero_row_gain`; zero when absent).
    pub zero_row_gain: ZeroRowGain,
    /// Per class, in [`KernelClass::ALL`] order.
    pub classes: [KernelClassParams; 15],
    /// Where the numbers come from (`kernels.source`: fitted from which runs, or measured).
    pub source: Option<String>,
}

impl Default for KernelProfile {
    fn default() -> Self {
        KernelProfile { host_sync_s: 0.0, host_bandwidth: f64::INFINITY, gemm_call_s: 0.0, host_op_s: 0.0, host_launch_s: 0.0, f32_output_share: None, f32_output_by_k: Vec::new(), zero_row_gain: ZeroRowGain::default(), classes: [KernelClassParams::default(); 15], source: None }
    }
}

impl KernelProfile {
    /// The numbers of one class.
    pub fn class(&self, c: KernelClass) -> &KernelClassParams {
        &self.classes[KernelClass::ALL.iter().position(|k| *k == c).expect("listed")]
    }
}

impl GpuProfile {
    /// The GEMM model of an element type.
    pub fn gemm(&self, dtype: GemmDtype) -> &GemmModel {
        match dtype {
            GemmDtype::Bf16 => &self.bf16,
            GemmDtype::F32 => &self.f32,
        }
    }
}

/// How GPUs are grouped into nodes and which links join them.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    /// GPUs per node (ranks are placed node by node: rank r on node r / gpus_per_node).
    pub gpus_per_node: usize,
    /// Nodes.
    pub nodes: usize,
    /// Link kind within a node.
    pub intra: LinkKind,
    /// Link kind between nodes.
    pub inter: LinkKind,
    /// NICs per node for the inter-node link; GPU i of a node uses NIC i * nics / gpus.
    pub nics_per_node: usize,
}

impl Topology {
    /// The node of a rank.
    pub fn node_of(&self, rank: u32) -> usize {
        rank as usize / self.gpus_per_node
    }
    /// The NIC (index within its node) a rank uses.
    pub fn nic_of(&self, rank: u32) -> usize {
        (rank as usize % self.gpus_per_node) * self.nics_per_node / self.gpus_per_node
    }
}

/// A parsed, fitted hardware profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Short name, e.g. `h100`.
    pub name: String,
    /// The device the numbers describe.
    pub device: String,
    /// Whether the numbers were measured on that device by `moelab calibrate`; `false`:
    /// datasheet numbers and stated assumptions.
    pub calibrated: bool,
    /// When the numbers were taken.
    pub date: String,
    /// The GPU.
    pub gpu: GpuProfile,
    /// Nodes and links.
    pub topology: Topology,
    /// The intra-node link.
    pub intra: LinkProfile,
    /// The inter-node link.
    pub inter: LinkProfile,
}

impl Profile {
    /// The numbers of a link kind used by this profile.
    pub fn link(&self, kind: LinkKind) -> &LinkProfile {
        if kind == self.intra.kind {
            &self.intra
        } else {
            &self.inter
        }
    }
    /// The same profile on another cluster shape (NICs per node capped at one per GPU).
    pub fn with_cluster(mut self, gpus_per_node: usize, nodes: usize) -> Self {
        self.topology.nics_per_node = self.topology.nics_per_node.min(gpus_per_node).max(1);
        self.topology.gpus_per_node = gpus_per_node;
        self.topology.nodes = nodes;
        self
    }
}

/// Why a profile could not be loaded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProfileError {
    /// Neither a built-in name nor a readable file.
    #[error("profile {name:?} is neither a built-in profile ({known}) nor a readable file: {message}")]
    NotFound {
        /// What was asked for.
        name: String,
        /// The built-in names.
        known: String,
        /// The OS error for the path.
        message: String,
    },
    /// Malformed TOML, an unknown field or a value of the wrong type.
    #[error("{source_name}: {field}: {message}{}", location.map(|(l, c)| format!(" (line {l}, column {c})")).unwrap_or_default())]
    Parse {
        /// Profile name or path.
        source_name: String,
        /// Dotted field, or `(file)` when the parser names none.
        field: String,
        /// What the parser said.
        message: String,
        /// Line and column.
        location: Option<(usize, usize)>,
    },
    /// Well-formed but unusable.
    #[error("{source_name}: {field}: {message} (fix: {fix})")]
    Invalid {
        /// Profile name or path.
        source_name: String,
        /// Dotted field.
        field: String,
        /// What is wrong.
        message: String,
        /// How to fix it.
        fix: String,
    },
}

impl ProfileError {
    /// The dotted field the error is about, when it names one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ProfileError::Parse { field, .. } | ProfileError::Invalid { field, .. } => Some(field),
            ProfileError::NotFound { .. } => None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileToml {
    name: String,
    device: String,
    calibrated: bool,
    date: String,
    gpu: GpuToml,
    topology: TopologyToml,
    links: LinksToml,
    #[serde(default)]
    kernels: Option<KernelsToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KernelsToml {
    #[serde(default)]
    host_sync_us: f64,
    #[serde(default)]
    host_gbps: Option<f64>,
    #[serde(default)]
    gemm_call_us: f64,
    #[serde(default)]
    host_op_us: f64,
    #[serde(default)]
    host_launch_us: f64,
    #[serde(default)]
    f32_output_share: Option<f64>,
    #[serde(default)]
    f32_output_by_k: Vec<F32OutputPoint>,
    #[serde(default)]
    zero_row_gain: Option<ZeroRowGain>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    layernorm: Option<KernelClassParams>,
    #[serde(default)]
    layernorm_bwd: Option<KernelClassParams>,
    #[serde(default)]
    act: Option<KernelClassParams>,
    #[serde(default)]
    act_bwd: Option<KernelClassParams>,
    #[serde(default)]
    layout: Option<KernelClassParams>,
    #[serde(default)]
    combine: Option<KernelClassParams>,
    #[serde(default)]
    combine_bwd: Option<KernelClassParams>,
    #[serde(default)]
    route: Option<KernelClassParams>,
    #[serde(default)]
    route_bwd: Option<KernelClassParams>,
    #[serde(default)]
    loss: Option<KernelClassParams>,
    #[serde(default)]
    optimizer: Option<KernelClassParams>,
    #[serde(default)]
    data: Option<KernelClassParams>,
    #[serde(default)]
    softmax: Option<KernelClassParams>,
    #[serde(default)]
    softmax_bwd: Option<KernelClassParams>,
    #[serde(default)]
    elementwise: Option<KernelClassParams>,
}

impl KernelsToml {
    fn classes(&self) -> [Option<KernelClassParams>; 15] {
        // A profile without its own route_bwd prices the routing backward as the forward.
        [self.layernorm, self.layernorm_bwd, self.act, self.act_bwd, self.layout, self.combine, self.combine_bwd,
            self.route, self.route_bwd.or(self.route), self.loss, self.optimizer, self.data, self.softmax, self.softmax_bwd, self.elementwise]
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GpuToml {
    memory_gib: f64,
    sms: usize,
    launch_us: f64,
    hbm_tbps: f64,
    hbm_efficiency: f64,
    vector_tflops: f64,
    gemm: GemmToml,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GemmToml {
    tile_m: usize,
    tile_n: usize,
    #[serde(default)]
    k_half: Option<f64>,
    bf16: DtypeToml,
    f32: DtypeToml,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DtypeToml {
    peak_tflops: f64,
    #[serde(default)]
    efficiency: Option<f64>,
    #[serde(default)]
    points: Vec<GemmPoint>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopologyToml {
    gpus_per_node: usize,
    #[serde(default = "one")]
    nodes: usize,
    intra_node: LinkKind,
    inter_node: LinkKind,
    nics_per_node: usize,
}

fn one() -> usize {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinksToml {
    #[serde(default)]
    nvlink: Option<LinkToml>,
    #[serde(default)]
    infiniband: Option<LinkToml>,
    #[serde(default)]
    ethernet: Option<LinkToml>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkToml {
    bandwidth_gbps: f64,
    all_to_all: CollectiveParams,
    all_reduce: CollectiveParams,
    all_gather: CollectiveParams,
    reduce_scatter: CollectiveParams,
}

/// The TOML text of a built-in profile, if `name` is one.
pub fn builtin_text(name: &str) -> Option<&'static str> {
    BUILTIN.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// The built-in calibrated profile of a GPU as CUDA names it (`"NVIDIA H200"` -> `"h200"`,
/// `"NVIDIA H100 80GB HBM3"` -> `"h100"`); `None` for a GPU no built-in profile describes.
/// Its datasheet base is the same name with `-datasheet` appended.
pub fn builtin_for_device(device: &str) -> Option<&'static str> {
    let d = device.to_ascii_uppercase();
    if d.contains("H200") {
        Some("h200")
    } else if d.contains("H100") {
        Some("h100")
    } else {
        None
    }
}

/// Load a profile by built-in name (`h100`, `h200`) or by path to a TOML file.
pub fn resolve(name_or_path: &str) -> Result<Profile, ProfileError> {
    if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
        return parse(text, name_or_path);
    }
    let known = BUILTIN.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
    let text = std::fs::read_to_string(Path::new(name_or_path)).map_err(|e| ProfileError::NotFound {
        name: name_or_path.to_string(),
        known,
        message: e.to_string(),
    })?;
    parse(&text, name_or_path)
}

/// Parse and fit a profile from TOML text; `source_name` names it in errors.
pub fn parse(text: &str, source_name: &str) -> Result<Profile, ProfileError> {
    let raw: ProfileToml = toml::from_str(text).map_err(|e| {
        let span = e.span();
        let field = span.clone().and_then(|s| field_at(text, s.start)).unwrap_or_else(|| "(file)".to_string());
        ProfileError::Parse {
            source_name: source_name.to_string(),
            field,
            message: e.message().trim().to_string(),
            location: span.map(|s| line_col(text, s.start)),
        }
    })?;
    let invalid = |field: &str, message: String, fix: &str| ProfileError::Invalid {
        source_name: source_name.to_string(),
        field: field.to_string(),
        message,
        fix: fix.to_string(),
    };
    let positive = |field: &str, v: f64| -> Result<f64, ProfileError> {
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(invalid(field, format!("{v} must be a positive number"), "give the value from a measurement or the datasheet"))
        }
    };
    let share = |field: &str, v: f64| -> Result<f64, ProfileError> {
        if v.is_finite() && v > 0.0 && v <= 1.0 {
            Ok(v)
        } else {
            Err(invalid(field, format!("{v} must be in (0, 1]"), "give the achieved share of the peak, e.g. 0.8"))
        }
    };
    let count = |field: &str, v: usize| -> Result<usize, ProfileError> {
        if v == 0 {
            Err(invalid(field, "0 must be at least 1".into(), "give a positive integer"))
        } else {
            Ok(v)
        }
    };
    let g = &raw.gpu;
    let sms = count("gpu.sms", g.sms)?;
    let tile_m = count("gpu.gemm.tile_m", g.gemm.tile_m)?;
    let tile_n = count("gpu.gemm.tile_n", g.gemm.tile_n)?;
    if let Some(k) = g.gemm.k_half {
        if !(k.is_finite() && k >= 0.0) {
            return Err(invalid("gpu.gemm.k_half", format!("{k} must be a number >= 0"), "give e.g. 128, or remove it to fit it to two or more points"));
        }
    }
    let fit_dtype = |name: &str, d: &DtypeToml| -> Result<GemmModel, ProfileError> {
        let peak = positive(&format!("gpu.gemm.{name}.peak_tflops"), d.peak_tflops)? * 1e12;
        for (i, p) in d.points.iter().enumerate() {
            let f = format!("gpu.gemm.{name}.points[{i}]");
            count(&format!("{f}.m"), p.m)?;
            count(&format!("{f}.n"), p.n)?;
            count(&format!("{f}.k"), p.k)?;
            count(&format!("{f}.batch"), p.batch)?;
            let t = positive(&format!("{f}.tflops"), p.tflops)?;
            if t * 1e12 > peak {
                return Err(invalid(&format!("{f}.tflops"), format!("{t} exceeds peak_tflops {}", d.peak_tflops),
                    "check the measurement and the peak (dense, not sparse)"));
            }
        }
        let base = GemmModel { peak_flops: peak, eff_max: 1.0, k_half: g.gemm.k_half.unwrap_or(0.0), tile_m, tile_n, sms, points: d.points.clone() };
        match (&d.efficiency, d.points.is_empty()) {
            (Some(_), false) => Err(invalid(&format!("gpu.gemm.{name}.efficiency"),
                "both efficiency and measured points are given".into(), "remove efficiency: it is fitted to the points")),
            (Some(e), true) => {
                let e = share(&format!("gpu.gemm.{name}.efficiency"), *e)?;
                if g.gemm.k_half.is_none() {
                    return Err(invalid("gpu.gemm.k_half", "needed when a dtype has no measured points".into(), "give k_half, e.g. 128"));
                }
                Ok(GemmModel { eff_max: e, ..base })
            }
            (None, true) => Err(invalid(&format!("gpu.gemm.{name}"), "has neither measured points nor an efficiency".into(),
                "add points = [{ m = 8192, n = 8192, k = 8192, tflops = ..., source = \"...\" }], or efficiency = 0.8")),
            (None, false) => fit(base, g.gemm.k_half).map_err(|m| invalid("gpu.gemm.k_half", m,
                "give k_half (e.g. 128) when fewer than two distinct k are measured")),
        }
    };
    let bf16 = fit_dtype("bf16", &g.gemm.bf16)?;
    let f32 = fit_dtype("f32", &g.gemm.f32)?;
    let gpu = GpuProfile {
        memory_bytes: positive("gpu.memory_gib", g.memory_gib)? * 1024.0 * 1024.0 * 1024.0,
        sms,
        launch_s: {
            if !(g.launch_us.is_finite() && g.launch_us >= 0.0) {
                return Err(invalid("gpu.launch_us", format!("{} must be a number >= 0", g.launch_us), "give the launch overhead in microseconds, e.g. 4"));
            }
            g.launch_us * 1e-6
        },
        mem_bandwidth: positive("gpu.hbm_tbps", g.hbm_tbps)? * 1e12 * share("gpu.hbm_efficiency", g.hbm_efficiency)?,
        vector_flops: positive("gpu.vector_tflops", g.vector_tflops)? * 1e12,
        bf16,
        f32,
        kernels: match &raw.kernels {
            None => KernelProfile::default(),
            Some(k) => {
                for (field, v) in [("kernels.host_sync_us", k.host_sync_us), ("kernels.host_op_us", k.host_op_us), ("kernels.host_launch_us", k.host_launch_us)] {
                    if !(v.is_finite() && v >= 0.0) {
                        return Err(invalid(field, format!("{v} must be a number >= 0"), "give microseconds, e.g. 5"));
                    }
                }
                let host_bandwidth = match k.host_gbps {
                    Some(v) => positive("kernels.host_gbps", v)? * 1e9,
                    None => f64::INFINITY,
                };
                let mut classes = [KernelClassParams::default(); 15];
                for ((slot, given), class) in classes.iter_mut().zip(k.classes()).zip(KernelClass::ALL) {
                    if let Some(c) = given {
                        let f = format!("kernels.{}", class.as_str());
                        share(&format!("{f}.bandwidth_share"), c.bandwidth_share)?;
                        if let Some(b) = c.bf16_bandwidth_share {
                            share(&format!("{f}.bf16_bandwidth_share"), b)?;
                        }
                        if let Some(g) = c.host_gbps {
                            positive(&format!("{f}.host_gbps"), g)?;
                        }
                        if !(c.fixed_us.is_finite() && c.fixed_us >= 0.0) {
                            return Err(invalid(&format!("{f}.fixed_us"), format!("{} must be a number >= 0", c.fixed_us), "give microseconds"));
                        }
                        *slot = c;
                    }
                }
                if let Some(f) = k.f32_output_share {
                    positive("kernels.f32_output_share", f)?;
                }
                let mut f32_output_by_k = k.f32_output_by_k.clone();
                f32_output_by_k.sort_by_key(|p| p.k);
                for (i, p) in f32_output_by_k.iter().enumerate() {
                    let f = format!("kernels.f32_output_by_k (k = {})", p.k);
                    if p.k == 0 || (i > 0 && f32_output_by_k[i - 1].k == p.k) {
                        return Err(invalid(&f, format!("k {} is zero or given twice", p.k), "give each reduction length once, e.g. k = 80"));
                    }
                    positive(&format!("{f}.write_share"), p.write_share)?;
                    positive(&format!("{f}.add_share"), p.add_share)?;
                }
                let zero_row_gain = k.zero_row_gain.unwrap_or_default();
                for pass in GemmPass::ALL {
                    let g = zero_row_gain.of(pass);
                    if !(g.is_finite() && (0.0..=4.0).contains(&g)) {
                        return Err(invalid(&format!("kernels.zero_row_gain.{}", pass.as_str()), format!("{g} must be a number in [0, 4]"), "give the speed-up per share of zero rows, e.g. 0.08, or 0 for none"));
                    }
                }
                KernelProfile {
                    host_sync_s: k.host_sync_us * 1e-6,
                    host_bandwidth,
                    gemm_call_s: k.gemm_call_us * 1e-6,
                    host_op_s: k.host_op_us * 1e-6,
                    host_launch_s: k.host_launch_us * 1e-6,
                    f32_output_share: k.f32_output_share,
                    f32_output_by_k,
                    zero_row_gain,
                    classes,
                    source: k.source.clone(),
                }
            }
        },
    };
    let t = &raw.topology;
    let topology = Topology {
        gpus_per_node: count("topology.gpus_per_node", t.gpus_per_node)?,
        nodes: count("topology.nodes", t.nodes)?,
        intra: t.intra_node,
        inter: t.inter_node,
        nics_per_node: count("topology.nics_per_node", t.nics_per_node)?,
    };
    if topology.nics_per_node > topology.gpus_per_node {
        return Err(invalid("topology.nics_per_node", format!("{} NICs for {} GPUs per node", topology.nics_per_node, topology.gpus_per_node),
            "give at most one NIC per GPU"));
    }
    let link = |kind: LinkKind, field: &str| -> Result<LinkProfile, ProfileError> {
        let l = match kind {
            LinkKind::Nvlink => &raw.links.nvlink,
            LinkKind::Infiniband => &raw.links.infiniband,
            LinkKind::Ethernet => &raw.links.ethernet,
        };
        let Some(l) = l else {
            return Err(invalid(field, format!("names link {:?} but there is no [links.{}] table", kind.as_str(), kind.as_str()),
                &format!("add [links.{}] with bandwidth_gbps and the four collective tables", kind.as_str())));
        };
        let name = kind.as_str();
        let bandwidth = positive(&format!("links.{name}.bandwidth_gbps"), l.bandwidth_gbps)? * 1e9;
        let params = [l.all_to_all, l.all_reduce, l.all_gather, l.reduce_scatter];
        for (p, k) in params.iter().zip(CollectiveKind::ALL) {
            let f = format!("links.{name}.{}", k.as_str());
            for (v, sub) in [(p.latency_us, "latency_us"), (p.step_us, "step_us")] {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(invalid(&format!("{f}.{sub}"), format!("{v} must be a number >= 0"), "give microseconds"));
                }
            }
            share(&format!("{f}.efficiency"), p.efficiency)?;
        }
        Ok(LinkProfile { kind, bandwidth, collectives: params })
    };
    let intra = link(topology.intra, "topology.intra_node")?;
    let inter = link(topology.inter, "topology.inter_node")?;
    if topology.intra == topology.inter {
        return Err(invalid("topology.inter_node", format!("is the same link kind as intra_node ({})", topology.intra.as_str()),
            "use a different kind between nodes, e.g. \"infiniband\""));
    }
    Ok(Profile { name: raw.name, device: raw.device, calibrated: raw.calibrated, date: raw.date, gpu, topology, intra, inter })
}

/// Fit `eff_max` (and `k_half` when not given) to the measured points by least squares on
/// the log of the throughput. `k_half` needs two or more distinct `k`.
fn fit(base: GemmModel, k_half: Option<f64>) -> Result<GemmModel, String> {
    // Degenerate shapes (a side below FIT_MIN_SIDE, e.g. the router's n = n_experts) run
    // on other kernels than the tile model describes; they act through the nearest-point
    // correction only, unless nothing else was measured.
    let regular: Vec<&GemmPoint> = base.points.iter().filter(|p| p.m.min(p.n).min(p.k) >= FIT_MIN_SIDE).collect();
    let fit_points: Vec<&GemmPoint> = if regular.is_empty() { base.points.iter().collect() } else { regular };
    let fit_eff = |k_half: f64| -> (f64, f64) {
        let m = GemmModel { eff_max: 1.0, k_half, ..base.clone() };
        let logs: Vec<f64> = fit_points.iter().map(|p| (p.tflops * 1e12 / (m.peak_flops * m.shape_term(p.m, p.n, p.k, p.batch))).ln()).collect();
        let mean = logs.iter().sum::<f64>() / logs.len() as f64;
        let err = logs.iter().map(|l| (l - mean).powi(2)).sum::<f64>();
        (mean.exp(), err)
    };
    let k_half = match k_half {
        Some(k) => k,
        None => {
            let mut ks: Vec<usize> = fit_points.iter().map(|p| p.k).collect();
            ks.sort_unstable();
            ks.dedup();
            if ks.len() < 2 {
                return Err(format!("cannot be fitted from {} measured k value(s)", ks.len()));
            }
            // A log grid from 1 to 16384 in steps of 2^(1/8) is fine enough for a curve
            // whose shape changes slowly with k_half.
            (0..=112).map(|i| 2f64.powf(i as f64 / 8.0)).min_by(|a, b| fit_eff(*a).1.total_cmp(&fit_eff(*b).1)).unwrap_or(128.0)
        }
    };
    let (eff_max, _) = fit_eff(k_half);
    if !(eff_max > 0.0 && eff_max <= 1.0) {
        return Err(format!("the points imply an efficiency of {eff_max:.3} at best, outside (0, 1]"));
    }
    Ok(GemmModel { eff_max, k_half, ..base })
}

/// The dotted key (`gpu.hbm_tbps`) whose value sits at `offset`, from the nearest table
/// header above it and the key on its line.
fn field_at(text: &str, offset: usize) -> Option<String> {
    let before = &text[..offset.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |p| p + 1);
    let line = text[line_start..].lines().next()?;
    let table = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let trimmed = line.trim();
    if trimmed.starts_with('[') {
        return Some(trimmed.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    }
    let key = line.split_once('=').map(|(k, _)| k.trim()).filter(|k| !k.is_empty() && !k.starts_with('#'));
    match (table, key) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (None, Some(k)) => Some(k.to_string()),
        (Some(t), None) => Some(t),
        (None, None) => None,
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.len(), |p| before.len() - p - 1) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_names_map_to_their_built_in_profiles() {
        assert_eq!(builtin_for_device("NVIDIA H200"), Some("h200"));
        assert_eq!(builtin_for_device("NVIDIA H100 80GB HBM3"), Some("h100"));
        assert_eq!(builtin_for_device("NVIDIA A100-SXM4-80GB"), None);
        for name in ["h100", "h200"] {
            assert!(builtin_text(name).is_some() && builtin_text(&format!("{name}-datasheet")).is_some());
        }
    }

    #[test]
    fn builtin_profiles_parse_and_reproduce_their_measured_gemm() {
        for (name, _) in BUILTIN {
            let p = resolve(name).expect("built-in profile parses");
            for pt in &p.gpu.bf16.points {
                let pred = p.gpu.bf16.peak_flops * p.gpu.bf16.efficiency(pt.m, pt.n, pt.k, pt.batch) / 1e12;
                assert!((pred - pt.tflops).abs() / pt.tflops < 1e-9, "{name}: {pred} vs {}", pt.tflops);
            }
        }
    }

    #[test]
    fn efficiency_falls_for_small_and_ragged_shapes() {
        let p = resolve("h100").expect("parses");
        let g = &p.gpu.bf16;
        let big = g.efficiency(8192, 8192, 8192, 1);
        assert!(g.efficiency(8192, 8192, 64, 1) < big, "short k");
        // 130 rows fill the same 2 x 64 tiles as 256 rows, mostly with padding.
        assert!(g.efficiency(130, 8192, 8192, 1) < 0.6 * g.efficiency(256, 8192, 8192, 1), "a ragged tile");
        assert!(g.efficiency(128, 128, 8192, 1) < big, "one tile leaves most SMs idle");
    }

    #[test]
    fn k_half_is_fitted_from_two_shapes() {
        let peak = 1000e12;
        let truth = GemmModel { peak_flops: peak, eff_max: 0.8, k_half: 256.0, tile_m: 128, tile_n: 128, sms: 132, points: vec![] };
        let pts: Vec<GemmPoint> = [512usize, 8192]
            .iter()
            .map(|&k| GemmPoint { m: 8192, n: 8192, k, batch: 1, tflops: truth.predicted_tflops(8192, 8192, k), source: "synthetic".into() })
            .collect();
        let fitted = fit(GemmModel { points: pts, eff_max: 1.0, k_half: 0.0, ..truth.clone() }, None).expect("fits");
        assert!((fitted.k_half - 256.0).abs() < 1e-6, "k_half {}", fitted.k_half);
        assert!((fitted.eff_max - 0.8).abs() < 1e-9);
    }

    #[test]
    fn the_kernels_table_is_optional_and_checked() {
        let ds = resolve("h200-datasheet").expect("parses");
        assert_eq!(ds.gpu.kernels, KernelProfile::default());
        let fitted = resolve("h200").expect("parses");
        assert!(fitted.gpu.kernels.host_sync_s > 0.0);
        assert!(fitted.gpu.kernels.class(KernelClass::Layernorm).bandwidth_share < 1.0);
        assert_eq!(*fitted.gpu.kernels.class(KernelClass::Elementwise), KernelClassParams::default());
        let text = include_str!("../../../profiles/h200-datasheet.toml");
        let bad = format!("{text}\n[kernels]\nhost_sync_us = 10.0\n\n[kernels.act]\nbandwidth_share = 1.5\n");
        assert_eq!(parse(&bad, "t").unwrap_err().field(), Some("kernels.act.bandwidth_share"));
        let bad = format!("{text}\n[kernels]\nhost_sync_us = 10.0\n\n[kernels.act]\nbandwidth_share = 0.5\nbf16_bandwidth_share = 0.0\n");
        assert_eq!(parse(&bad, "t").unwrap_err().field(), Some("kernels.act.bf16_bandwidth_share"));
        let unknown = format!("{text}\n[kernels]\nhost_sync = 10.0\n");
        assert!(parse(&unknown, "t").is_err());
        let point = |k, w| format!("\n[[kernels.f32_output_by_k]]\nk = {k}\nwrite_share = {w}\nadd_share = 0.5\n");
        let twice = format!("{text}\n[kernels]\nhost_sync_us = 10.0\n{}{}", point(80, 1.0), point(80, 0.9));
        assert_eq!(parse(&twice, "t").unwrap_err().field(), Some("kernels.f32_output_by_k (k = 80)"));
        let zero = format!("{text}\n[kernels]\nhost_sync_us = 10.0\n{}", point(80, 0.0));
        assert_eq!(parse(&zero, "t").unwrap_err().field(), Some("kernels.f32_output_by_k (k = 80).write_share"));
    }

    #[test]
    fn f32_output_points_are_interpolated_in_log_k_and_clamped_at_the_ends() {
        let bw = 4e12;
        let pt = |k, write_share, add_share| F32OutputPoint { k, write_share, add_share };
        let mut k = KernelProfile { f32_output_share: Some(3.0), f32_output_by_k: vec![pt(80, 0.5, 0.25), pt(1280, 1.0, 2.0)], ..KernelProfile::default() };
        let per_byte = |k: &KernelProfile, rows, add| k.f32_output_seconds(1.0, rows, add, bw);
        assert_eq!(per_byte(&k, 40, false), 1.0 / (bw * 0.5));
        assert_eq!(per_byte(&k, 80, true), 1.0 / (bw * 0.25));
        assert_eq!(per_byte(&k, 9000, true), 1.0 / (bw * 2.0));
        // 320 is halfway from 80 to 1,280 in log k: halfway in seconds per byte.
        let mid = (1.0 / (bw * 0.5) + 1.0 / (bw * 1.0)) / 2.0;
        assert!((per_byte(&k, 320, false) - mid).abs() < 1e-9 * mid);
        // Without points the one share holds at every k; with neither, nothing is priced.
        k.f32_output_by_k.clear();
        assert_eq!(per_byte(&k, 80, true), 1.0 / (bw * 3.0));
        k.f32_output_share = None;
        assert_eq!(per_byte(&k, 80, true), 0.0);
    }

    #[test]
    fn thin_points_stay_out_of_the_curve_fit() {
        // A router-like 8-column point far below the curve neither moves eff_max nor k_half,
        // and still comes back exactly at its own shape.
        let p = resolve("h200").expect("parses");
        let g = &p.gpu.f32;
        let regular: Vec<GemmPoint> = g.points.iter().filter(|q| q.m.min(q.n).min(q.k) >= FIT_MIN_SIDE).cloned().collect();
        let refit = fit(GemmModel { points: regular, eff_max: 1.0, ..g.clone() }, None).expect("fits");
        assert!((refit.eff_max - g.eff_max).abs() < 1e-12 && refit.k_half == g.k_half);
        let thin = g.points.iter().find(|q| q.n == 8).expect("gate point");
        assert!((g.predicted_tflops(thin.m, thin.n, thin.k) - thin.tflops).abs() / thin.tflops < 1e-9);
    }
}
