//! `moelab predict`: a completed run directory's measured trace against the `sim` backend's
//! run of the same spec (its `spec.toml`, with `run.backend = "sim"` and a profile), compared
//! by [`crate::analysis::prediction::compare`]. The sim run goes into a temporary runs
//! directory, removed afterwards, unless the caller names one to keep it; the measured run
//! directory is only read.
//!
//! The profile is the caller's, else the built-in one of the GPU the run recorded (the cuda
//! workers' `rank-<r>.json` records, else the `rank <r>: <GPU>` lines of `run.log`). Step
//! spans are not part of `trace.json`; a cuda run's `rank-<r>.json` records carry them.

pub mod render;

use super::run_file::read_run_file;
use super::{RunError, RunHooks};
use crate::analysis::prediction::{self, Comparison, PredictionError};
use crate::backend::sim::profile;
use crate::spec::overrides::Override;
use crate::spec::{ExperimentSpec, SpecError};
use crate::trace::chrome_import;
use crate::trace::{StepSpan, Trace};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Why a run directory could not be predicted.
#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    /// The path is not a directory.
    #[error("{path}: {why}")]
    Missing {
        /// The path given.
        path: String,
        /// "no such run directory", or what the path is instead.
        why: &'static str,
    },
    /// The run has no summary yet: it is still running, or its process was killed (SIGKILL,
    /// the machine went down) before it could record anything but its spec and log.
    #[error("{path}: the run has no summary.json: it is still running, or its process was killed before it finished (run.log's last line: {last})")]
    Killed {
        /// The run directory.
        path: String,
        /// The run log's last line.
        last: String,
    },
    /// A file of the run directory is missing or unreadable.
    #[error("{path}: cannot read {file}: {message} (is it a run directory written by `moelab run`?)")]
    Read {
        /// The run directory.
        path: String,
        /// The file within it.
        file: &'static str,
        /// What went wrong.
        message: String,
    },
    /// The run did not complete: its trace is partial.
    #[error("{path}: the run did not complete (status {status}{error}): only completed runs can be compared")]
    Incomplete {
        /// The run directory.
        path: String,
        /// `summary.json`'s status.
        status: String,
        /// `, error: ...` when the summary names one.
        error: String,
    },
    /// `spec.toml` with `run.backend = "sim"` is not a valid sim spec.
    #[error("{path}: its spec cannot be simulated: {source}")]
    Spec {
        /// The run directory.
        path: String,
        /// The spec error.
        source: SpecError,
    },
    /// No profile was given and the run names no GPU.
    #[error("{path}: the run records no GPU (backend {backend}), so the profile cannot be chosen from it: pass --profile (h200, h100 or a profile TOML)")]
    NoDevice {
        /// The run directory.
        path: String,
        /// The measured backend.
        backend: String,
    },
    /// No profile was given and no built-in profile describes the run's GPU.
    #[error("{path}: no built-in profile for the run's GPU {device}: pass --profile <profile.toml>")]
    UnknownDevice {
        /// The run directory.
        path: String,
        /// The GPU name.
        device: String,
    },
    /// The sim run failed.
    #[error("{path}: the sim run failed: {source}")]
    Sim {
        /// The run directory.
        path: String,
        /// The run error.
        source: RunError,
    },
    /// The traces cannot be compared.
    #[error("{path}: {source}")]
    Compare {
        /// The run directory.
        path: String,
        /// Why.
        source: PredictionError,
    },
}

/// The fields of `summary.json` prediction needs (the rest is ignored).
#[derive(Debug, Deserialize)]
struct SummaryFields {
    name: String,
    backend: String,
    status: String,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    tutel_auto_degree: Option<serde_json::Value>,
    #[serde(default)]
    mpmoe_auto: Option<serde_json::Value>,
    #[serde(default)]
    steps: Vec<SummaryStep>,
}

/// A step of `summary.json`: what routing did (a dropless plan's capacity is its fullest
/// expert's load).
#[derive(Debug, Deserialize)]
struct SummaryStep {
    #[serde(default)]
    measured: bool,
    #[serde(default)]
    routed: usize,
    #[serde(default)]
    dropped: usize,
    #[serde(default)]
    capacity: Vec<usize>,
}

/// What routing did in one measured step (from `summary.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepLoad {
    /// Assignments routed (tokens x choices, over the layers).
    pub routed: usize,
    /// Assignments the capacity dropped.
    pub dropped: usize,
    /// The fullest expert's load (the largest of the layers' capacities).
    pub fullest: usize,
}

