//! Running an experiment end to end: plan, execute, analyse, and keep everything in a run
//! directory `runs/<timestamp>-<name>/` (resolved spec, log, trace, tables, summary).
//! Nothing is lost: a failed or cancelled run still writes its spec, log, what it measured
//! and a status file naming the error.

pub mod compare;
pub mod crosscheck;
mod log;
pub mod mpmoe_auto;
pub mod predict;
pub mod run_file;

pub use log::RunLog;

use crate::analysis::{self, Analysis};
use crate::backend::{BackendError, ExecOptions, StepReport};
use crate::plan::memory::{predict, MemoryPrediction};
use crate::plan::Plan;
use crate::spec::ExperimentSpec;
use crate::trace::{chrome, Trace};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Why a run did not complete.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The plan could not be built (nothing was written).
    #[error(transparent)]
    Plan(#[from] crate::plan::builders::PlanError),
    /// The run directory could not be written.
    #[error("cannot write run directory {path}: {message}")]
    Io {
        /// Path.
        path: String,
        /// OS error.
        message: String,
    },
    /// An automatic choice made at run start (MPMoE's `chunks`/`reuse` = "auto") has no
    /// admissible candidate (nothing was written).
    #[error("{field}: {message} (fix: {fix})")]
    Choice {
        /// The spec field to change.
        field: String,
        /// What is wrong.
        message: String,
        /// How to fix it.
        fix: String,
    },
    /// Execution failed; the run directory keeps what was measured.
    #[error("{source} (run directory kept: {dir})")]
    Backend {
        /// Backend error.
        source: BackendError,
        /// Run directory.
        dir: String,
    },
}

/// The result of a completed run.
#[derive(Debug)]
pub struct RunOutcome {
    /// Where everything was written.
    pub dir: PathBuf,
    /// Stage table, overlap and memory breakdown of the measured steps.
    pub analysis: Analysis,
    /// One report per step, warmup included.
    pub steps: Vec<StepReport>,
    /// The plan's memory prediction per rank.
    pub predicted: Vec<MemoryPrediction>,
    /// The backend's tracked peak per rank (total, per category at peak).
    pub tracked: Vec<(u64, [u64; 7])>,
    /// The full trace.
    pub trace: Trace,
    /// How Tutel's `degree = "auto"` was resolved, when the spec asked for it.
    pub auto_degree: Option<AutoDegree>,
    /// How MPMoE's `chunks`/`reuse` = "auto" was resolved, when the spec asked for it.
    pub mpmoe_auto: Option<mpmoe_auto::MpmoeAuto>,
    /// What the user must see about the run (e.g. the sim's predicted peak above the GPU's
    /// memory); also in `summary.json` and the run log.
    pub warnings: Vec<String>,
    /// Run files that could not be written (`"trace.json: No space left on device"`); the
    /// figures here are then all that is left of them. Also in the run log.
    pub unsaved: Vec<String>,
}

/// The failure of a step whose loss is NaN or infinite; the sim computes no loss.
fn diverged(spec: &ExperimentSpec, r: &StepReport) -> Option<BackendError> {
    (spec.run.backend != crate::spec::BackendKind::Sim && !r.loss.is_finite()).then_some(BackendError::Diverged { step: r.step as u64, loss: r.loss })
}

/// Hooks a front end (CLI, workbench, notebook) passes to follow and stop a run.
#[derive(Clone, Default)]
pub struct RunHooks {
    /// Execution options (cancel flag, timeouts).
    pub exec: ExecOptions,
    /// Called after every step.
    pub on_step: Option<std::sync::Arc<dyn Fn(&StepReport) + Send + Sync>>,
}

#[derive(Serialize)]
struct Summary<'a> {
    name: &'a str,
    variant: &'a str,
    backend: &'a str,
    world: usize,
    status: &'a str,
    error: Option<String>,
    steps: Vec<StepJson>,
    /// `null` when no measured step ran (a run cancelled or failed before one).
    step_time_ms: Option<f64>,
    overlap: f64,
    exposed_comm_ms: f64,
    memory: Vec<MemJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tutel_auto_degree: Option<AutoDegree>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mpmoe_auto: Option<mpmoe_auto::MpmoeAuto>,
    /// What an automatic choice had timed when it failed or was cancelled (the choice itself
    /// is then absent).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    auto_timed: Vec<AutoTrial>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    unsaved: Vec<String>,
}

