//! From measurements to a profile: what `moelab calibrate` measured on real GPUs (GEMM
//! throughput per shape and element type, back-to-back kernel gap, copy bandwidth, NCCL
//! collective times per size, one host round trip, the plan kernels' time per kernel class)
//! and how it becomes a hardware profile TOML. The base profile
//! supplies everything not measured (datasheet peaks, the inter-node link, topology); the
//! result parses with [`super::profile::parse`] and says `calibrated = true`.
//!
//! This half needs no GPU, so the fits and the rendering are tested everywhere; the cuda
//! backend's `calibrate` module takes the measurements.

use super::profile::{self, CollectiveKind, GemmDtype, GemmPass, KernelClass, F32OutputPoint, ProfileError, ZeroRowGain};
use serde::{Deserialize, Deserializer, Serialize};
use toml::{Table, Value};

/// One measured GEMM: `[m, k] x [k, n]`, median over repetitions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GemmMeasure {
    /// Element type (bf16 with f32 accumulation, or f32).
    #[serde(serialize_with = "dtype_name", deserialize_with = "dtype_from")]
    pub dtype: GemmDtype,
    /// Output rows.
    pub m: usize,
    /// Output columns.
    pub n: usize,
    /// Reduction length.
    pub k: usize,
    /// Products per call (a strided-batched GEMM over expert blocks); 1 for one GEMM.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub batch: usize,
    /// Achieved TFLOP/s.
    pub tflops: f64,
}

fn one() -> usize {
    1
}

fn is_one(v: &usize) -> bool {
    *v == 1
}

fn dtype_name<S: serde::Serializer>(d: &GemmDtype, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match d {
        GemmDtype::Bf16 => "bf16",
        GemmDtype::F32 => "f32",
    })
}

/// Weight-gradient GEMM shapes `(m, n, k)` of the f32-output sweep (`c = a^T b` over `k` rows,
/// as the expert and dense backward computes `dw = x^T dy`): the mixtral-ish expert (d 4,096,
/// f 14,336) at MPMoE's chunk rows (1,280 at 4 chunks, 640 at 8, 320, 160 and 80 at 16, 32
/// and 64), the small-tokens rows (512), a whole capacity block (5,120) and a dense layer's
/// 16,384 tokens, both ways round, and the fine-grained expert (d 2,048, f 1,408).
pub const F32_OUTPUT_SHAPES: [(usize, usize, usize); 13] = [
    (4096, 14336, 1280),
    (4096, 14336, 640),
    (4096, 14336, 320),
    (4096, 14336, 160),
    (4096, 14336, 80),
    (4096, 14336, 16384),
    (14336, 4096, 640),
    (4096, 14336, 512),
    (4096, 14336, 5120),
    (14336, 4096, 5120),
    (2048, 1408, 2560),
    (1408, 2048, 2560),
    (2048, 1408, 640),
];

/// One bf16 weight-gradient GEMM timed three ways (median seconds): into a bf16 output (as
/// the GEMM sweep's points), into an f32 output, and into an f32 output it adds to (beta 1,
/// the gradient accumulation of MPMoE's chunks). Gradients are stored f32 in bf16 plans, so
/// the f32 output's extra bytes are part of every backward GEMM's time. Since 2026-11-24
/// 17:00 UTC the sweep times the three in rounds and the f32 forms are the bf16 median plus
/// the median of their paired differences (earlier sweeps: one median per form).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct F32OutputMeasure {
    /// Output rows.
    pub m: usize,
    /// Output columns.
    pub n: usize,
    /// Reduction length.
    pub k: usize,
    /// Seconds with a bf16 output.
    pub bf16_s: f64,
    /// Seconds with an f32 output.
    pub f32_s: f64,
    /// Seconds with an f32 output added to (read and written).
    pub f32_acc_s: f64,
    /// The f32 forms were timed in rounds with the bf16 one and their extra time is the
    /// median of paired differences (false in sweeps before 2026-11-24 17:00 UTC).
    #[serde(default)]
    pub paired: bool,
}

impl F32OutputMeasure {
    /// Bytes an f32 output moves beyond a bf16 one: 2 per element written, 6 when it is also
    /// read (beta 1).
    pub fn extra_bytes(m: usize, n: usize, accumulate: bool) -> f64 {
        (m * n) as f64 * if accumulate { 6.0 } else { 2.0 }
    }

    /// The f32 output's extra bytes and extra seconds over the bf16 output, written or
    /// (`accumulate`) added to: one point of the fits below.
    fn extra(&self, accumulate: bool) -> (f64, f64) {
        let t = if accumulate { self.f32_acc_s } else { self.f32_s };
        (F32OutputMeasure::extra_bytes(self.m, self.n, accumulate), t - self.bf16_s)
    }
}

/// The share of the copy rate at which an f32 output's extra bytes move (see
/// [`F32OutputMeasure::extra_bytes`]): the least-squares fit through the origin of the extra
/// seconds over the extra bytes, both output forms of every shape. `None` without measures
/// or when the f32 outputs cost nothing measurable.
pub fn f32_output_share(measures: &[F32OutputMeasure], copy_bps: f64) -> Option<f64> {
    share_through_origin(measures.iter().flat_map(|m| [m.extra(false), m.extra(true)]), copy_bps)
}

/// Shortest time the extra bytes of an f32 output written take at the copy rate for a measure
/// to enter [`f32_output_by_k`]: the small shapes' 1-3 us are the size of the timing noise.
pub const F32_OUTPUT_RESOLVED_S: f64 = 10e-6;

/// Smallest share of the bf16 GEMM's own time those bytes must take too when the three forms
/// were timed one after another rather than paired ([`F32OutputMeasure::paired`]): a
/// power-capped GPU's clocks move a long GEMM by 10-20% between them (4096 x 14336 over
/// 16,384 rows: an f32 output 0.16 of the copy rate on one unpaired H200 sweep; paired, 1.97).
pub const F32_OUTPUT_RESOLVED_SHARE: f64 = 0.10;

/// Whether a measure's f32 output costs enough to be told from the timing noise (see
/// [`F32_OUTPUT_RESOLVED_S`] and [`F32_OUTPUT_RESOLVED_SHARE`]).
fn f32_output_resolved(m: &F32OutputMeasure, copy_bps: f64) -> bool {
    let t = F32OutputMeasure::extra_bytes(m.m, m.n, false) / copy_bps;
    t >= F32_OUTPUT_RESOLVED_S && (m.paired || t >= F32_OUTPUT_RESOLVED_SHARE * m.bf16_s)
}

