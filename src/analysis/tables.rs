//! Analysis results as polars DataFrames, and their export to Parquet and CSV files for
//! notebooks and plotting scripts.

use super::Analysis;
use crate::taxonomy::MemCategory;
use polars::df;
use polars::prelude::{CsvWriter, DataFrame, ParquetWriter, PolarsError, PolarsResult, SerWriter};
use std::fs::File;
use std::path::{Path, PathBuf};

/// The stage table, one row per (stage, pass), with durations in ns.
pub fn stage_frame(analysis: &Analysis) -> PolarsResult<DataFrame> {
    let s = &analysis.stages;
    df!(
        "stage" => s.iter().map(|r| r.stage.as_str()).collect::<Vec<_>>(),
        "pass" => s.iter().map(|r| pass_str(r.pass)).collect::<Vec<_>>(),
        "label" => s.iter().map(|r| r.label.clone()).collect::<Vec<_>>(),
        "count" => s.iter().map(|r| r.count).collect::<Vec<_>>(),
        "total_ns" => s.iter().map(|r| r.total_ns).collect::<Vec<_>>(),
        "mean_ns" => s.iter().map(|r| r.mean_ns).collect::<Vec<_>>(),
        "share" => s.iter().map(|r| r.share).collect::<Vec<_>>(),
        "flops" => s.iter().map(|r| r.flops).collect::<Vec<_>>(),
        "bytes" => s.iter().map(|r| r.bytes).collect::<Vec<_>>(),
    )
}

/// The overlap table, one row per rank, with durations in ns.
pub fn overlap_frame(analysis: &Analysis) -> PolarsResult<DataFrame> {
    let o = &analysis.overlap;
    df!(
        "rank" => o.iter().map(|r| r.rank).collect::<Vec<_>>(),
        "span_ns" => o.iter().map(|r| r.span_ns).collect::<Vec<_>>(),
        "busy_ns" => o.iter().map(|r| r.busy_ns).collect::<Vec<_>>(),
        "idle_ns" => o.iter().map(|r| r.idle_ns).collect::<Vec<_>>(),
        "compute_ns" => o.iter().map(|r| r.compute_ns).collect::<Vec<_>>(),
        "comm_ns" => o.iter().map(|r| r.comm_ns).collect::<Vec<_>>(),
        "overlapped_ns" => o.iter().map(|r| r.overlapped_ns).collect::<Vec<_>>(),
        "exposed_comm_ns" => o.iter().map(|r| r.exposed_comm_ns).collect::<Vec<_>>(),
        "overlap_ratio" => o.iter().map(|r| r.overlap_ratio).collect::<Vec<_>>(),
        "a2a_ns" => o.iter().map(|r| r.a2a_ns).collect::<Vec<_>>(),
        "a2a_overlapped_ns" => o.iter().map(|r| r.a2a_overlapped_ns).collect::<Vec<_>>(),
        "a2a_overlap_ratio" => o.iter().map(|r| r.a2a_ratio()).collect::<Vec<_>>(),
    )
}

/// Collective time per (stage, pass): total, waiting for the group's last member and the
/// transfer after it, in ns; `unmatched` events had peers missing from the trace.
pub fn waits_frame(analysis: &Analysis) -> PolarsResult<DataFrame> {
    let w = &analysis.waits;
    df!(
        "stage" => w.iter().map(|r| r.stage.as_str()).collect::<Vec<_>>(),
        "pass" => w.iter().map(|r| pass_str(r.pass)).collect::<Vec<_>>(),
        "label" => w.iter().map(|r| r.label.clone()).collect::<Vec<_>>(),
        "count" => w.iter().map(|r| r.count).collect::<Vec<_>>(),
        "total_ns" => w.iter().map(|r| r.total_ns).collect::<Vec<_>>(),
        "wait_ns" => w.iter().map(|r| r.wait_ns).collect::<Vec<_>>(),
        "transfer_ns" => w.iter().map(|r| r.transfer_ns()).collect::<Vec<_>>(),
        "unmatched" => w.iter().map(|r| r.unmatched).collect::<Vec<_>>(),
    )
}

/// The memory breakdown in long format: one row per (rank, category), bytes at the rank's
/// peak and the category's own maximum.
pub fn memory_frame(analysis: &Analysis) -> PolarsResult<DataFrame> {
    let mut rank = Vec::new();
    let mut category = Vec::new();
    let mut at_peak = Vec::new();
    let mut max_bytes = Vec::new();
    for r in &analysis.memory.ranks {
        for c in MemCategory::ALL {
            rank.push(r.rank);
            category.push(c.as_str());
            at_peak.push(r.at_peak[c.index()]);
            max_bytes.push(r.max_per_category[c.index()]);
        }
    }
    df!(
        "rank" => rank,
        "category" => category,
        "bytes_at_peak" => at_peak,
        "max_bytes" => max_bytes,
    )
}

/// Why a table could not be built or written.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// A table's columns did not form a frame.
    #[error("building the {table} table: {source}")]
    Build {
        /// Which table.
        table: &'static str,
        /// What polars said.
        source: PolarsError,
    },
    /// A directory or file could not be created.
    #[error("creating {}: {source}", path.display())]
    Create {
        /// The path.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A frame could not be written.
    #[error("writing {}: {source}", path.display())]
    Write {
        /// The path.
        path: PathBuf,
        /// What polars said.
        source: PolarsError,
    },
}

/// Writes stages, overlap, memory and collective-wait tables into `dir` (created if missing), each as
/// `.parquet` and `.csv`; returns the paths written.
pub fn write_tables(analysis: &Analysis, dir: &Path) -> Result<Vec<PathBuf>, TableError> {
    let build = |table: &'static str, f: PolarsResult<DataFrame>| f.map_err(|source| TableError::Build { table, source }).map(|df| (table, df));
    let frames = vec![
        build("stages", stage_frame(analysis))?,
        build("overlap", overlap_frame(analysis))?,
        build("memory", memory_frame(analysis))?,
        build("waits", waits_frame(analysis))?,
    ];
    write_frames(frames, dir)
}

/// Writes each `(name, frame)` into `dir` (created if missing) as `name.parquet` and
/// `name.csv`; returns the paths written.
pub fn write_frames(frames: Vec<(&str, DataFrame)>, dir: &Path) -> Result<Vec<PathBuf>, TableError> {
    std::fs::create_dir_all(dir).map_err(|source| TableError::Create { path: dir.to_path_buf(), source })?;
    let mut written = Vec::with_capacity(frames.len() * 2);
    for (name, mut df) in frames {
        let pq = dir.join(format!("{name}.parquet"));
        let file = File::create(&pq).map_err(|source| TableError::Create { path: pq.clone(), source })?;
        ParquetWriter::new(file).finish(&mut df).map_err(|source| TableError::Write { path: pq.clone(), source })?;
        written.push(pq);
        let csv = dir.join(format!("{name}.csv"));
        let file = File::create(&csv).map_err(|source| TableError::Create { path: csv.clone(), source })?;
        CsvWriter::new(file).finish(&mut df).map_err(|source| TableError::Write { path: csv.clone(), source })?;
        written.push(csv);
    }
    Ok(written)
}

/// snake_case name of a pass, as in serialized traces.
fn pass_str(p: crate::taxonomy::Pass) -> &'static str {
    use crate::taxonomy::Pass;
    match p {
        Pass::Forward => "forward",
        Pass::Backward => "backward",
        Pass::Update => "update",
    }
}