/// The fields of a cuda worker's `rank-<r>.json` prediction needs.
#[derive(Debug, Deserialize)]
struct RankFields {
    #[serde(default)]
    device: String,
    #[serde(default)]
    steps: Vec<StepSpan>,
    #[serde(default)]
    host_copies: bool,
}

/// A completed run directory, read.
#[derive(Debug, Clone)]
pub struct MeasuredRun {
    /// The run directory.
    pub dir: PathBuf,
    /// Experiment name.
    pub name: String,
    /// Backend that measured it.
    pub backend: String,
    /// The GPU the run recorded (rank 0's), if any.
    pub device: Option<String>,
    /// Its trace: `trace.json`, with the step spans of the workers' records when present.
    pub trace: Trace,
    /// Choices made at run start (Tutel's degree / parallelism, MPMoE's chunks /
    /// reuse = "auto") as overrides, so the sim runs what was measured.
    pub pinned: Vec<Override>,
    /// What routing did in each measured step, from `summary.json`.
    pub loads: Vec<StepLoad>,
    /// Every rank's executor kept host copies of its routing tables (the workers' records
    /// say so; records before 2026-11-24 do not): the sim's `run.host_copies`.
    pub host_copies: bool,
    /// A sim run's own profile (`run.profile`, else the sim's default `h100`): what it
    /// predicted on, used when no profile is given.
    pub sim_profile: Option<String>,
}

