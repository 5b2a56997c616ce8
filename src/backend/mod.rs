//! Backends execute plans and return traces. `cpu` is the reference; every other backend
//! must match its numbers. Backends see [`crate::plan::OpKind`]s, never variants.

pub mod cpu;
pub mod cuda;
pub mod dump;
pub mod sim;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// What one training or inference step produced, summed over ranks.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Step index counting warmup steps.
    pub step: usize,
    /// Whether the step is measured (after warmup).
    pub measured: bool,
    /// Regression loss over the global batch (without the aux term).
    pub loss: f64,
    /// Load-balancing loss summed over MoE layers (1.0 per layer when balanced).
    pub aux_loss: f64,
    /// Token assignments dropped by capacity, summed over layers.
    pub dropped: usize,
    /// Token assignments routed, summed over layers.
    pub routed: usize,
    /// Capacity C (slots per expert) of each MoE layer's routing, in execution order (the
    /// run-time choice for dropless and negative capacity factors); empty on the sim backend.
    pub capacity: Vec<usize>,
    /// Wall time of the step in seconds.
    pub wall_s: f64,
}

/// Which ops of a rank run in this step (the optimizer is skipped for gradient checks), the
/// buffers each op touches (sorted, once each), and how many running ops touch each buffer:
/// the counts every runtime decrements to release a buffer after its last user.
pub fn buffer_uses(rp: &crate::plan::RankPlan, skip_optimizer: bool) -> (Vec<bool>, Vec<Vec<crate::plan::BufId>>, Vec<std::sync::atomic::AtomicUsize>) {
    let active: Vec<bool> = rp.ops.iter().map(|op| !(skip_optimizer && op.stage == crate::taxonomy::Stage::Optimizer)).collect();
    let touched: Vec<Vec<crate::plan::BufId>> = rp
        .ops
        .iter()
        .map(|op| {
            let mut t: Vec<crate::plan::BufId> = op.reads.iter().chain(&op.writes).copied().collect();
            t.sort();
            t.dedup();
            t
        })
        .collect();
    let mut uses = vec![0usize; rp.buffers.len()];
    for (t, a) in touched.iter().zip(&active) {
        if *a {
            for b in t {
                uses[b.0 as usize] += 1;
            }
        }
    }
    (active, touched, uses.into_iter().map(std::sync::atomic::AtomicUsize::new).collect())
}

/// The layers whose routing figures rank `rank` reports: those whose lowest routing rank (one
/// with a [`crate::plan::OpKind::Dispatch`] in the layer) it is. Routing figures are global to
/// a layer, so one rank reports each: rank 0 for every layer unless pipeline stages hold the
/// layers on different ranks.
pub fn reported_layers(plan: &crate::plan::Plan, rank: usize) -> std::collections::BTreeSet<Option<u32>> {
    let routed = |r: &crate::plan::RankPlan| -> std::collections::BTreeSet<Option<u32>> {
        r.ops.iter().filter(|o| matches!(o.kind, crate::plan::OpKind::Dispatch { .. })).map(|o| o.layer).collect()
    };
    let earlier: std::collections::BTreeSet<Option<u32>> = plan.ranks[..rank].iter().flat_map(routed).collect();
    routed(&plan.ranks[rank]).into_iter().filter(|l| !earlier.contains(l)).collect()
}

/// The step's aux loss, dropped and routed assignments and the capacities chosen, from the
/// routing observations `(layer, chunk, obs)` of the layers a rank reports: per layer, the
/// aux loss averaged over the micro-batches (distinct chunks) that routed it, drops and
/// assignments summed, capacities in layer then observation order.
pub fn routing_figures(obs: &[(Option<u32>, Option<u32>, cpu::exec::RouteObs)]) -> (f64, usize, usize, Vec<usize>) {
    let mut layers: std::collections::BTreeMap<Option<u32>, Vec<(Option<u32>, cpu::exec::RouteObs)>> = std::collections::BTreeMap::new();
    for (layer, chunk, o) in obs {
        layers.entry(*layer).or_default().push((*chunk, *o));
    }
    let (mut aux, mut dropped, mut routed, mut capacity) = (0.0, 0, 0, Vec::new());
    for obs in layers.values() {
        capacity.extend(obs.iter().map(|o| o.1.capacity));
        let mut chunks: Vec<Option<u32>> = obs.iter().map(|o| o.0).collect();
        chunks.sort_unstable();
        chunks.dedup();
        aux += obs.iter().map(|o| o.1.aux).sum::<f64>() / chunks.len() as f64;
        dropped += obs.iter().map(|o| o.1.dropped).sum::<usize>();
        routed += obs.iter().map(|o| o.1.routed).sum::<usize>();
    }
    (aux, dropped, routed, capacity)
}

