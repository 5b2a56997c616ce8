//! A run the workbench is showing: summary, trace, analysis and timeline index together,
//! whether it just finished in a background job or was opened from `runs/`.

use crate::runs::RunSummary;
use crate::timeline::TimelineIndex;
use moelab::analysis::{self, Analysis};
use moelab::run::RunOutcome;
use moelab::spec::{ExperimentSpec, ModelSpec};
use moelab::trace::Trace;
use std::path::PathBuf;

/// Everything the timeline and breakdown panes draw for one run.
#[derive(Debug, Clone)]
pub struct LoadedRun {
    /// What the panes call it (the run directory's name).
    pub label: String,
    /// The run directory, when there is one.
    pub dir: Option<PathBuf>,
    /// Headline facts (status, step time, predicted vs tracked memory).
    pub summary: RunSummary,
    /// The measured trace.
    pub trace: Trace,
    /// Stage table, overlap, memory breakdown.
    pub analysis: Analysis,
    /// Ops per lane, sorted for drawing and jumping.
    pub index: TimelineIndex,
    /// The model's sizes, when the run's spec is known (its `spec.toml`, or the job's spec).
    pub model: Option<ModelSpec>,
}

impl LoadedRun {
    /// Analyse and index a trace.
    pub fn new(label: String, dir: Option<PathBuf>, summary: RunSummary, trace: Trace) -> Self {
        let analysis = analysis::analyze(&trace);
        let index = TimelineIndex::build(&trace);
        LoadedRun { label, dir, summary, trace, analysis, index, model: None }
    }

    /// A run that just completed in this process.
    pub fn from_outcome(spec: &ExperimentSpec, outcome: RunOutcome) -> Self {
        let summary = RunSummary::from_outcome(spec, &outcome);
        let label = outcome.dir.file_name().map_or_else(|| spec.name.clone(), |n| n.to_string_lossy().into_owned());
        let index = TimelineIndex::build(&outcome.trace);
        let model = Some(spec.model.clone());
        LoadedRun { label, dir: Some(outcome.dir), summary, trace: outcome.trace, analysis: outcome.analysis, index, model }
    }

    /// Why the panes have nothing to break down, when no measured step finished (a run
    /// cancelled or failed during warmup keeps no op; one stopped in its first measured step
    /// keeps only unfinished ones), e.g. "no measured steps (cancelled during warmup, after 1
    /// warmup step)"; `None` when at least one step was measured.
    pub fn nothing_measured(&self) -> Option<String> {
        if self.analysis.steps > 0 {
            return None;
        }
        let warm = self.summary.steps.iter().filter(|s| !s.measured).count();
        let when = if self.analysis.unfinished_ops > 0 { "in its first measured step" } else { "during warmup" };
        let after = format!("after {warm} warmup step{}", if warm == 1 { "" } else { "s" });
        Some(match self.summary.status.as_str() {
            s @ ("cancelled" | "failed") => format!("no measured steps ({s} {when}, {after})"),
            _ => "no measured steps in this trace".to_string(),
        })
    }

    /// Mean step time of a rank in ms: from the trace's step spans, else from the summary
    /// (traces read back from `trace.json` carry no spans).
    pub fn step_time_ms(&self) -> f64 {
        if self.analysis.step_time_ns > 0.0 {
            self.analysis.step_time_ns / 1e6
        } else {
            self.summary.step_time_ms
        }
    }
}
