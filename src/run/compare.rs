//! Side-by-side comparison of several runs: one row per experiment with step time,
//! communication, overlap and peak memory per category, as text and as a polars table.

use super::RunOutcome;
use crate::taxonomy::MemCategory;
use polars::prelude::{DataFrame, NamedFrom, PolarsResult, Series};

/// One experiment's headline numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct CompareRow {
    /// Experiment name.
    pub name: String,
    /// Variant.
    pub variant: String,
    /// Ranks.
    pub world: usize,
    /// Mean step time of a rank, ms.
    pub step_ms: f64,
    /// Communication time per rank and step (union of comm ops), ms.
    pub comm_ms: f64,
    /// Communication not hidden behind compute, per rank and step, ms.
    pub exposed_ms: f64,
    /// Share of communication overlapped with compute.
    pub overlap: f64,
    /// Share of all-to-all time hidden by compute (see [`crate::analysis::Analysis::a2a_overlap`]).
    pub a2a_overlap: f64,
    /// Highest peak over ranks, bytes.
    pub peak_bytes: u64,
    /// Bytes per category at that rank's peak.
    pub at_peak: [u64; 7],
    /// Final measured loss.
    pub loss: f64,
}

impl CompareRow {
    /// Summarise a completed run.
    pub fn from_outcome(name: &str, variant: &str, world: usize, o: &RunOutcome) -> Self {
        let a = &o.analysis;
        let worst = a.peak_memory_rank();
        CompareRow {
            name: name.to_string(),
            variant: variant.to_string(),
            world,
            step_ms: a.step_time_ns / 1e6,
            comm_ms: a.per_rank_step(a.comm_ns()) / 1e6,
            exposed_ms: a.per_rank_step(a.exposed_comm_ns()) / 1e6,
            overlap: a.overall_overlap(),
            a2a_overlap: a.a2a_overlap(),
            peak_bytes: worst.map_or(0, |r| r.peak_total),
            at_peak: worst.map_or([0; 7], |r| r.at_peak),
            loss: o.steps.last().map_or(f64::NAN, |s| s.loss),
        }
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Plain-text table, one line per experiment.
pub fn render(rows: &[CompareRow]) -> String {
    let mut out = format!(
        "{:<20} {:<8} {:>5} {:>9} {:>8} {:>10} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8}\n",
        "experiment", "variant", "world", "step ms", "comm ms", "exposed ms", "overlap", "a2a hid", "peak MiB", "activ", "comm_buf", "loss"
    );
    out.push_str(&"-".repeat(out.len() - 1));
    out.push('\n');
    for r in rows {
        out.push_str(&format!(
            "{:<20} {:<8} {:>5} {:>9.3} {:>8.3} {:>10.3} {:>7.1}% {:>7.1}% {:>9.2} {:>8.2} {:>8.2} {:>8}\n",
            r.name, r.variant, r.world, r.step_ms, r.comm_ms, r.exposed_ms, 100.0 * r.overlap, 100.0 * r.a2a_overlap, mib(r.peak_bytes),
            mib(r.at_peak[MemCategory::Activations.index()]), mib(r.at_peak[MemCategory::CommBuffers.index()]),
            if r.loss.is_finite() { format!("{:.5}", r.loss) } else { "-".to_string() }
        ));
    }
    out
}

/// The comparison as a DataFrame (one column per memory category, bytes at peak).
pub fn frame(rows: &[CompareRow]) -> PolarsResult<DataFrame> {
    let mut cols = vec![
        Series::new("experiment".into(), rows.iter().map(|r| r.name.clone()).collect::<Vec<_>>()).into(),
        Series::new("variant".into(), rows.iter().map(|r| r.variant.clone()).collect::<Vec<_>>()).into(),
        Series::new("world".into(), rows.iter().map(|r| r.world as u64).collect::<Vec<_>>()).into(),
        Series::new("step_ms".into(), rows.iter().map(|r| r.step_ms).collect::<Vec<_>>()).into(),
        Series::new("comm_ms".into(), rows.iter().map(|r| r.comm_ms).collect::<Vec<_>>()).into(),
        Series::new("exposed_comm_ms".into(), rows.iter().map(|r| r.exposed_ms).collect::<Vec<_>>()).into(),
        Series::new("overlap".into(), rows.iter().map(|r| r.overlap).collect::<Vec<_>>()).into(),
        Series::new("a2a_overlap".into(), rows.iter().map(|r| r.a2a_overlap).collect::<Vec<_>>()).into(),
        Series::new("peak_bytes".into(), rows.iter().map(|r| r.peak_bytes).collect::<Vec<_>>()).into(),
        // Null where there is no loss (the sim does no math), not NaN.
        Series::new("loss".into(), rows.iter().map(|r| r.loss.is_finite().then_some(r.loss)).collect::<Vec<_>>()).into(),
    ];
    for c in MemCategory::ALL {
        cols.push(Series::new(format!("{}_bytes", c.as_str()).into(), rows.iter().map(|r| r.at_peak[c.index()]).collect::<Vec<_>>()).into());
    }
    DataFrame::new_infer_height(cols)
}

/// Write `compare.parquet` and `compare.csv` into `dir`.
pub fn write(rows: &[CompareRow], dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>, crate::analysis::tables::TableError> {
    use crate::analysis::tables::{write_frames, TableError};
    let df = frame(rows).map_err(|source| TableError::Build { table: "comparison", source })?;
    write_frames(vec![("compare", df)], dir)
}