/// Knobs of an execution that are not part of the experiment.
#[derive(Clone)]
pub struct ExecOptions {
    /// Set to stop between ops; the run ends with [`BackendError::Cancelled`].
    pub cancel: Arc<AtomicBool>,
    /// Longest a rank waits in a collective for its peers.
    pub collective_timeout: Duration,
    /// Buffers (by name) kept after their last use, for inspection in tests.
    pub retain: Vec<String>,
    /// Run backward but skip the optimizer (gradient checks).
    pub skip_optimizer: bool,
    /// Test hook: make this rank fail at the op with this name.
    pub fail_at: Option<(u32, String)>,
    /// Routing replay (cpu): the experts each `Route` op chooses, by (rank, name of its
    /// `idx` buffer), instead of its own top-k; probabilities and weights are still computed.
    /// Cross-checks of bf16 plans use the cuda run's choices, so that near-tied choices which
    /// rounding flips do not hide the comparison of everything else.
    pub replay_routes: Option<Arc<std::collections::HashMap<(u32, String), Vec<i32>>>>,
    /// cuda: each worker dumps its final parameters and gradients into the run directory
    /// (cross-checks; passed to the workers it starts, never through this process's
    /// environment, so two jobs in one process do not share it).
    pub dump_params: bool,
    /// cuda: each worker keeps and dumps every transient buffer ([`dump`]; small plans only).
    pub dump_buffers: bool,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            cancel: Arc::new(AtomicBool::new(false)),
            collective_timeout: Duration::from_secs(60),
            retain: Vec::new(),
            skip_optimizer: false,
            fail_at: None,
            replay_routes: None,
            dump_params: false,
            dump_buffers: false,
        }
    }
}

/// Why an execution stopped.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum BackendError {
    /// An op failed on a rank.
    #[error("rank {rank} failed in op {op}: {message}")]
    OpFailed {
        /// Global rank.
        rank: u32,
        /// Op name.
        op: String,
        /// What went wrong.
        message: String,
    },
    /// A rank panicked (a bug); the others were released.
    #[error("rank {rank} crashed: {message}")]
    Crashed {
        /// Global rank.
        rank: u32,
        /// Panic payload.
        message: String,
    },
    /// Peers did not arrive at a collective in time.
    #[error("rank {rank} timed out after {secs} s in {op}: ranks {missing:?} never arrived")]
    Timeout {
        /// Waiting rank.
        rank: u32,
        /// Collective op name.
        op: String,
        /// Ranks that did not arrive.
        missing: Vec<u32>,
        /// Timeout in seconds.
        secs: u64,
    },
    /// Another rank failed first; this one was released from its wait.
    #[error("rank {rank} stopped because rank {by} failed")]
    Aborted {
        /// This rank.
        rank: u32,
        /// The rank that failed.
        by: u32,
    },
    /// The user cancelled.
    #[error("cancelled")]
    Cancelled,
    /// A step's loss was NaN or infinite: training diverged (or an op produced NaN), so the
    /// steps after it measure nothing worth keeping.
    #[error("step {step}: the loss is {loss}: training diverged (fix: lower run.lr; a NaN at the first step points at the inputs or an op)")]
    Diverged {
        /// The step (warmup included).
        step: u64,
        /// The loss.
        loss: f64,
    },
}

/// A plan loaded onto an in-process backend, ready to run steps: what `run` drives for the
/// cpu and sim backends.
pub trait Runtime {
    /// Run (or simulate) one step on every rank; `measured` steps are traced.
    fn step(&mut self, measured: bool, data_step: Option<u64>) -> Result<StepReport, BackendError>;
    /// Everything measured so far.
    fn trace(&self) -> crate::trace::Trace;
    /// Peak bytes per rank and the per-category bytes at that moment.
    fn tracked_peaks(&self) -> Vec<(u64, [u64; 7])>;
    /// Lines for the run log about how the backend runs this plan (none by default).
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
    /// What the user must see about this plan on this backend (the sim: a predicted peak
    /// above the GPU's memory); also in the run log, `summary.json` and the CLI's output.
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }
}

impl Runtime for cpu::CpuRuntime {
    fn step(&mut self, measured: bool, data_step: Option<u64>) -> Result<StepReport, BackendError> {
        cpu::CpuRuntime::step(self, measured, data_step)
    }
    fn trace(&self) -> crate::trace::Trace {
        cpu::CpuRuntime::trace(self)
    }
    fn tracked_peaks(&self) -> Vec<(u64, [u64; 7])> {
        cpu::CpuRuntime::tracked_peaks(self)
    }
}

impl Runtime for sim::SimRuntime {
    fn step(&mut self, measured: bool, data_step: Option<u64>) -> Result<StepReport, BackendError> {
        sim::SimRuntime::step(self, measured, data_step)
    }
    fn trace(&self) -> crate::trace::Trace {
        sim::SimRuntime::trace(self)
    }
    fn tracked_peaks(&self) -> Vec<(u64, [u64; 7])> {
        sim::SimRuntime::tracked_peaks(self)
    }
    fn notes(&self) -> Vec<String> {
        sim::SimRuntime::notes(self)
    }
    fn warnings(&self) -> Vec<String> {
        sim::SimRuntime::warnings(self)
    }
}

/// The in-process runtime for the plan's `run.backend`: the simulator for `sim`, else the
/// cpu reference.
pub fn runtime(plan: crate::plan::Plan, opts: ExecOptions) -> Box<dyn Runtime> {
    match plan.spec.run.backend {
        crate::spec::BackendKind::Sim => Box::new(sim::SimRuntime::new(plan, opts)),
        _ => Box::new(cpu::CpuRuntime::new(plan, opts)),
    }
}