/// One configuration an automatic choice (Tutel's degree or parallelism, MPMoE's chunks or
/// reuse) timed: kept in `summary.json` when the choice did not finish, so a cancelled or
/// failed run still shows what it measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AutoTrial {
    /// The configuration, as the run log names it (`tutel r=1 degree 2`, `mpmoe chunks=4 reuse=none`).
    pub config: String,
    /// Mean measured step time, milliseconds.
    pub step_ms: f64,
}

/// How Tutel's `degree = "auto"` and/or `parallelism = "auto"` were resolved: each timed
/// candidate's mean step time and the choice.
#[derive(Debug, Clone, Serialize)]
pub struct AutoDegree {
    /// The fastest uniform degree: every layer's in the measured steps unless `per_layer`
    /// is set (see [`AutoDegree::describe`]).
    pub chosen: usize,
    /// The fastest uniform parallelism r (same caveat as `chosen`).
    pub chosen_r: usize,
    /// Every timed candidate, in the order tried.
    pub candidates: Vec<TutelCandidate>,
    /// The per-layer choice the measured steps run (`[tutel] layers`) when the layers'
    /// fastest candidates differ and their mix, timed as well, beat the best uniform choice
    /// (`chosen`, `chosen_r`); empty when every layer runs the uniform choice.
    pub per_layer: Vec<crate::spec::TutelLayer>,
    /// Seconds per step of the per-layer mix when one was timed.
    pub mixed_s: Option<f64>,
    /// Steps timed per candidate (after one untimed step).
    pub timed_steps: usize,
    /// Why: the choice, its time and the runner-up's.
    pub reason: String,
}

impl RunError {
    /// The run was cancelled (Ctrl-C, SIGTERM, an interrupt): the CLI exits 130.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, RunError::Backend { source: BackendError::Cancelled, .. })
    }
}

impl AutoDegree {
    /// What the measured steps ran: the per-layer mix when one was kept, else the uniform
    /// choice (`r=1 degree 4`).
    pub fn describe(&self) -> String {
        if self.per_layer.is_empty() {
            format!("r={} degree {}", self.chosen_r, self.chosen)
        } else {
            let layers: Vec<String> = self.per_layer.iter().enumerate().map(|(l, c)| format!("L{l}: r={} degree {}", c.r, c.degree)).collect();
            format!("per layer ({})", layers.join(", "))
        }
    }
}

/// One timed Tutel configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TutelCandidate {
    /// Parallelism r (1: expert parallel, 0: data parallel over the same parameter layout).
    pub r: usize,
    /// Pipelining degree.
    pub degree: usize,
    /// Mean wall seconds per timed step.
    pub mean_s: f64,
    /// Bytes rank 0's collectives move per step, from the plan (all-to-alls for r = 1,
    /// weight all-gathers and gradient reduce-scatters for r = 0, plus what both share).
    pub comm_bytes: u64,
    /// Seconds per step of each layer's MoE sublayer (forward span + backward span of its
    /// routing, layout, expert and communication ops, on the slowest rank), from the trace.
    pub layer_s: Vec<f64>,
}

/// Per layer, the mean seconds per step of its MoE sublayer in `trace` (see
/// [`TutelCandidate::layer_s`]).
fn moe_layer_seconds(trace: &crate::trace::Trace, n_layers: usize) -> Vec<f64> {
    use crate::taxonomy::Stage::*;
    use std::collections::BTreeMap;
    let moe = |s: crate::taxonomy::Stage| matches!(s, Gate | Topk | Permute | ExpertGemm1 | Act | ExpertGemm2 | Combine | AllToAll | AllGather | ReduceScatter);
    // (layer, rank, step, pass) -> (first start, last end)
    let mut spans: BTreeMap<(u32, u32, u32, crate::taxonomy::Pass), (u64, u64)> = BTreeMap::new();
    for o in trace.ops.iter().filter(|o| moe(o.stage)) {
        let Some(layer) = o.layer else { continue };
        let e = spans.entry((layer, o.rank, o.step, o.pass)).or_insert((o.start_ns, o.end_ns));
        e.0 = e.0.min(o.start_ns);
        e.1 = e.1.max(o.end_ns);
    }
    let mut per: BTreeMap<(u32, u32), (u64, std::collections::BTreeSet<u32>)> = BTreeMap::new();
    for ((layer, rank, step, _), (a, b)) in spans {
        let e = per.entry((layer, rank)).or_default();
        e.0 += b - a;
        e.1.insert(step);
    }
    (0..n_layers as u32)
        .map(|l| per.range((l, 0)..=(l, u32::MAX)).map(|(_, (ns, steps))| *ns as f64 * 1e-9 / steps.len().max(1) as f64).fold(0.0, f64::max))
        .collect()
}