/// [`f32_output_share`] fitted at each reduction length the sweep timed, for an output
/// written and one added to apart, from the measures [`f32_output_resolved`] keeps; a length
/// either fit finds free is left out. Sorted by `k`.
pub fn f32_output_by_k(measures: &[F32OutputMeasure], copy_bps: f64) -> Vec<F32OutputPoint> {
    let resolved: Vec<&F32OutputMeasure> = measures.iter().filter(|m| f32_output_resolved(m, copy_bps)).collect();
    let mut ks: Vec<usize> = resolved.iter().map(|m| m.k).collect();
    ks.sort_unstable();
    ks.dedup();
    ks.into_iter()
        .filter_map(|k| {
            let at = || resolved.iter().filter(move |m| m.k == k);
            let write_share = share_through_origin(at().map(|m| m.extra(false)), copy_bps)?;
            let add_share = share_through_origin(at().map(|m| m.extra(true)), copy_bps)?;
            Some(F32OutputPoint { k, write_share, add_share })
        })
        .collect()
}

/// The share of `copy_bps` at which (bytes, seconds) pairs move: the least-squares fit
/// through the origin of seconds over bytes, clamped to [0.01, 4]; `None` when they cost
/// nothing measurable.
fn share_through_origin(pairs: impl Iterator<Item = (f64, f64)>, copy_bps: f64) -> Option<f64> {
    let (bt, bb) = pairs.fold((0.0, 0.0), |(bt, bb), (b, t)| (bt + b * t, bb + b * b));
    let per_byte = bt / bb;
    (per_byte.is_finite() && per_byte > 0.0 && copy_bps > 0.0).then(|| (1.0 / (per_byte * copy_bps)).clamp(0.01, 4.0))
}

/// One measured collective: `bytes` of payload per member (as plans count it, see
/// [`CollectiveKind::wire_bytes`]) over `members` GPUs took `seconds` (median).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CollectiveMeasure {
    /// Which collective.
    #[serde(serialize_with = "kind_name", deserialize_with = "kind_from")]
    pub kind: CollectiveKind,
    /// GPUs taking part.
    pub members: usize,
    /// Payload per member, bytes.
    pub bytes: f64,
    /// Median time, seconds.
    pub seconds: f64,
}

fn kind_name<S: serde::Serializer>(k: &CollectiveKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(k.as_str())
}

fn kind_from<'de, D: Deserializer<'de>>(d: D) -> Result<CollectiveKind, D::Error> {
    let name = String::deserialize(d)?;
    CollectiveKind::ALL.into_iter().find(|k| k.as_str() == name).ok_or_else(|| serde::de::Error::custom(format!("unknown collective {name:?}")))
}

fn dtype_from<'de, D: Deserializer<'de>>(d: D) -> Result<GemmDtype, D::Error> {
    match String::deserialize(d)?.as_str() {
        "bf16" => Ok(GemmDtype::Bf16),
        "f32" => Ok(GemmDtype::F32),
        other => Err(serde::de::Error::custom(format!("unknown GEMM dtype {other:?} (bf16 or f32)"))),
    }
}

/// Sizes of the kernel-class sweep: one mixtral-ish MoE layer on one GPU (16,384 tokens of
/// width 4,096, top-2 at capacity 1.25 = 40,960 expert rows of hidden width 14,336) and an
/// optimizer step over 2^28 parameters.
pub const KERNEL_TOKENS: usize = 16384;
/// Model width of the sweep.
pub const KERNEL_WIDTH: usize = 4096;
/// Choices per token of the sweep.
pub const KERNEL_TOP_K: usize = 2;
/// Expert rows of the sweep (capacity 1.25 x top-2 x tokens).
pub const KERNEL_EXPERT_ROWS: usize = 40960;
/// Expert hidden width of the sweep.
pub const KERNEL_HIDDEN: usize = 14336;
/// Parameters of the sweep's optimizer step.
pub const KERNEL_PARAMS: usize = 1 << 28;

/// Bytes the plan counts for the op of `class` at the sweep's sizes (`op.bytes`, the numbers
/// the sim divides by the class's bandwidth), or `None` for classes the sweep does not time.
/// Pinned against a planned mixtral-ish layer by a test, so the two cannot drift apart.
pub fn kernel_bytes(class: KernelClass) -> Option<f64> {
    let t = (KERNEL_TOKENS * KERNEL_WIDTH * 4) as f64;
    let h = (KERNEL_EXPERT_ROWS * KERNEL_HIDDEN * 4) as f64;
    Some(match class {
        KernelClass::Layernorm | KernelClass::Data => 2.0 * t,
        KernelClass::LayernormBwd | KernelClass::Combine => 4.0 * t,
        KernelClass::CombineBwd => 5.0 * t,
        KernelClass::Loss => 3.0 * t,
        KernelClass::Act => 2.0 * h,
        KernelClass::ActBwd => 3.0 * h,
        KernelClass::Layout => 2.0 * (KERNEL_EXPERT_ROWS * KERNEL_WIDTH * 4) as f64,
        KernelClass::Optimizer => 7.0 * 4.0 * KERNEL_PARAMS as f64,
        KernelClass::Route | KernelClass::RouteBwd | KernelClass::Softmax | KernelClass::SoftmaxBwd | KernelClass::Elementwise => return None,
    })
}

/// Kernel launches the sim charges the op of `class` (the rest of a measured time is its
/// memory traffic).
pub fn kernel_launches(class: KernelClass) -> usize {
    match class {
        KernelClass::LayernormBwd | KernelClass::CombineBwd => 2,
        _ => 1,
    }
}

/// One timed kernel class: the plan kernels the cuda executor runs for one op of `class` at
/// the sweep's sizes, back to back on one stream (median over repetitions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelMeasure {
    /// The class, as `[kernels.<class>]` spells it.
    pub class: String,
    /// Median seconds.
    pub seconds: f64,
}

