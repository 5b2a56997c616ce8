//! A run the workbench is showing: summary, trace, analysis and timeline index together,
//! whether it just finished in a background job or was opened from `runs/`.

use crate::runs::RunSummary;
use crate::timeline::TimelineIndex;
use moelab::analysis::{self, Analysis};
use moelab::run::RunOutcome;
use moelab::spec::ExperimentSpec;
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
}

impl LoadedRun {
    /// Analyse and index a trace.
    pub fn new(label: String, dir: Option<PathBuf>, summary: RunSummary, trace: Trace) -> Self {
        let analysis = analysis::analyze(&trace);
        let index = TimelineIndex::build(&trace);
        LoadedRun { label, dir, summary, trace, analysis, index }
    }

    /// A run that just completed in this process.
    pub fn from_outcome(spec: &ExperimentSpec, outcome: RunOutcome) -> Self {
        let summary = RunSummary::from_outcome(spec, &outcome);
        let label = outcome.dir.file_name().map_or_else(|| spec.name.clone(), |n| n.to_string_lossy().into_owned());
        let index = TimelineIndex::build(&outcome.trace);
        LoadedRun { label, dir: Some(outcome.dir), summary, trace: outcome.trace, analysis: outcome.analysis, index }
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