/// Under torchrun/srun every rank runs the one job it was started for, so Tutel's candidates
/// cannot be timed as jobs of their own: refused before a run directory exists, by rank 0
/// and (the CLI calls this before joining) by every other rank, so none waits for a job that
/// will not start.
pub fn refuse_external_tutel_auto(spec: &ExperimentSpec) -> Result<(), RunError> {
    use crate::spec::{Degree, ParallelismChoice};
    let Some(t) = spec.tutel.as_ref().filter(|_| spec.variant == crate::spec::Variant::Tutel && spec.run.backend == crate::spec::BackendKind::Cuda) else {
        return Ok(());
    };
    let field = if t.degree == Degree::Auto { "tutel.degree" } else if t.parallelism == ParallelismChoice::Auto { "tutel.parallelism" } else { return Ok(()) };
    if matches!(crate::backend::cuda::external::detect_from_env(), Ok(Some(_))) {
        return Err(RunError::Choice {
            field: field.into(),
            message: "under torchrun/srun each rank runs one job, so the candidates cannot be timed as jobs of their own".into(),
            fix: "run this spec once with a local launch (moelab run, one worker per GPU) or backend = \"sim\", and set the chosen degree and r".into(),
        });
    }
    Ok(())
}

/// Steps each `degree = "auto"` candidate is timed for (after one untimed step).
pub const AUTO_DEGREE_TIMED_STEPS: usize = 2;