/// A class's achieved share of the copy bandwidth from its measured time: `kernel_bytes /
/// (copy_bps * (seconds - launches * launch_s))`, in (0, 1]; `None` for an unknown class or a
/// time not above the launch gaps.
pub fn class_share(m: &KernelMeasure, copy_bps: f64, launch_s: f64) -> Option<f64> {
    let class = KernelClass::ALL.into_iter().find(|c| c.as_str() == m.class)?;
    let bytes = kernel_bytes(class)?;
    let busy = m.seconds - kernel_launches(class) as f64 * launch_s;
    (busy > 0.0 && copy_bps > 0.0).then(|| (bytes / (copy_bps * busy)).clamp(1e-4, 1.0))
}

/// The zero-row gains of a zero-rows probe ([`ZeroRowsMeasure`]): per pass, the
/// least-squares slope through the origin of each layer's speed-up over its whole-rows time
/// (`tflops / tflops at kept 1 - 1`) against its zero share (`1 - kept`), never below 0.
/// `None` without a pass measured at kept 1 and below.
pub fn zero_row_gain(measures: &[ZeroRowsMeasure]) -> Option<ZeroRowGain> {
    let mut gain = ZeroRowGain::default();
    let mut fitted = false;
    for pass in GemmPass::ALL {
        let (mut gz, mut zz) = (0.0, 0.0);
        for m in measures.iter().filter(|m| m.pass == pass && m.kept < 1.0) {
            let same_layer = |w: &&ZeroRowsMeasure| w.pass == pass && (w.experts, w.rows, w.d_in, w.d_out) == (m.experts, m.rows, m.d_in, m.d_out);
            let Some(whole) = measures.iter().filter(same_layer).find(|w| w.kept >= 1.0) else { continue };
            let z = 1.0 - m.kept.max(0.0);
            gz += (m.tflops / whole.tflops - 1.0) * z;
            zz += z * z;
        }
        if zz > 0.0 && gz.is_finite() {
            fitted = true;
            let g = (gz / zz).clamp(0.0, 4.0);
            match pass {
                GemmPass::Forward => gain.forward = g,
                GemmPass::InputGrad => gain.input_grad = g,
                GemmPass::WeightGrad => gain.weight_grad = g,
            }
        }
    }
    fitted.then_some(gain)
}

/// Everything one `moelab calibrate` run measured (its `--json` file holds it, so a
/// profile can be refitted later without the GPU: `moelab calibrate --from`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Device name as the driver reports it.
    pub device: String,
    /// GPUs used for the collectives (1: none measured).
    pub gpus: usize,
    /// When, UTC.
    pub date: String,
    /// GEMM sweep.
    pub gemms: Vec<GemmMeasure>,
    /// Time between the starts of back-to-back tiny kernels on one stream, microseconds.
    pub launch_us: f64,
    /// Device-to-device copy bandwidth (bytes read + written per second), TB/s.
    pub copy_tbps: f64,
    /// Collective sweep (empty on one GPU).
    pub collectives: Vec<CollectiveMeasure>,
    /// One host round trip (4 KiB device-to-host copy, stream sync, next launch) minus the
    /// kernel gap, microseconds; absent in files from before it was measured.
    #[serde(default)]
    pub host_sync_us: Option<f64>,
    /// Host copy rate of the routing tables (pageable device-to-host), GB/s; absent likewise.
    #[serde(default)]
    pub host_gbps: Option<f64>,
    /// The kernel-class sweep (empty in files from before it was measured).
    #[serde(default)]
    pub kernels: Vec<KernelMeasure>,
    /// The f32-output sweep of weight-gradient GEMMs (empty in files from before it was
    /// measured).
    #[serde(default)]
    pub f32_outputs: Vec<F32OutputMeasure>,
    /// All-to-alls launched beside a running GEMM (over every GPU; on one, NCCL's copy to
    /// itself; empty in files from before it was measured): a check of the sim's rule that
    /// such a collective transfers once the GEMM ends; not fitted into the profile.
    #[serde(default)]
    pub beside_gemm: Vec<BesideGemmMeasure>,
    /// Strided-batched expert GEMMs whose input blocks hold real rows only in their first
    /// `kept` share, the rest zero (a capacity plan's padding); empty in files from before it
    /// was measured. Fitted into the profile's `kernels.zero_row_gain` ([`zero_row_gain`]).
    #[serde(default)]
    pub zero_rows: Vec<ZeroRowsMeasure>,
    /// The same GEMMs timed in different surroundings (after themselves, alternating with
    /// device copies, after an idle GPU) and operands (empty in files from before it was
    /// measured). Not fitted into the profile.
    #[serde(default)]
    pub gemm_context: Vec<GemmContextMeasure>,
    /// One host thread's calls while another sits in a blocked pageable download (empty in
    /// files from before it was measured). Not fitted into the profile.
    #[serde(default)]
    pub host_copies: Vec<HostCopyMeasure>,
}

/// A host call of the host-copy probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostCall {
    /// A one-block kernel launch.
    Launch,
    /// A host-to-device copy from pageable memory.
    PageableUpload,
    /// A host-to-device copy from page-locked memory.
    PinnedUpload,
    /// A device-to-host copy into pageable memory.
    PageableDownload,
    /// A device-to-host copy into page-locked memory, then a wait for the stream.
    PinnedDownload,
}

impl HostCall {
    /// Every call, in the probe's order.
    pub const ALL: [HostCall; 5] = [HostCall::Launch, HostCall::PageableUpload, HostCall::PinnedUpload, HostCall::PageableDownload, HostCall::PinnedDownload];
    /// The name in the probe's lines.
    pub fn as_str(self) -> &'static str {
        match self {
            HostCall::Launch => "kernel launch",
            HostCall::PageableUpload => "pageable upload",
            HostCall::PinnedUpload => "pinned upload",
            HostCall::PageableDownload => "pageable download",
            HostCall::PinnedDownload => "pinned download",
        }
    }
}

/// One host call of the host-copy probe, on an idle stream: microseconds (medians) while
/// another thread waits in a pageable download behind queued GEMMs, and without.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HostCopyMeasure {
    /// Which call.
    pub call: HostCall,
    /// The call's host time while the other thread is blocked.
    pub blocked_us: f64,
    /// The call's host time with no other thread blocked.
    pub alone_us: f64,
    /// How long the other thread was blocked.
    pub other_blocked_us: f64,
}

/// What ran on the GPU before a timed GEMM of the context probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GemmContext {
    /// The same GEMM back to back (the sweep's context).
    Sustained,
    /// The same GEMM alternating with device copies (a training step's pattern).
    Alternating,
    /// Nothing: the GPU idle.
    AfterIdle,
}

