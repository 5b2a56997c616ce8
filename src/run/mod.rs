//! Running an experiment end to end: plan, execute, analyse, and keep everything in a run
//! directory `runs/<timestamp>-<name>/` (resolved spec, log, trace, tables, summary).
//! Nothing is lost: a failed or cancelled run still writes its spec, log, what it measured
//! and a status file naming the error.

pub mod compare;
mod log;

pub use log::RunLog;

use crate::analysis::{self, Analysis};
use crate::backend::cpu::CpuRuntime;
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
    step_time_ms: f64,
    overlap: f64,
    exposed_comm_ms: f64,
    memory: Vec<MemJson>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tutel_auto_degree: Option<AutoDegree>,
}

/// How `degree = "auto"` (variant tutel) was resolved: each candidate's mean step time.
#[derive(Debug, Clone, Serialize)]
pub struct AutoDegree {
    /// The degree the measured steps used.
    pub chosen: usize,
    /// (degree, mean wall seconds per timed step), in the order tried.
    pub candidates: Vec<(usize, f64)>,
    /// Steps timed per candidate (after one untimed step).
    pub timed_steps: usize,
}

/// Steps each `degree = "auto"` candidate is timed for (after one untimed step).
pub const AUTO_DEGREE_TIMED_STEPS: usize = 2;

/// Resolve Tutel's `degree = "auto"`: run each candidate degree's plan on the real backend
/// (a fresh runtime each, so the measured run starts from the same weights), time
/// [`AUTO_DEGREE_TIMED_STEPS`] steps after one untimed step, and return the spec with the
/// fastest degree fixed. `None` when the spec does not ask for it.
fn resolve_auto_degree(spec: &ExperimentSpec, hooks: &RunHooks, log: &mut RunLog) -> Result<Option<(ExperimentSpec, AutoDegree)>, BackendError> {
    use crate::spec::{Degree, TutelSpec, Variant};
    let Some(opts) = spec.tutel.filter(|o| spec.variant == Variant::Tutel && o.degree == Degree::Auto) else {
        return Ok(None);
    };
    let mut candidates = Vec::new();
    for d in TutelSpec::AUTO_CANDIDATES.into_iter().filter(|d| *d <= spec.tokens_per_rank()) {
        let mut s = spec.clone();
        s.tutel = Some(TutelSpec { degree: Degree::Fixed(d), ..opts });
        let plan = Plan::build(&s).expect("a validated tutel spec plans for every candidate degree");
        let mut rt = CpuRuntime::new(plan, hooks.exec.clone());
        rt.step(false, Some(0))?;
        let mut total = 0.0;
        for i in 0..AUTO_DEGREE_TIMED_STEPS {
            total += rt.step(false, Some(1 + i as u64))?.wall_s;
        }
        let mean = total / AUTO_DEGREE_TIMED_STEPS as f64;
        log.line(&format!("tutel auto degree: degree {d}: {:.3} ms per step ({AUTO_DEGREE_TIMED_STEPS} timed steps)", mean * 1e3));
        candidates.push((d, mean));
    }
    let chosen = candidates.iter().min_by(|a, b| a.1.total_cmp(&b.1)).map(|c| c.0).unwrap_or(1);
    log.line(&format!("tutel auto degree: chose degree {chosen}, the fastest mean step time of the candidates"));
    let mut s = spec.clone();
    s.tutel = Some(TutelSpec { degree: Degree::Fixed(chosen), ..opts });
    Ok(Some((s, AutoDegree { chosen, candidates, timed_steps: AUTO_DEGREE_TIMED_STEPS })))
}

#[derive(Serialize)]
struct StepJson {
    step: usize,
    measured: bool,
    loss: f64,
    aux_loss: f64,
    dropped: usize,
    routed: usize,
    wall_s: f64,
}

#[derive(Serialize)]
struct MemJson {
    rank: usize,
    predicted_peak: u64,
    predicted_is_upper_bound: bool,
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

/// Plan, execute and analyse `spec`, writing the run directory under `runs_root`.
pub fn run(spec: &ExperimentSpec, runs_root: &Path, hooks: &RunHooks) -> Result<RunOutcome, RunError> {
    let plan = Plan::build(spec)?;
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
    match resolve_auto_degree(spec, hooks, &mut log) {
        Ok(Some((resolved, choice))) => {
            plan = Plan::build(&resolved)?;
            log.line(&format!("measured steps use degree {}: {} ops per step", choice.chosen, plan.op_count()));
            auto_degree = Some(choice);
        }
        Ok(None) => {}
        Err(e) => {
            log.line(&format!("tutel auto degree: timing failed: {e}"));
            failure = Some(e);
        }
    }
    let predicted: Vec<MemoryPrediction> = plan.ranks.iter().map(predict).collect();
    let mut rt = CpuRuntime::new(plan, hooks.exec.clone());
    let mut steps = Vec::new();
    let total = if failure.is_some() { 0 } else { spec.run.warmup + spec.run.steps };
    for i in 0..total {
        let measured = i >= spec.run.warmup;
        match rt.step(measured, None) {
            Ok(r) => {
                log.line(&format!(
                    "step {i}{}: loss {:.6} aux {:.4} dropped {}/{} wall {:.3} s",
                    if measured { "" } else { " (warmup)" }, r.loss, r.aux_loss, r.dropped, r.routed, r.wall_s
                ));
                if let Some(cb) = &hooks.on_step {
                    cb(&r);
                }
                steps.push(r);
            }
            Err(e) => {
                log.line(&format!("step {i} failed: {e}"));
                failure = Some(e);
                break;
            }
        }
    }
    let trace = rt.trace();
    let tracked = rt.tracked_peaks();
    let analysis = analysis::analyze(&trace);
    chrome::write_chrome_trace(&trace, &dir.join("trace.json")).map_err(|e| io(&dir, e))?;
    if let Err(e) = analysis::tables::write_tables(&analysis, &dir) {
        log.line(&format!("could not write tables: {e:#}"));
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
            step: s.step, measured: s.measured, loss: s.loss, aux_loss: s.aux_loss, dropped: s.dropped, routed: s.routed, wall_s: s.wall_s,
        }).collect(),
        step_time_ms: analysis.step_time_ns / 1e6,
        overlap: analysis.overall_overlap(),
        exposed_comm_ms: analysis.overlap.iter().map(|r| r.exposed_comm_ns).sum::<u64>() as f64 / 1e6,
        memory: predicted.iter().zip(&tracked).enumerate().map(|(rank, (p, t))| MemJson {
            rank, predicted_peak: p.peak_total, predicted_is_upper_bound: p.upper_bound, tracked_peak: t.0,
        }).collect(),
        tutel_auto_degree: auto_degree.clone(),
    };
    let json = serde_json::to_string_pretty(&summary).expect("summary serializes");
    std::fs::write(dir.join("summary.json"), json).map_err(|e| io(&dir, e))?;
    log.line(&format!("status: {status}"));
    if let Some(source) = failure {
        return Err(RunError::Backend { source, dir: dir.display().to_string() });
    }
    Ok(RunOutcome { dir, analysis, steps, predicted, tracked, trace, auto_degree })
}