impl MeasuredRun {
    /// Read a run directory: `summary.json` (must say `completed`), `trace.json` (or
    /// `trace.json.gz`, see [`read_run_file`]),
    /// `spec.toml` (checked when simulated), and the GPU and step spans when recorded.
    pub fn load(dir: &Path) -> Result<MeasuredRun, PredictError> {
        let path = dir.display().to_string();
        if !dir.is_dir() {
            let why = if dir.is_file() { "a file, not a run directory (give the folder `moelab run` wrote)" } else { "no such run directory" };
            return Err(PredictError::Missing { path, why });
        }
        if !dir.join("summary.json").exists() && dir.join("spec.toml").is_file() {
            if let Ok(log) = std::fs::read_to_string(dir.join("run.log")) {
                let last = log.lines().last().unwrap_or("(empty)").to_string();
                return Err(PredictError::Killed { path, last });
            }
        }
        let read = |file: &'static str| {
            std::fs::read_to_string(dir.join(file)).map_err(|e| PredictError::Read { path: path.clone(), file, message: e.to_string() })
        };
        let summary: SummaryFields = serde_json::from_str(&read("summary.json")?)
            .map_err(|e| PredictError::Read { path: path.clone(), file: "summary.json", message: format!("not a moelab run summary: {e}") })?;
        if summary.status != "completed" {
            let error = summary.error.map(|e| format!(", error: {e}")).unwrap_or_default();
            return Err(PredictError::Incomplete { path, status: summary.status, error });
        }
        if !dir.join("spec.toml").is_file() {
            return Err(PredictError::Read { path, file: "spec.toml", message: "no such file".into() });
        }
        let (trace_text, _) = read_run_file(dir, "trace.json").map_err(|e| PredictError::Read { path: path.clone(), file: "trace.json", message: e.to_string() })?;
        let mut trace = chrome_import::trace_from_chrome(&trace_text, &summary.backend)
            .map_err(|e| PredictError::Read { path: path.clone(), file: "trace.json", message: e.to_string() })?;
        let records = rank_records(dir, trace.world);
        let mut device = records.first().map(|r| r.device.clone()).filter(|d| !d.is_empty());
        if device.is_none() {
            device = device_from_log(&dir.join("run.log"));
        }
        let host_copies = !records.is_empty() && records.iter().all(|r| r.host_copies);
        if records.len() as u32 == trace.world && records.iter().all(|r| !r.steps.is_empty()) {
            trace.steps = records.into_iter().flat_map(|r| r.steps).collect();
        }
        let pinned = pinned_choices(summary.tutel_auto_degree.as_ref(), summary.mpmoe_auto.as_ref());
        let loads = summary.steps.iter().filter(|s| s.measured && s.routed > 0).filter_map(|s| Some(StepLoad { routed: s.routed, dropped: s.dropped, fullest: *s.capacity.iter().max()? })).collect();
        let sim_profile = (summary.backend == "sim")
            .then(|| crate::spec::load_file(&dir.join("spec.toml")).ok().map(|s| s.run.profile.unwrap_or_else(|| "h100".into())))
            .flatten();
        Ok(MeasuredRun { dir: dir.to_path_buf(), name: summary.name, backend: summary.backend, device, trace, pinned, loads, host_copies, sim_profile })
    }

    /// The spec of the run on the sim backend with profile `profile`, after the pinned
    /// choices and then `extra` (the caller's `--set` overrides) are applied.
    pub fn sim_spec(&self, profile: &str, extra: &[Override]) -> Result<ExperimentSpec, PredictError> {
        let set = |k: &str, v: &str| Override { key: vec!["run".into(), k.into()], value: Some(toml::Value::String(v.into())) };
        let mut overrides = self.pinned.clone();
        overrides.extend(extra.iter().cloned());
        overrides.extend([set("backend", "sim"), set("profile", profile)]);
        let mut spec = crate::spec::load_file_with(&self.dir.join("spec.toml"), &overrides)
            .map_err(|source| PredictError::Spec { path: self.dir.display().to_string(), source })?;
        // A sim run already states its routing and executor settings: it is simulated as it
        // ran (on the profile asked for).
        if self.backend == "sim" {
            return Ok(spec);
        }
        // A dropless run is simulated at its measured imbalance unless the caller sets one.
        if spec.model.dropless && !extra.iter().any(|o| o.key == ["run", "dropless_imbalance"]) {
            spec.run.dropless_imbalance = self.dropless_imbalance(spec.model.n_experts);
        }
        // A capacity run is simulated at the share of assignments it kept, likewise.
        if !spec.model.dropless && !extra.iter().any(|o| o.key == ["run", "kept_share"]) {
            spec.run.kept_share = self.kept_share();
        }
        // The run's executor: host copies of routing tables, or a synchronising copy per read.
        if !extra.iter().any(|o| o.key == ["run", "host_copies"]) {
            spec.run.host_copies = Some(self.host_copies);
        }
        // A run over expert-parallel ranks at the rows each rank's experts took.
        if spec.layout.ep > 1 && !extra.iter().any(|o| o.key == ["run", "rank_loads"]) {
            spec.run.rank_loads = self.rank_loads(&spec);
        }
        Ok(spec)
    }

    /// Rows each expert-parallel rank's experts took, relative to the mean (the sim's
    /// `run.rank_loads`, dropless or capacity): the bytes each rank sent in the all-to-alls
    /// that carry rows back from its experts (exactly the rows they took; a capacity plan's
    /// zero rows are not sent), over the measured steps, ranks of one expert-parallel index
    /// together. `None` when the plan cannot be built or the trace has no such all-to-all.
    pub fn rank_loads(&self, spec: &ExperimentSpec) -> Option<Vec<f64>> {
        let plan = crate::plan::Plan::build(spec).ok()?;
        let ep = spec.layout.ep;
        let mut rows = vec![0.0f64; ep];
        for rp in &plan.ranks {
            let Some(index) = crate::backend::sim::ep_index(rp).filter(|i| *i < ep) else { continue };
            let returns = returning_all_to_alls(rp);
            rows[index] += self.trace.ops.iter().filter(|e| e.rank == rp.rank && returns.contains(e.name.as_str())).map(|e| e.bytes as f64).sum::<f64>();
        }
        let mean = rows.iter().sum::<f64>() / ep as f64;
        (mean > 0.0 && rows.iter().all(|r| *r > 0.0)).then(|| rows.iter().map(|r| r / mean).collect())
    }

    /// The measured imbalance of a dropless run with `n_experts` experts: the fullest
    /// expert's load over the mean, averaged over the measured steps (at least 1); `None`
    /// without step records.
    pub fn dropless_imbalance(&self, n_experts: usize) -> Option<f64> {
        let ratios: Vec<f64> = self.loads.iter().map(|l| l.fullest as f64 * n_experts as f64 / l.routed as f64).collect();
        (!ratios.is_empty()).then(|| (ratios.iter().sum::<f64>() / ratios.len() as f64).max(1.0))
    }

    /// The measured share of routed assignments a capacity run kept, `1 - dropped / routed`
    /// averaged over the measured steps; `None` without step records.
    pub fn kept_share(&self) -> Option<f64> {
        let shares: Vec<f64> = self.loads.iter().map(|l| 1.0 - l.dropped as f64 / l.routed as f64).collect();
        (!shares.is_empty()).then(|| (shares.iter().sum::<f64>() / shares.len() as f64).clamp(1e-6, 1.0))
    }
}