/// Resolve Tutel's `degree = "auto"` and `parallelism = "auto"`: run each candidate (r = 1 at
/// each candidate degree, r = 0 at degree 1; with experts split over s = ep / n_experts ranks,
/// every divisor r of s and r = 0, at degree 1; only the automatic dimensions vary) on the
/// run's own backend (a fresh runtime each, so the measured run starts from the same weights;
/// on cuda a job of its own whose worker records land in `dir/tutel-auto/r<r>-d<d>/`), time
/// [`AUTO_DEGREE_TIMED_STEPS`] steps after one untimed step, and return the spec with the
/// fastest fixed. `None` when the spec asks for neither.
fn resolve_auto_degree(spec: &ExperimentSpec, dir: &Path, hooks: &RunHooks, log: &mut RunLog, timed: &mut Vec<AutoTrial>) -> Result<Option<(ExperimentSpec, AutoDegree)>, BackendError> {
    use crate::spec::{Degree, ParallelismChoice, TutelSpec, Variant};
    let Some(opts) = spec
        .tutel
        .clone()
        .filter(|o| spec.variant == Variant::Tutel && (o.degree == Degree::Auto || o.parallelism == ParallelismChoice::Auto))
    else {
        return Ok(None);
    };
    let degrees: Vec<usize> = match opts.degree {
        Degree::Auto => TutelSpec::AUTO_CANDIDATES.into_iter().filter(|d| *d <= spec.tokens_per_rank()).collect(),
        Degree::Fixed(d) => vec![d],
    };
    // With ep = s * n_experts (experts split over s ranks) the candidates are the divisors
    // r of s and r = 0; otherwise r = 1 and r = 0.
    let (ep, e) = (spec.layout.ep, spec.model.n_experts);
    let rs = match opts.parallelism {
        ParallelismChoice::Auto if ep > e => (1..=ep / e).filter(|r| (ep / e) % r == 0).chain([0]).collect(),
        ParallelismChoice::Auto => vec![1, 0],
        ParallelismChoice::Fixed => vec![opts.r],
    };
    let configs: Vec<(usize, usize)> =
        rs.iter().flat_map(|&r| if r == 0 { vec![(0, 1)] } else { degrees.iter().map(|&d| (r, d)).collect() }).collect();
    let with = |r: usize, d: usize| {
        let mut s = spec.clone();
        s.tutel = Some(TutelSpec { degree: Degree::Fixed(d), r, parallelism: ParallelismChoice::Fixed, layers: Vec::new(), ..opts.clone() });
        s
    };
    let n_layers = spec.model.n_layers;
    // One untimed step, then the timed ones, on the run's own backend (the sim: predicted
    // times): mean seconds per step, rank 0's collective bytes, and each layer's MoE time.
    let time = |s: &ExperimentSpec| -> Result<(f64, u64, Vec<f64>), BackendError> {
        let plan = Plan::build(s).expect("a validated tutel spec plans for every candidate");
        let comm_bytes = plan.ranks[0].ops.iter().filter(|o| o.stream == crate::taxonomy::Stream::Comm).map(|o| o.bytes).sum();
        if s.run.backend == crate::spec::BackendKind::Cuda {
            // The GPU workers are processes of their own: each candidate is a job of one
            // untimed and the timed steps, launched like the measured run.
            let t = s.tutel.as_ref().expect("a tutel spec");
            let layers = if t.layers.is_empty() { String::new() } else { "-per-layer".into() };
            let trial_dir = dir.join("tutel-auto").join(format!("r{}-d{}{layers}", t.r, match t.degree { crate::spec::Degree::Fixed(d) => d, crate::spec::Degree::Auto => 0 }));
            std::fs::create_dir_all(&trial_dir).map_err(|e| BackendError::Crashed { rank: 0, message: format!("{}: {e}", trial_dir.display()) })?;
            let mut trial = s.clone();
            trial.run.warmup = 1;
            trial.run.steps = AUTO_DEGREE_TIMED_STEPS;
            let plan = Plan::build(&trial).expect("a validated tutel spec plans for every candidate");
            let job = crate::backend::cuda::launch::run_job(&plan, &trial_dir, &hooks.exec, &mut |_| {});
            if let Some(e) = job.failure {
                return Err(e);
            }
            let timed: Vec<f64> = job.steps.iter().filter(|r| r.measured).map(|r| r.wall_s).collect();
            if timed.is_empty() {
                return Err(BackendError::Crashed { rank: 0, message: format!("{}: the candidate's job reported no timed step", trial_dir.display()) });
            }
            return Ok((timed.iter().sum::<f64>() / timed.len() as f64, comm_bytes, moe_layer_seconds(&job.trace, n_layers)));
        }
        let mut rt = crate::backend::runtime(plan, hooks.exec.clone());
        rt.step(false, Some(0))?;
        let mut total = 0.0;
        for i in 0..AUTO_DEGREE_TIMED_STEPS {
            total += rt.step(true, Some(1 + i as u64))?.wall_s;
        }
        Ok((total / AUTO_DEGREE_TIMED_STEPS as f64, comm_bytes, moe_layer_seconds(&rt.trace(), n_layers)))
    };
    let mut candidates = Vec::new();
    for (r, d) in configs {
        let (mean_s, comm_bytes, layer_s) = time(&with(r, d))?;
        log.line(&format!(
            "tutel auto: r={r} degree {d}: {:.3} ms per step ({AUTO_DEGREE_TIMED_STEPS} timed steps), {:.1} KB of collectives per step on rank 0",
            mean_s * 1e3, comm_bytes as f64 / 1e3
        ));
        timed.push(AutoTrial { config: format!("tutel r={r} degree {d}"), step_ms: mean_s * 1e3 });
        candidates.push(TutelCandidate { r, degree: d, mean_s, comm_bytes, layer_s });
    }
    let mut ranked = candidates.clone();
    ranked.sort_by(|a, b| a.mean_s.total_cmp(&b.mean_s));
    let best = ranked[0].clone();
    let mut reason = format!(
        "r={} degree {}: {:.3} ms per step, the fastest of {} timed candidates",
        best.r, best.degree, best.mean_s * 1e3, ranked.len()
    );
    if let Some(next) = ranked.get(1) {
        reason.push_str(&format!(
            "; runner-up r={} degree {}: {:.3} ms ({:+.1}%)",
            next.r, next.degree, next.mean_s * 1e3, (next.mean_s / best.mean_s - 1.0) * 100.0
        ));
    }
    if let Some(other) = ranked.iter().find(|c| c.r != best.r) {
        reason.push_str(&format!(
            "; r={} moves {:.1} KB of collectives per step where r={} moves {:.1} KB",
            best.r, best.comm_bytes as f64 / 1e3, other.r, other.comm_bytes as f64 / 1e3
        ));
    }
    // Per layer: the candidate under which that layer's MoE sublayer was fastest (the same
    // parameter layout for every candidate, so layers may differ). Split experts (ep above
    // n_experts) keep one choice for the whole model.
    let per_layer: Vec<crate::spec::TutelLayer> = if spec.layout.ep <= spec.model.n_experts && n_layers > 1 {
        (0..n_layers)
            .map(|l| {
                let c = candidates.iter().min_by(|a, b| a.layer_s[l].total_cmp(&b.layer_s[l])).expect("at least one candidate");
                crate::spec::TutelLayer { r: c.r, degree: c.degree }
            })
            .collect()
    } else {
        Vec::new()
    };
    let mut chosen = with(best.r, best.degree);
    let mut mixed = per_layer.windows(2).any(|w| w[0] != w[1]);
    let mut mixed_s = None;
    if mixed {
        // The per-layer votes each assumed the other layers ran the same candidate: time the
        // mix itself and keep it only if the whole step is faster.
        let desc: Vec<String> = per_layer.iter().enumerate().map(|(l, c)| format!("L{l}: r={} degree {}", c.r, c.degree)).collect();
        let mut mix = chosen.clone();
        if let Some(t) = mix.tutel.as_mut() {
            t.layers = per_layer.clone();
        }
        let (mean_s, _, _) = time(&mix)?;
        timed.push(AutoTrial { config: format!("tutel per-layer mix ({})", desc.join(", ")), step_ms: mean_s * 1e3 });
        mixed_s = Some(mean_s);
        log.line(&format!("tutel auto: per-layer mix ({}): {:.3} ms per step", desc.join(", "), mean_s * 1e3));
        if mean_s < best.mean_s {
            reason.push_str(&format!(
                "; each layer's fastest MoE sublayer differs and the mix ({}) runs {:.3} ms per step ({:+.1}% against the best uniform choice), so each layer runs its own",
                desc.join(", "), mean_s * 1e3, (mean_s / best.mean_s - 1.0) * 100.0
            ));
            chosen = mix;
            log.line(&format!("tutel auto: chose per layer ({}): {reason}", desc.join(", ")));
        } else {
            reason.push_str(&format!(
                "; the per-layer mix ({}) ran {:.3} ms per step, not faster, so every layer keeps the uniform choice",
                desc.join(", "), mean_s * 1e3
            ));
            mixed = false;
        }
    }
    if !mixed {
        log.line(&format!("tutel auto: chose r={} degree {}: {reason}", best.r, best.degree));
    }
    let per_layer = if mixed { per_layer } else { Vec::new() };
    let auto = AutoDegree { chosen: best.degree, chosen_r: best.r, candidates, per_layer, mixed_s, timed_steps: AUTO_DEGREE_TIMED_STEPS, reason };
    Ok(Some((chosen, auto)))
}

