//! `summary.json` of a run directory, read leniently: every field the workbench shows, each
//! with a default, so summaries from older or failed runs still load.

use crate::error::WorkbenchError;
use moelab::run::RunOutcome;
use moelab::spec::ExperimentSpec;
use serde::Deserialize;
use std::path::Path;

/// One step's line of the summary.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct StepSummary {
    /// Step index counting warmup.
    pub step: usize,
    /// Whether the step was measured.
    pub measured: bool,
    /// Loss (NaN where the run has none: JSON `null`, a sim run's).
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    /// Load-balancing loss (NaN where the run has none).
    #[serde(deserialize_with = "nan_if_null")]
    pub aux_loss: f64,
    /// Dropped token assignments.
    pub dropped: usize,
    /// Routed token assignments.
    pub routed: usize,
    /// Wall seconds.
    pub wall_s: f64,
}

/// A number that JSON writes as `null` when it is NaN (serde_json has no NaN).
fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// One rank's memory line of the summary.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct MemSummary {
    /// Global rank.
    pub rank: usize,
    /// The plan's predicted peak, bytes.
    pub predicted_peak: u64,
    /// Whether the prediction is an upper bound (dropless).
    pub predicted_is_upper_bound: bool,
    /// The backend's tracked peak, bytes.
    pub tracked_peak: u64,
}

/// The headline facts of a run, as `summary.json` records them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct RunSummary {
    /// Experiment name.
    pub name: String,
    /// Variant.
    pub variant: String,
    /// Backend that ran it.
    pub backend: String,
    /// Ranks.
    pub world: usize,
    /// `completed`, `failed` or `cancelled`.
    pub status: String,
    /// The error of a failed run.
    pub error: Option<String>,
    /// One entry per step, warmup included.
    pub steps: Vec<StepSummary>,
    /// Mean step time of a rank, ms; NaN when no measured step ran (`null` in the file).
    #[serde(deserialize_with = "nan_if_null")]
    pub step_time_ms: f64,
    /// Share of communication overlapped with compute.
    pub overlap: f64,
    /// Exposed communication per rank and step, ms (runs before 2026-11-24 summed it over
    /// ranks and steps).
    pub exposed_comm_ms: f64,
    /// Predicted and tracked peak per rank.
    pub memory: Vec<MemSummary>,
}

impl RunSummary {
    /// Read `summary.json` from a run directory.
    pub fn read(dir: &Path) -> Result<Self, WorkbenchError> {
        let path = dir.join("summary.json");
        let text = std::fs::read_to_string(&path).map_err(|e| WorkbenchError::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| WorkbenchError::format(&path, format!("not a moelab run summary: {e}")))
    }

    /// The summary of a run that just completed in this process (what `summary.json` holds).
    pub fn from_outcome(spec: &ExperimentSpec, o: &RunOutcome) -> Self {
        RunSummary {
            name: spec.name.clone(),
            variant: spec.variant.as_str().to_string(),
            backend: spec.run.backend.as_str().to_string(),
            world: spec.world(),
            status: "completed".to_string(),
            error: None,
            steps: o
                .steps
                .iter()
                .map(|s| StepSummary {
                    step: s.step, measured: s.measured, loss: s.loss, aux_loss: s.aux_loss, dropped: s.dropped, routed: s.routed, wall_s: s.wall_s,
                })
                .collect(),
            step_time_ms: o.analysis.step_time_ns / 1e6,
            overlap: o.analysis.overall_overlap(),
            exposed_comm_ms: o.analysis.per_rank_step(o.analysis.exposed_comm_ns()) / 1e6,
            memory: o
                .predicted
                .iter()
                .zip(&o.tracked)
                .enumerate()
                .map(|(rank, (p, t))| MemSummary { rank, predicted_peak: p.peak_total, predicted_is_upper_bound: p.upper_bound, tracked_peak: t.0 })
                .collect(),
        }
    }

    /// Loss of the last measured step, when there is one and it has a loss (a sim run
    /// computes none: its losses read as NaN).
    pub fn final_loss(&self) -> Option<f64> {
        self.steps.iter().rev().find(|s| s.measured).map(|s| s.loss).filter(|l| l.is_finite())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sim_runs_null_losses_read_as_nan() {
        // serde_json writes NaN as null; a sim run has no loss.
        let s: StepSummary = serde_json::from_str(r#"{"step": 1, "measured": true, "loss": null, "aux_loss": null, "dropped": 0, "routed": 0, "wall_s": 0.002}"#).expect("reads");
        assert!(s.loss.is_nan() && s.aux_loss.is_nan() && s.wall_s == 0.002);
        let s: StepSummary = serde_json::from_str(r#"{"loss": 1.5}"#).expect("reads");
        assert_eq!(s.loss, 1.5);
    }

    #[test]
    fn a_sim_run_has_no_final_loss() {
        let s: RunSummary = serde_json::from_str(r#"{"backend":"sim","steps":[{"step":0,"measured":true,"loss":null}]}"#).expect("reads");
        assert_eq!(s.final_loss(), None);
        let s: RunSummary = serde_json::from_str(r#"{"steps":[{"step":0,"measured":true,"loss":1.25}]}"#).expect("reads");
        assert_eq!(s.final_loss(), Some(1.25));
    }
}