impl GemmContext {
    /// Every context, in the probe's order.
    pub const ALL: [GemmContext; 3] = [GemmContext::Sustained, GemmContext::Alternating, GemmContext::AfterIdle];
    /// The name in the probe's lines.
    pub fn as_str(self) -> &'static str {
        match self {
            GemmContext::Sustained => "itself",
            GemmContext::Alternating => "itself alternating with copies",
            GemmContext::AfterIdle => "an idle GPU",
        }
    }
}

/// Operand values of a probe GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GemmData {
    /// The sweep's hash values, uniform in (-0.05, 0.05).
    Hash,
    /// Standard normal values (the cuda backend's batch draw).
    Normal,
}

impl GemmData {
    /// The name in the probe's lines.
    pub fn as_str(self) -> &'static str {
        match self {
            GemmData::Hash => "hash",
            GemmData::Normal => "normal",
        }
    }
}

/// One GEMM of the context probe: `batch` x `[m, k] x [k, n]` (bf16, `Nn`), rows past
/// `kept` of each block zero, at `tflops` (median, counting every row).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GemmContextMeasure {
    /// Rows per block.
    pub m: usize,
    /// Output columns.
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// Blocks (1: one GEMM).
    pub batch: usize,
    /// Operand values.
    pub data: GemmData,
    /// What ran before.
    pub context: GemmContext,
    /// Share of each block's rows that hold data.
    pub kept: f64,
    /// TFLOP/s over all rows.
    pub tflops: f64,
}

fn forward_pass() -> GemmPass {
    GemmPass::Forward
}

/// One strided-batched bf16 GEMM of the zero-rows probe: pass `pass` of an expert layer of
/// `experts` blocks of `rows` rows (`d_in -> d_out`) whose `x` and `dy` hold data in the
/// first `kept` share of each block's rows, the rest zero, at `tflops` (median, counting
/// every row). Files of the first probe (2026-11-24 08:22/08:25 UTC, forward only, one kept
/// share after another) name the forward GEMM's `batch`, `m`, `k`, `n`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ZeroRowsMeasure {
    /// Blocks (experts).
    #[serde(alias = "batch")]
    pub experts: usize,
    /// Rows per block.
    #[serde(alias = "m")]
    pub rows: usize,
    /// Input width.
    #[serde(alias = "k")]
    pub d_in: usize,
    /// Output width.
    #[serde(alias = "n")]
    pub d_out: usize,
    /// Which GEMM of the layer.
    #[serde(default = "forward_pass")]
    pub pass: GemmPass,
    /// Share of each block's rows that hold data.
    pub kept: f64,
    /// TFLOP/s over all rows.
    pub tflops: f64,
}

/// An all-to-all of `bytes` per GPU over `members` GPUs on a high-priority stream beside a
/// GEMM on another stream of each GPU (medians, microseconds, worst GPU): alone, launched
/// just before the GEMM, and launched `offset_us` after the GEMM began.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BesideGemmMeasure {
    /// The GEMM, in words (shape, form, dtype).
    pub gemm: String,
    /// GPUs taking part.
    pub members: usize,
    /// All-to-all payload per GPU, bytes.
    pub bytes: f64,
    /// The GEMM alone.
    pub gemm_us: f64,
    /// The all-to-all alone.
    pub a2a_alone_us: f64,
    /// The all-to-all launched just before the GEMM.
    pub a2a_first_us: f64,
    /// The GEMM beside an all-to-all launched just before it.
    pub gemm_with_a2a_us: f64,
    /// How long after the GEMM's launch the late all-to-all was launched.
    pub offset_us: f64,
    /// The late all-to-all, from its launch to its end.
    pub a2a_late_us: f64,
    /// The late all-to-all's end after the GEMM's end (negative: it ended first).
    pub late_end_after_gemm_us: f64,
}

/// A collective's fitted `time = latency + wire_bytes / (bandwidth * efficiency)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CollectiveFit {
    /// Which collective.
    #[serde(serialize_with = "kind_name")]
    pub kind: CollectiveKind,
    /// Fitted start-up time, microseconds (>= 0).
    pub latency_us: f64,
    /// Fitted share of the link bandwidth, in (0, 1].
    pub efficiency: f64,
    /// Largest relative error of the fit over the measured sizes.
    pub worst_rel_err: f64,
}

/// Why a calibration cannot become a profile.
#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    /// The base profile does not load.
    #[error(transparent)]
    Base(#[from] ProfileError),
    /// The base profile's text is not the expected TOML shape.
    #[error("base profile {0}: {1}")]
    Shape(String, String),
    /// The rendered profile does not parse (a measurement out of range).
    #[error("the calibrated profile does not load: {0}")]
    Result(ProfileError),
}

/// Fit of one collective kind's measurements on a link of `bandwidth` bytes/s, minimising
/// the squared *relative* error (so a 1 MiB message counts as much as a 512 MiB one).
/// `None` when fewer than two sizes were measured.
pub fn fit_collective(kind: CollectiveKind, measures: &[CollectiveMeasure], bandwidth: f64) -> Option<CollectiveFit> {
    let pts: Vec<(f64, f64)> = measures.iter().filter(|m| m.kind == kind && m.seconds > 0.0).map(|m| (kind.wire_bytes(m.bytes, m.members), m.seconds)).collect();
    if pts.len() < 2 {
        return None;
    }
    // min sum (a u + b v - 1)^2 with u = 1/t, v = x/t: the 2x2 normal equations.
    let (mut suu, mut suv, mut svv, mut su, mut sv) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for (x, t) in &pts {
        let (u, v) = (1.0 / t, x / t);
        suu += u * u;
        suv += u * v;
        svv += v * v;
        su += u;
        sv += v;
    }
    let det = suu * svv - suv * suv;
    if det.abs() <= f64::EPSILON * suu * svv {
        return None;
    }
    let (mut latency, mut slope) = ((su * svv - sv * suv) / det, (suu * sv - suv * su) / det);
    if latency < 0.0 || slope <= 0.0 {
        // Refit through the origin (no start-up time): min sum (b v - 1)^2.
        latency = 0.0;
        slope = sv / svv;
    }
    let efficiency = (1.0 / (slope * bandwidth)).min(1.0);
    let model = |w: f64| latency + w / (bandwidth * efficiency);
    let worst_rel_err = pts.iter().map(|(w, t)| (model(*w) - t).abs() / t).fold(0.0, f64::max);
    Some(CollectiveFit { kind, latency_us: latency * 1e6, efficiency, worst_rel_err })
}