#[derive(Serialize)]
struct StepJson {
    step: usize,
    measured: bool,
    loss: f64,
    aux_loss: f64,
    dropped: usize,
    routed: usize,
    /// Capacity C of each MoE layer's routing (per-layer, execution order).
    capacity: Vec<usize>,
    wall_s: f64,
}

#[derive(Serialize)]
struct MemJson {
    rank: usize,
    predicted_peak: u64,
    predicted_is_upper_bound: bool,
    /// The most any order of the rank's two streams allowed by the plan can hold at once
    /// (`plan::memory::interleaved_peak`): what a concurrent backend's peak stays under.
    predicted_interleaved_peak: u64,
    tracked_peak: u64,
}

/// A fresh, unique run directory under `root`.
fn make_dir(root: &Path, name: &str) -> Result<PathBuf, RunError> {
    let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S");
    let io = |p: &Path, e: std::io::Error| RunError::Io { path: p.display().to_string(), message: e.to_string() };
    std::fs::create_dir_all(root).map_err(|e| io(root, e))?;
    for i in 0.. {
        let dir = if i == 0 { root.join(format!("{stamp}-{name}")) } else { root.join(format!("{stamp}-{name}-{i}")) };
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io(&dir, e)),
        }
    }
    unreachable!("some suffix is free")
}