/// Names of rank `rp`'s all-to-alls that carry rows back from its experts: those whose send
/// counts an expert unlayout writes (the rows the rank's experts took, forward and backward),
/// and those whose send buffer is routing-sized (dropless: also Tutel's sharded experts, whose
/// counts come from `ShardCounts`).
fn returning_all_to_alls(rp: &crate::plan::RankPlan) -> std::collections::HashSet<&str> {
    use crate::plan::OpKind::*;
    let unlayout_counts: std::collections::HashSet<crate::plan::BufId> = rp
        .ops
        .iter()
        .filter_map(|op| match &op.kind {
            ExpertUnlayout { send_counts, .. } | ChunkUnlayout { send_counts, .. } | TpUnlayout { send_counts, .. } => Some(*send_counts),
            _ => None,
        })
        .collect();
    rp.ops
        .iter()
        .filter(|op| match &op.kind {
            AllToAllV { send, send_counts, .. } | AllToAllV2d { send, send_counts, .. } => unlayout_counts.contains(send_counts) || rp.buffer(*send).dynamic,
            _ => false,
        })
        .map(|op| op.name.as_str())
        .collect()
}

/// The readable `rank-<r>.json` records, in rank order, stopping at the first missing one.
fn rank_records(dir: &Path, world: u32) -> Vec<RankFields> {
    (0..world)
        .map_while(|r| {
            let (text, _) = read_run_file(dir, &format!("rank-{r}.json")).ok()?;
            serde_json::from_str::<RankFields>(&text).ok()
        })
        .collect()
}

/// The GPU of the first `rank <r>: NVIDIA ...` line of a run log (what the cuda launcher
/// logs when a worker is ready).
fn device_from_log(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let rest = &l[l.find("rank ")? + 5..];
        let (rank, what) = rest.split_once(": ")?;
        (rank.chars().all(|c| c.is_ascii_digit()) && what.starts_with("NVIDIA ")).then(|| what.trim().to_string())
    })
}

/// Overrides that fix the automatic choices recorded in `summary.json`.
fn pinned_choices(tutel: Option<&serde_json::Value>, mpmoe: Option<&serde_json::Value>) -> Vec<Override> {
    let mut out = Vec::new();
    let mut pin = |table: &str, key: &str, v: Option<&serde_json::Value>| {
        if let Some(value) = v.and_then(|v| toml::Value::try_from(v).ok()) {
            out.push(Override { key: vec![table.into(), key.into()], value: Some(value) });
        }
    };
    if let Some(t) = tutel {
        pin("tutel", "degree", t.get("chosen"));
        pin("tutel", "r", t.get("chosen_r"));
        pin("tutel", "parallelism", Some(&serde_json::Value::String("fixed".into())));
        pin("tutel", "layers", t.get("per_layer").filter(|l| l.as_array().is_some_and(|a| !a.is_empty())));
    }
    if let Some(m) = mpmoe {
        pin("mpmoe", "chunks", m.get("chosen_chunks"));
        pin("mpmoe", "reuse", m.get("chosen_reuse"));
        // A memory budget only limits an automatic choice: with both fixed it is refused.
        out.push(Override { key: vec!["mpmoe".into(), "memory_budget_mib".into()], value: None });
    }
    out
}

/// Where the profile came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProfileSource {
    /// `--profile`.
    Given,
    /// The GPU the run recorded.
    Device,
    /// A sim run's own `run.profile`.
    Spec,
}

/// `dirs` with every folder that is not a run directory itself (no `summary.json`) but holds
/// run directories replaced by those, sorted: `moelab predict runs/` predicts every run in
/// it. Anything else is kept as given, so that loading it says what is wrong.
pub fn expand_run_dirs(dirs: &[PathBuf]) -> Vec<PathBuf> {
    // A run directory has its summary, or (a killed run) its spec and log.
    let is_run = |d: &Path| d.join("summary.json").is_file() || (d.join("spec.toml").is_file() && d.join("run.log").is_file());
    let mut out = Vec::new();
    for d in dirs {
        let mut inner: Vec<PathBuf> = if d.is_dir() && !is_run(d) {
            std::fs::read_dir(d).into_iter().flatten().flatten().map(|e| e.path()).filter(|p| is_run(p)).collect()
        } else {
            Vec::new()
        };
        if inner.is_empty() {
            out.push(d.clone());
        } else {
            inner.sort();
            out.extend(inner);
        }
    }
    out
}