fn table<'a>(t: &'a mut Table, path: &[&str], base: &str) -> Result<&'a mut Table, CalibrationError> {
    let mut cur = t;
    for key in path {
        cur = cur
            .get_mut(*key)
            .and_then(Value::as_table_mut)
            .ok_or_else(|| CalibrationError::Shape(base.to_string(), format!("has no [{}] table", path.join("."))))?;
    }
    Ok(cur)
}

/// The calibrated profile: `base_text` (a profile TOML) with every measured term replaced,
/// named `name`, `calibrated = true`, and a header saying what was measured and what was
/// kept from the base. Returns the TOML text and the collective fits; the text is checked
/// to load.
pub fn render(base_text: &str, base_name: &str, name: &str, cal: &Calibration) -> Result<(String, Vec<CollectiveFit>), CalibrationError> {
    let parsed = profile::parse(base_text, base_name)?;
    let mut root: Table = toml::from_str(base_text).map_err(|e| CalibrationError::Shape(base_name.into(), e.to_string()))?;
    root.insert("name".into(), name.into());
    root.insert("device".into(), cal.device.clone().into());
    root.insert("calibrated".into(), true.into());
    root.insert("date".into(), cal.date.clone().into());
    let source = format!("moelab calibrate on {}, {}", cal.device, cal.date);
    {
        let gpu = table(&mut root, &["gpu"], base_name)?;
        gpu.insert("launch_us".into(), round(cal.launch_us, 3).into());
        let peak = gpu.get("hbm_tbps").and_then(Value::as_float).unwrap_or(parsed.gpu.mem_bandwidth / 1e12);
        gpu.insert("hbm_efficiency".into(), round((cal.copy_tbps / peak).min(1.0), 4).into());
        let gemm = table(gpu, &["gemm"], base_name)?;
        gemm.remove("k_half");
        for (key, dtype) in [("bf16", GemmDtype::Bf16), ("f32", GemmDtype::F32)] {
            let mut pts: Vec<Value> = cal
                .gemms
                .iter()
                .filter(|g| g.dtype == dtype)
                .map(|g| {
                    let mut p = Table::new();
                    p.insert("m".into(), (g.m as i64).into());
                    p.insert("n".into(), (g.n as i64).into());
                    p.insert("k".into(), (g.k as i64).into());
                    if g.batch > 1 {
                        p.insert("batch".into(), (g.batch as i64).into());
                    }
                    p.insert("tflops".into(), round(g.tflops, 2).into());
                    p.insert("source".into(), source.clone().into());
                    Value::Table(p)
                })
                .collect();
            let d = table(gemm, &[key], base_name)?;
            if pts.is_empty() {
                continue;
            }
            // The base's points at shapes the sweep does not time (the attention loop's batched
            // GEMMs, timed with ncu) stay, with their sources, beside the measured ones.
            let swept = |p: &Value| {
                let f = |k: &str| p.get(k).and_then(Value::as_integer);
                cal.gemms.iter().any(|g| {
                    g.dtype == dtype && (Some(g.m as i64), Some(g.n as i64), Some(g.k as i64), g.batch as i64) == (f("m"), f("n"), f("k"), f("batch").unwrap_or(1))
                })
            };
            pts.extend(d.get("points").and_then(Value::as_array).into_iter().flatten().filter(|p| !swept(p)).cloned());
            d.remove("efficiency");
            d.insert("points".into(), Value::Array(pts));
        }
    }
    if cal.host_sync_us.is_some() || cal.host_gbps.is_some() || !cal.kernels.is_empty() || !cal.f32_outputs.is_empty() || !cal.zero_rows.is_empty() {
        // What this run measured replaces the base's terms (the host round trip, each timed
        // class's bandwidth share); the rest of the base's [kernels] table (classes not timed,
        // each class's fixed_us) is kept.
        let copy_bps = cal.copy_tbps.min(root.get("gpu").and_then(|g| g.get("hbm_tbps")).and_then(Value::as_float).unwrap_or(f64::INFINITY)) * 1e12;
        let kernels = root.entry("kernels").or_insert_with(|| Value::Table(Table::new()));
        let kernels = kernels.as_table_mut().ok_or_else(|| CalibrationError::Shape(base_name.into(), "kernels is not a table".into()))?;
        if let Some(v) = cal.host_sync_us {
            kernels.insert("host_sync_us".into(), round(v, 2).into());
        }
        if let Some(v) = cal.host_gbps {
            kernels.insert("host_gbps".into(), round(v, 3).into());
        }
        let old = kernels.get("source").and_then(Value::as_str).map(|s| format!(" (base: {s})")).unwrap_or_default();
        kernels.insert("source".into(), format!("{source}: the host round trip and the timed classes' bandwidth_share; fixed_us and untimed classes kept from {base_name}{old}").into());
        if let Some(share) = f32_output_share(&cal.f32_outputs, copy_bps) {
            kernels.insert("f32_output_share".into(), round(share, 4).into());
        }
        // Points from this sweep replace the base's; a sweep none of whose shapes resolves
        // leaves the fitted share alone to price every k.
        let by_k = f32_output_by_k(&cal.f32_outputs, copy_bps);
        if by_k.is_empty() {
            if !cal.f32_outputs.is_empty() {
                kernels.remove("f32_output_by_k");
            }
        } else {
            let points = by_k.iter().map(|p| {
                let mut t = Table::new();
                t.insert("k".into(), (p.k as i64).into());
                t.insert("write_share".into(), round(p.write_share, 4).into());
                t.insert("add_share".into(), round(p.add_share, 4).into());
                Value::Table(t)
            });
            kernels.insert("f32_output_by_k".into(), Value::Array(points.collect()));
        }
        if let Some(g) = zero_row_gain(&cal.zero_rows) {
            let mut t = Table::new();
            for pass in GemmPass::ALL {
                t.insert(pass.as_str().into(), round(g.of(pass), 4).into());
            }
            kernels.insert("zero_row_gain".into(), Value::Table(t));
        }
        for m in &cal.kernels {
            let Some(share) = class_share(m, copy_bps, cal.launch_us * 1e-6) else { continue };
            let class = kernels.entry(m.class.clone()).or_insert_with(|| Value::Table(Table::new()));
            let class = class.as_table_mut().ok_or_else(|| CalibrationError::Shape(base_name.into(), format!("kernels.{} is not a table", m.class)))?;
            class.insert("bandwidth_share".into(), round(share, 4).into());
        }
    }
    let mut fits = Vec::new();
    if !cal.collectives.is_empty() {
        let intra = parsed.topology.intra.as_str();
        let link = table(&mut root, &["links", intra], base_name)?;
        for kind in CollectiveKind::ALL {
            let Some(f) = fit_collective(kind, &cal.collectives, parsed.intra.bandwidth) else { continue };
            let c = table(link, &[kind.as_str()], base_name)?;
            c.insert("latency_us".into(), round(f.latency_us, 2).into());
            c.insert("step_us".into(), 0.0.into());
            c.insert("efficiency".into(), round(f.efficiency, 4).into());
            fits.push(f);
        }
    }
    let body = toml::to_string(&root).map_err(|e| CalibrationError::Shape(base_name.into(), e.to_string()))?;
    let mut text = format!(
        "# {name}: measured by `moelab calibrate` on {} ({} GPU{}), {}.\n\
         # Measured: gpu.launch_us (back-to-back kernel gap), gpu.hbm_efficiency (device copy\n\
         # bandwidth over the datasheet peak), every gpu.gemm.*.points entry whose source names\n\
         # this run (cuBLAS, median of repetitions; the base's points at shapes the sweep does not\n\
         # time are kept with their sources){}{}{}{}.\n\
         # Kept from the base profile `{base_name}` (datasheet values and stated assumptions): the\n\
         # peaks, memory, SMs, vector FLOP/s, GEMM tile sizes, [kernels] terms not measured, topology{}.\n\n",
        cal.device,
        cal.gpus,
        if cal.gpus == 1 { "" } else { "s" },
        cal.date,
        if fits.is_empty() { "" } else { ", the intra-node collectives (NCCL, latency and bandwidth share fitted per kind; step_us folded into latency)" },
        match (cal.host_sync_us.is_some(), cal.kernels.is_empty()) {
            (true, false) => ", kernels.host_sync_us and kernels.host_gbps (host round trip), kernels.*.bandwidth_share of the timed classes (plan kernels)",
            (true, true) => ", kernels.host_sync_us and kernels.host_gbps (host round trip)",
            (false, false) => ", kernels.*.bandwidth_share of the timed classes (plan kernels)",
            (false, true) => "",
        },
        if cal.f32_outputs.is_empty() { "" } else { ", kernels.f32_output_share and kernels.f32_output_by_k (the f32 outputs of bf16 weight-gradient GEMMs)" },
        if zero_row_gain(&cal.zero_rows).is_none() { "" } else { ", kernels.zero_row_gain (expert GEMMs over zero rows)" },
        if fits.is_empty() { ", every link (one GPU: no collective measured)" } else { " and the inter-node link" },
    );
    text.push_str(&body);
    profile::parse(&text, name).map_err(CalibrationError::Result)?;
    Ok((text, fits))
}