/// Where runs go when no directory is given: `$MOELAB_RUNS_DIR` (empty means unset), else
/// `runs/` of the working directory; the notebook API and the Jupyter kernel use it, the CLI
/// and the workbench read the same variable through their `--runs-dir` option.
pub fn default_runs_root() -> PathBuf {
    std::env::var_os("MOELAB_RUNS_DIR").filter(|v| !v.is_empty()).map_or_else(|| PathBuf::from("runs"), PathBuf::from)
}

/// The run log's line for one step (the CLI prints the same line as each step ends).
pub fn step_line(r: &StepReport) -> String {
    if let Some(line) = sim_step_line(r) {
        return line;
    }
    format!(
        "step {}{}: loss {:.6} aux {:.4} dropped {}/{}{} wall {:.3} s",
        r.step, if r.measured { "" } else { " (warmup)" }, r.loss, r.aux_loss, r.dropped, r.routed, capacity_text(&r.capacity), r.wall_s
    )
}

/// The line of a simulated step (the sim does no math: no loss, nothing routed), or `None`
/// for a step that computed.
fn sim_step_line(r: &StepReport) -> Option<String> {
    (r.loss.is_nan() && r.routed == 0).then(|| format!("step {}{}: predicted {:.3} ms (the sim does no math: no loss)", r.step, if r.measured { "" } else { " (warmup)" }, r.wall_s * 1e3))
}