/// The sim profile for `run`: `given` when set, else the built-in profile of its GPU, else
/// (a sim run) the profile it ran on.
pub fn choose_profile(run: &MeasuredRun, given: Option<&str>) -> Result<(String, ProfileSource), PredictError> {
    if let Some(p) = given {
        return Ok((p.to_string(), ProfileSource::Given));
    }
    if let (None, Some(p)) = (&run.device, &run.sim_profile) {
        return Ok((p.clone(), ProfileSource::Spec));
    }
    let path = run.dir.display().to_string();
    let device = run.device.as_deref().ok_or_else(|| PredictError::NoDevice { path: path.clone(), backend: run.backend.clone() })?;
    profile::builtin_for_device(device)
        .map(|p| (p.to_string(), ProfileSource::Device))
        .ok_or_else(|| PredictError::UnknownDevice { path, device: device.to_string() })
}

/// What `moelab predict` does with each run directory.
#[derive(Debug, Clone, Default)]
pub struct PredictOptions {
    /// Profile for every run (built-in name or TOML path); `None`: from each run's GPU.
    pub profile: Option<String>,
    /// Keep the sim runs here; `None`: a temporary directory, removed afterwards.
    pub runs_dir: Option<PathBuf>,
    /// Overrides applied to every sim spec (the CLI's `--set`), before backend and profile.
    pub overrides: Vec<Override>,
}

/// One run directory predicted.
#[derive(Debug, Clone, Serialize)]
pub struct RunPrediction {
    /// The measured run directory.
    pub dir: PathBuf,
    /// Experiment name.
    pub name: String,
    /// The GPU the run recorded.
    pub device: Option<String>,
    /// The sim profile used.
    pub profile: String,
    /// Where the profile came from.
    pub profile_source: ProfileSource,
    /// The kept sim run directory (with `runs_dir`).
    pub sim_dir: Option<PathBuf>,
    /// The fullest expert's load over the mean that the sim assumed (dropless runs: the
    /// measured one, or the caller's `run.dropless_imbalance`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropless_imbalance: Option<f64>,
    /// The share of routed assignments the sim assumed kept (capacity runs: the measured one,
    /// or the caller's `run.kept_share`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept_share: Option<f64>,
    /// Rows each expert-parallel rank's experts took over the mean that the sim assumed (runs
    /// at ep > 1: the measured ones, or the caller's `run.rank_loads`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank_loads: Option<Vec<f64>>,
    /// Measured vs predicted.
    pub comparison: Comparison,
}

/// Simulate `run`'s spec on the sim backend with `opts` and compare.
pub fn predict(run: &MeasuredRun, opts: &PredictOptions) -> Result<RunPrediction, PredictError> {
    let path = run.dir.display().to_string();
    let (profile, profile_source) = choose_profile(run, opts.profile.as_deref())?;
    let spec = run.sim_spec(&profile, &opts.overrides)?;
    let temp = TempRoot::new(opts.runs_dir.is_none());
    let root = opts.runs_dir.clone().unwrap_or_else(|| temp.path.clone());
    let outcome = super::run(&spec, &root, &RunHooks::default()).map_err(|source| PredictError::Sim { path: path.clone(), source })?;
    let comparison = prediction::compare(&run.trace, &outcome.trace).map_err(|source| PredictError::Compare { path, source })?;
    Ok(RunPrediction {
        dir: run.dir.clone(),
        name: run.name.clone(),
        device: run.device.clone(),
        profile,
        profile_source,
        sim_dir: opts.runs_dir.as_ref().map(|_| outcome.dir.clone()),
        dropless_imbalance: spec.run.dropless_imbalance,
        kept_share: spec.run.kept_share,
        rank_loads: spec.run.rank_loads.clone(),
        comparison,
    })
}

/// A temporary runs root, removed on drop (when used).
struct TempRoot {
    path: PathBuf,
    used: bool,
}

impl TempRoot {
    fn new(used: bool) -> TempRoot {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        TempRoot { path: std::env::temp_dir().join(format!("moelab-predict-{}-{nanos}", std::process::id())), used }
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        if self.used {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