fn round(v: f64, digits: i32) -> f64 {
    let s = 10f64.powi(digits);
    (v * s).round() / s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> &'static str {
        include_str!("../../../profiles/h200-datasheet.toml")
    }

    fn measured() -> Calibration {
        let mut gemms = Vec::new();
        for (m, n, k) in [(8192, 8192, 8192), (16384, 14336, 4096), (4096, 4096, 512), (2048, 2048, 128)] {
            let eff = k as f64 / (k as f64 + 256.0);
            gemms.push(GemmMeasure { dtype: GemmDtype::Bf16, m, n, k, batch: 1, tflops: 800.0 * eff });
            gemms.push(GemmMeasure { dtype: GemmDtype::F32, m, n, k, batch: 1, tflops: 52.0 * eff });
        }
        // An all-reduce on 2 GPUs with 12 us latency and 360 GB/s bus bandwidth.
        let collectives = [1e6, 16e6, 256e6]
            .into_iter()
            .map(|b| CollectiveMeasure { kind: CollectiveKind::AllReduce, members: 2, bytes: b, seconds: 12e-6 + CollectiveKind::AllReduce.wire_bytes(b, 2) / 360e9 })
            .collect();
        Calibration { device: "Test GPU".into(), gpus: 2, date: "2026-11-23".into(), gemms, launch_us: 2.5, copy_tbps: 3.9, collectives, host_sync_us: None, host_gbps: None, kernels: vec![], f32_outputs: vec![], beside_gemm: vec![], zero_rows: vec![], gemm_context: vec![], host_copies: vec![] }
    }

    #[test]
    fn a_collective_fit_recovers_latency_and_bandwidth() {
        let cal = measured();
        let f = fit_collective(CollectiveKind::AllReduce, &cal.collectives, 450e9).expect("three sizes");
        assert!((f.latency_us - 12.0).abs() < 1e-6, "{f:?}");
        assert!((f.efficiency - 0.8).abs() < 1e-9, "{f:?}");
        assert!(f.worst_rel_err < 1e-9);
        assert!(fit_collective(CollectiveKind::AllToAll, &cal.collectives, 450e9).is_none());
    }

    #[test]
    fn the_rendered_profile_loads_and_carries_the_measurements() {
        let (text, fits) = render(base(), "h200-datasheet", "h200-test", &measured()).expect("renders");
        let p = profile::parse(&text, "t").expect("parses");
        assert!(p.calibrated && p.name == "h200-test" && p.device == "Test GPU");
        assert!((p.gpu.launch_s - 2.5e-6).abs() < 1e-12);
        assert!((p.gpu.mem_bandwidth - 3.9e12).abs() / 3.9e12 < 1e-3);
        assert_eq!(fits.len(), 1);
        let ar = p.intra.collective(CollectiveKind::AllReduce);
        assert!((ar.latency_us - 12.0).abs() < 0.01 && (ar.efficiency - 0.8).abs() < 1e-3);
        // The GEMM models are fitted to the measured points: the measured shapes come back.
        for g in measured().gemms {
            let model = p.gpu.gemm(g.dtype);
            let pred = model.predicted_tflops(g.m, g.n, g.k);
            assert!((pred - g.tflops).abs() / g.tflops < 0.15, "{g:?}: predicted {pred}");
        }
        assert!(text.starts_with("# h200-test: measured by `moelab calibrate` on Test GPU (2 GPUs)"));
    }

    #[test]
    fn points_the_sweep_does_not_time_are_kept_from_the_base() {
        // The shipped h200 profile carries batched attention points (batch = 4, from ncu) and
        // points at swept shapes; recalibrating on it replaces the latter and keeps the former.
        // A strided-batched measurement replaces the base's point at its shape and batch
        // only (the shipped profile has 25 from the batched expert sweep).
        let base = profile::builtin_text("h200").expect("built in");
        let mut cal = measured();
        cal.gemms.push(GemmMeasure { dtype: GemmDtype::Bf16, m: 5120, n: 14336, k: 4096, batch: 8, tflops: 700.0 });
        let (text, _) = render(base, "h200", "h200-again", &cal).expect("renders");
        let p = profile::parse(&text, "t").expect("parses");
        let batched: Vec<_> = p.gpu.bf16.points.iter().filter(|q| q.batch == 4).collect();
        assert_eq!(batched.len(), 2, "{text}");
        assert!(batched.iter().all(|q| q.source.contains("ncu")));
        let experts: Vec<_> = p.gpu.bf16.points.iter().filter(|q| q.batch == 8 || q.batch == 64).collect();
        assert_eq!(experts.len(), 25, "{text}");
        let swept: Vec<_> = experts.iter().filter(|q| (q.m, q.n, q.k, q.batch) == (5120, 14336, 4096, 8)).collect();
        assert!(swept.len() == 1 && swept[0].tflops == 700.0 && swept[0].source.starts_with("moelab calibrate on Test GPU"), "{swept:?}");
        let json = serde_json::to_string(&cal.gemms).expect("serializes");
        assert_eq!(json.matches("\"batch\"").count(), 1, "batch is written only when above 1: {json}");
        for g in measured().gemms {
            let at: Vec<_> = p.gpu.gemm(g.dtype).points.iter().filter(|q| (q.m, q.n, q.k, q.batch) == (g.m, g.n, g.k, 1)).collect();
            assert_eq!(at.len(), 1, "{g:?}");
            assert!(at[0].source.starts_with("moelab calibrate on Test GPU") && (at[0].tflops - g.tflops).abs() < 0.01, "{g:?}");
        }
    }

    #[test]
    fn one_gpu_keeps_the_base_links() {
        let mut cal = measured();
        cal.collectives.clear();
        cal.gpus = 1;
        let (text, fits) = render(base(), "h200-datasheet", "h200-1", &cal).expect("renders");
        assert!(fits.is_empty());
        let (p, b) = (profile::parse(&text, "t").expect("parses"), profile::resolve("h200-datasheet").expect("base"));
        assert_eq!(p.intra, b.intra);
        assert!(text.contains("every link (one GPU"));
    }

    #[test]
    fn host_round_trips_replace_the_base_terms_and_keep_its_kernel_classes() {
        // Base h200 carries fitted [kernels] classes; the measurement replaces only the host terms.
        let mut cal = measured();
        cal.host_sync_us = Some(12.5);
        cal.host_gbps = Some(6.0);
        let (text, _) = render(include_str!("../../../profiles/h200.toml"), "h200", "h200-new", &cal).expect("renders");
        let (p, b) = (profile::parse(&text, "t").expect("parses"), profile::resolve("h200").expect("base"));
        assert!((p.gpu.kernels.host_sync_s - 12.5e-6).abs() < 1e-12);
        assert!((p.gpu.kernels.host_bandwidth - 6e9).abs() < 1.0);
        assert_eq!(p.gpu.kernels.classes, b.gpu.kernels.classes);
        // A timed class: LayerNorm moving kernel_bytes in 2x the copy time (after its one
        // launch gap) runs at share 0.5; its fixed_us and the untimed classes stay.
        let bytes = kernel_bytes(KernelClass::Layernorm).expect("timed");
        cal.kernels = vec![KernelMeasure { class: "layernorm".into(), seconds: 2.5e-6 + 2.0 * bytes / 3.9e12 }];
        let (text, _) = render(include_str!("../../../profiles/h200.toml"), "h200", "h200-new", &cal).expect("renders");
        let p = profile::parse(&text, "t").expect("parses");
        assert!((p.gpu.kernels.class(KernelClass::Layernorm).bandwidth_share - 0.5).abs() < 1e-4);
        assert_eq!(p.gpu.kernels.class(KernelClass::Layout), b.gpu.kernels.class(KernelClass::Layout));
        // From a datasheet base (no [kernels] table) the table is created.
        let (text, _) = render(base(), "h200-datasheet", "h200-ds", &cal).expect("renders");
        let p = profile::parse(&text, "t").expect("parses");
        assert!((p.gpu.kernels.host_sync_s - 12.5e-6).abs() < 1e-12);
    }

    #[test]
    fn calibration_json_without_host_terms_still_loads() {
        let mut v = serde_json::to_value(measured()).expect("serialises");
        let o = v.as_object_mut().expect("object");
        o.remove("host_sync_us");
        o.remove("host_gbps");
        o.remove("kernels");
        let cal: Calibration = serde_json::from_value(v).expect("old files load");
        assert_eq!(cal.host_sync_us, None);
        let (text, _) = render(base(), "h200-datasheet", "h200-old", &cal).expect("renders");
        assert_eq!(profile::parse(&text, "t").expect("parses").gpu.kernels, profile::KernelProfile::default());
        // The raw files behind the shipped profiles (written before the host terms existed).
        for json in [include_str!("../../../docs/device-runs/calibration/h200x2-20261123-0544.json"),
            include_str!("../../../docs/device-runs/calibration/h100-20261123-0546.json")] {
            let doc: serde_json::Value = serde_json::from_str(json).expect("JSON");
            let cal: Calibration = serde_json::from_value(doc["calibration"].clone()).expect("an old calibration file loads");
            assert_eq!((cal.host_sync_us, cal.host_gbps, cal.kernels.len()), (None, None, 0));
            render(base(), "h200-datasheet", "x", &cal).expect("renders");
        }
    }

    #[test]
    fn the_zero_row_gain_is_each_passs_slope_through_the_origin() {
        // Forward: 1 + 0.2 z exactly on two layers; input gradient 1 + 0.1 z; weight gradient
        // slower over zero rows (clamped to 0); a layer without its whole-rows point is skipped.
        let m = |pass, rows, kept: f64, tflops| ZeroRowsMeasure { experts: 8, rows, d_in: 4096, d_out: 14336, pass, kept, tflops };
        let mut v = Vec::new();
        for rows in [5120, 1280] {
            for kept in [1.0, 0.75, 0.39, 0.0] {
                let z = 1.0 - kept;
                v.push(m(GemmPass::Forward, rows, kept, 700.0 * (1.0 + 0.2 * z)));
                v.push(m(GemmPass::InputGrad, rows, kept, 600.0 * (1.0 + 0.1 * z)));
                v.push(m(GemmPass::WeightGrad, rows, kept, 650.0 * (1.0 - 0.05 * z)));
            }
        }
        v.push(m(GemmPass::Forward, 640, 0.5, 5000.0));
        let g = zero_row_gain(&v).expect("fitted");
        assert!((g.forward - 0.2).abs() < 1e-9 && (g.input_grad - 0.1).abs() < 1e-9 && g.weight_grad == 0.0, "{g:?}");
        assert_eq!(zero_row_gain(&[]), None);
        assert_eq!(zero_row_gain(&v.iter().filter(|x| x.kept < 1.0).copied().collect::<Vec<_>>()), None);
        // The fit lands in the written profile.
        let mut cal = measured();
        cal.zero_rows = v;
        let (text, _) = render(base(), "h200-datasheet", "probe", &cal).expect("renders");
        let p = profile::parse(&text, "probe").expect("parses");
        assert!((p.gpu.kernels.zero_row_gain.forward - 0.2).abs() < 1e-9, "{text}");
    }

    #[test]
    fn the_f32_output_share_is_fitted_from_the_extra_seconds_per_extra_byte() {
        // Extra bytes moving at 80% of a 3 TB/s copy rate, on two shapes, both output forms.
        let copy = 3e12;
        let m = |m: usize, n: usize| {
            let t = |acc| F32OutputMeasure::extra_bytes(m, n, acc) / (0.8 * copy);
            F32OutputMeasure { m, n, k: 640, bf16_s: 1e-4, f32_s: 1e-4 + t(false), f32_acc_s: 1e-4 + t(true), paired: false }
        };
        let share = f32_output_share(&[m(4096, 14336), m(2048, 1408)], copy).expect("fitted");
        assert!((share - 0.8).abs() < 1e-9, "{share}");
        assert_eq!(f32_output_share(&[], copy), None);
        // No measurable cost: nothing to price.
        let free = F32OutputMeasure { m: 64, n: 64, k: 64, bf16_s: 1e-5, f32_s: 1e-5, f32_acc_s: 1e-5, paired: false };
        assert_eq!(f32_output_share(&[free], copy), None);
        // The rendered profile carries it.
        let mut cal = measured();
        cal.f32_outputs = vec![m(4096, 14336)];
        cal.copy_tbps = 3.0;
        let (text, _) = render(base(), "h200-datasheet", "t", &cal).expect("renders");
        let p = profile::parse(&text, "t").expect("parses");
        let got = p.gpu.kernels.f32_output_share.expect("written");
        assert!((got - 0.8).abs() < 1e-3, "{got}");
    }

    #[test]
    fn f32_output_shares_are_fitted_per_reduction_length_from_resolvable_shapes() {
        // At k 80 the extra bytes move at 50% (written) and 40% (added to) of the copy rate, at
        // k 1,280 at 150% and 200% (the main loop hides some). A small shape whose extra bytes
        // take 2 us at k 2,560 is noise and gives no point, and so is a long GEMM whose extra
        // bytes are 1% of its time at k 16,384.
        let copy = 4e12;
        let m = |m: usize, n: usize, k: usize, write: f64, add: f64| {
            let t = |acc, share| F32OutputMeasure::extra_bytes(m, n, acc) / (share * copy);
            F32OutputMeasure { m, n, k, bf16_s: 1e-4, f32_s: 1e-4 + t(false, write), f32_acc_s: 1e-4 + t(true, add), paired: false }
        };
        let noise = F32OutputMeasure { m: 2048, n: 1408, k: 2560, bf16_s: 3.5e-5, f32_s: 3.4e-5, f32_acc_s: 4.4e-5, paired: false };
        assert!(F32OutputMeasure::extra_bytes(2048, 1408, false) / copy < F32_OUTPUT_RESOLVED_S);
        let long = F32OutputMeasure { m: 4096, n: 14336, k: 16384, bf16_s: 2.4e-3, f32_s: 2.57e-3, f32_acc_s: 2.76e-3, paired: false };
        let v = [m(4096, 14336, 80, 0.5, 0.4), m(4096, 14336, 1280, 1.5, 2.0), m(14336, 4096, 1280, 1.5, 2.0), noise, long];
        let pts = f32_output_by_k(&v, copy);
        assert_eq!(pts.iter().map(|p| p.k).collect::<Vec<_>>(), vec![80, 1280]);
        // Timed in paired rounds, the long GEMM's small extra is told from the clocks' swing.
        let paired = F32OutputMeasure { f32_s: 2.414e-3, f32_acc_s: 2.44e-3, paired: true, ..long };
        let with_long = f32_output_by_k(&[v[0], paired], copy);
        assert_eq!(with_long.iter().map(|p| p.k).collect::<Vec<_>>(), vec![80, 16384]);
        assert!((with_long[1].write_share - F32OutputMeasure::extra_bytes(4096, 14336, false) / (14e-6 * copy)).abs() < 1e-6, "{with_long:?}");
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(pts[0].write_share, 0.5) && close(pts[0].add_share, 0.4) && close(pts[1].write_share, 1.5) && close(pts[1].add_share, 2.0), "{pts:?}");
        // The rendered profile carries the points, and the sim prices k 80 by them.
        let mut cal = measured();
        cal.f32_outputs = v.to_vec();
        cal.copy_tbps = 4.0;
        let (text, _) = render(base(), "h200-datasheet", "t", &cal).expect("renders");
        let p = profile::parse(&text, "t").expect("parses");
        let by_k = &p.gpu.kernels.f32_output_by_k;
        assert_eq!(by_k.len(), 2, "{text}");
        let bytes = F32OutputMeasure::extra_bytes(4096, 14336, true);
        let got = p.gpu.kernels.f32_output_seconds(bytes, 80, true, copy);
        assert!((got / (bytes / (0.4 * copy)) - 1.0).abs() < 1e-3, "{got}");
    }
}