/// ` capacity C` (one value when every layer chose the same, else `C0,C1,...`); empty when
/// the backend does not route (sim).
pub fn capacity_text(c: &[usize]) -> String {
    match c {
        [] => String::new(),
        [first, rest @ ..] if rest.iter().all(|x| x == first) => format!(" capacity {first}"),
        _ => format!(" capacity {}", c.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")),
    }
}

/// This machine's memory (`MemTotal` of /proc/meminfo); `None` where it cannot be read.
pub fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// The cpu backend holds every rank in this process, every float as f32: a plan whose
/// predicted peak over its ranks exceeds the host's memory (`host`) is refused before anything runs, instead of the
/// allocation aborting the process (and a workbench with it). A plan whose prediction is an
/// upper bound (dropless: every token may reach one expert) is not refused: the bound may be
/// far above what it uses.
pub fn refuse_cpu_beyond_host_memory(plan: &Plan, host: Option<u64>) -> Result<(), RunError> {
    let (Some(host), crate::spec::BackendKind::Cpu) = (host, plan.spec.run.backend) else { return Ok(()) };
    // The cpu store holds every float as f32 (a bf16 plan's buffers too): price them so.
    let as_f32 = |rp: &crate::plan::RankPlan| {
        let mut rp = rp.clone();
        for b in rp.buffers.iter_mut().filter(|b| b.elem != crate::plan::ElemType::I32) {
            b.elem_bytes = 4;
        }
        predict(&rp)
    };
    let predictions: Vec<MemoryPrediction> = plan.ranks.iter().map(as_f32).collect();
    if predictions.iter().any(|p| p.upper_bound) {
        return Ok(());
    }
    let total: u64 = predictions.iter().map(|p| p.peak_total).fold(0u64, u64::saturating_add);
    if total <= host {
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    Err(RunError::Choice {
        field: "run.backend".into(),
        message: format!(
            "the cpu backend would hold {:.1} GiB at its peak for its {} rank(s) in this process, more than this machine's {:.1} GiB",
            gib(total), plan.ranks.len(), gib(host)
        ),
        fix: "set backend = \"sim\" to predict this size, or shrink the model (tokens_per_rank, d_model, d_ffn, n_experts)".into(),
    })
}

/// Plan, execute and analyse `spec`, writing the run directory under `runs_root`.
pub fn run(spec: &ExperimentSpec, runs_root: &Path, hooks: &RunHooks) -> Result<RunOutcome, RunError> {
    let plan = Plan::build(spec)?;
    let mpmoe_setup = mpmoe_auto::Setup::new(spec)?;
    refuse_external_tutel_auto(spec)?;
    refuse_cpu_beyond_host_memory(&plan, host_memory_bytes())?;
    let dir = make_dir(runs_root, &spec.name)?;
    let io = |p: &Path, e: std::io::Error| RunError::Io { path: p.display().to_string(), message: e.to_string() };
    std::fs::write(dir.join("spec.toml"), spec.to_toml()).map_err(|e| io(&dir, e))?;
    let mut log = RunLog::create(&dir.join("run.log")).map_err(|e| io(&dir, e))?;
    log.line(&format!(
        "moelab {} run {:?}: variant {}, backend {}, world {}, {} ops per step",
        env!("CARGO_PKG_VERSION"), spec.name, spec.variant.as_str(), spec.run.backend.as_str(), spec.world(), plan.op_count()
    ));
    let mut failure = None;
    let mut plan = plan;
    let mut auto_degree = None;
    let mut auto_timed = Vec::new();
    match resolve_auto_degree(spec, &dir, hooks, &mut log, &mut auto_timed) {
        Ok(Some((resolved, choice))) => {
            plan = Plan::build(&resolved)?;
            log.line(&format!("measured steps use {}: {} ops per step", choice.describe(), plan.op_count()));
            auto_degree = Some(choice);
        }
        Ok(None) => {}
        Err(e) => {
            log.line(&format!("tutel auto degree: timing failed: {e}"));
            failure = Some(e);
        }
    }
    let mut mpmoe_auto = None;
    if let Some(setup) = mpmoe_setup {
        match setup.profile(hooks, &mut log, &mut auto_timed) {
            Ok((resolved, choice)) => {
                plan = Plan::build(&resolved)?;
                mpmoe_auto = Some(choice);
            }
            Err(e) => {
                log.line(&format!("mpmoe auto: profiling failed: {e}"));
                failure = Some(e);
            }
        }
    }
    if plan.spec != *spec && failure.is_none() {
        // An automatic choice was made: `spec.toml` records the spec the measured steps run
        // (on cuda the launcher writes it there for its workers too), the request beside it.
        std::fs::write(dir.join("spec.requested.toml"), spec.to_toml()).map_err(|e| io(&dir, e))?;
        std::fs::write(dir.join("spec.toml"), plan.spec.to_toml()).map_err(|e| io(&dir, e))?;
    }
    let predicted: Vec<MemoryPrediction> = plan.ranks.iter().map(predict).collect();
    let mut warnings = Vec::new();
    let (steps, trace, tracked) = if spec.run.backend == crate::spec::BackendKind::Cuda && failure.is_none() {
        let mut on_step = |r: &StepReport| {
            log.line(&step_line(r));
            if let Some(cb) = &hooks.on_step {
                cb(r);
            }
        };
        use crate::backend::cuda::{external, launch};
        // Under torchrun/srun this process is rank 0 (the others run `launch::run_peer`);
        // otherwise it starts one worker per GPU.
        let job = match external::detect_from_env() {
            Ok(None) => launch::run_job(&plan, &dir, &hooks.exec, &mut on_step),
            Ok(Some(ext)) if ext.rank == 0 => {
                let hash = crate::backend::cuda::rendezvous::spec_hash(spec);
                launch::run_external(&plan, &hooks.exec, &ext, &hash, &mut on_step)
            }
            Ok(Some(ext)) => launch::JobResult {
                failure: Some(BackendError::Crashed { rank: ext.rank as u32, message: "a non-zero rank of an external launch runs `launch::run_peer`, not `run`".into() }),
                ..Default::default()
            },
            Err(e) => launch::JobResult { failure: Some(BackendError::Crashed { rank: 0, message: e.to_string() }), ..Default::default() },
        };
        for n in &job.notes {
            log.line(n);
        }
        if let Some(e) = job.failure {
            log.line(&format!("step {} failed: {e}", job.steps.len()));
            failure = Some(e);
        } else if let Some(e) = job.steps.iter().find_map(|r| diverged(spec, r)) {
            // The job reports its steps as they come: a diverged one fails the run here.
            log.line(&format!("failed: {e}"));
            failure = Some(e);
        }
        (job.steps, job.trace, job.tracked)
    } else {
        let mut rt = crate::backend::runtime(plan, hooks.exec.clone());
        for note in rt.notes() {
            log.line(&note);
        }
        warnings = rt.warnings();
        let mut steps = Vec::new();
        let total = if failure.is_some() { 0 } else { spec.run.warmup + spec.run.steps };
        for i in 0..total {
            let measured = i >= spec.run.warmup;
            match rt.step(measured, None) {
                Ok(r) => {
                    log.line(&step_line(&r));
                    if let Some(cb) = &hooks.on_step {
                        cb(&r);
                    }
                    let diverged = diverged(spec, &r);
                    steps.push(r);
                    if let Some(e) = diverged {
                        log.line(&format!("failed: {e}"));
                        failure = Some(e);
                        break;
                    }
                }
                Err(e) => {
                    log.line(&format!("step {i} failed: {e}"));
                    failure = Some(e);
                    break;
                }
            }
        }
        (steps, rt.trace(), rt.tracked_peaks())
    };
    if let Some(a) = &mut mpmoe_auto {
        a.record_measurement(&steps, &mut log);
    }
    let analysis = analysis::analyze(&trace);
    // A file that cannot be written (a full disk) is named and the others still written, the
    // small summary last so it can list what is missing; a partial trace.json is removed (it
    // would be invalid JSON and holds the space the rest needs).
    let mut unsaved = Vec::new();
    if let Err(e) = analysis::tables::write_tables(&analysis, &dir) {
        unsaved.push(format!("tables: {e:#}"));
    }
    if let Err(e) = analysis::charts::write_charts(&analysis, &trace, &spec.name, &dir) {
        unsaved.push(format!("charts: {e}"));
    }
    if let Err(e) = chrome::write_chrome_trace(&trace, &dir.join("trace.json")) {
        let _ = std::fs::remove_file(dir.join("trace.json"));
        unsaved.push(format!("trace.json: {e}"));
    }
    let status = match &failure {
        None => "completed",
        Some(BackendError::Cancelled) => "cancelled",
        Some(_) => "failed",
    };
    let summary = Summary {
        name: &spec.name,
        variant: spec.variant.as_str(),
        backend: spec.run.backend.as_str(),
        world: spec.world(),
        status,
        error: failure.as_ref().map(|e| e.to_string()),
        steps: steps.iter().map(|s| StepJson {
            step: s.step, measured: s.measured, loss: s.loss, aux_loss: s.aux_loss, dropped: s.dropped, routed: s.routed, capacity: s.capacity.clone(), wall_s: s.wall_s,
        }).collect(),
        step_time_ms: (analysis.steps > 0).then(|| analysis.step_time_ns / 1e6),
        overlap: analysis.overall_overlap(),
        exposed_comm_ms: analysis.per_rank_step(analysis.exposed_comm_ns()) / 1e6,
        memory: predicted.iter().zip(&tracked).enumerate().map(|(rank, (p, t))| MemJson {
            rank, predicted_peak: p.peak_total, predicted_is_upper_bound: p.upper_bound, predicted_interleaved_peak: p.interleaved_peak, tracked_peak: t.0,
        }).collect(),
        tutel_auto_degree: auto_degree.clone(),
        mpmoe_auto: mpmoe_auto.clone(),
        auto_timed: if auto_degree.is_none() && mpmoe_auto.is_none() { auto_timed } else { Vec::new() },
        warnings: warnings.clone(),
        unsaved: unsaved.clone(),
    };
    let json = serde_json::to_string_pretty(&summary).expect("summary serializes");
    if let Err(e) = std::fs::write(dir.join("summary.json"), json) {
        unsaved.push(format!("summary.json: {e}"));
    }
    for u in &unsaved {
        log.line(&format!("could not write {u}"));
    }
    log.line(&format!("status: {status}"));
    if let Some(source) = failure {
        return Err(RunError::Backend { source, dir: dir.display().to_string() });
    }
    Ok(RunOutcome { dir, analysis, steps, predicted, tracked, trace, auto_degree, mpmoe_auto, warnings, unsaved })
}
