//! The stage table: time, count, work and share of step time per (stage, pass), summed over
//! ranks and measured steps.

use crate::taxonomy::{stage_label, Pass, Stage};
use crate::trace::Trace;
use std::collections::HashMap;

/// Aggregate of every op of one (stage, pass) over all ranks and steps.
#[derive(Debug, Clone, PartialEq)]
pub struct StageRow {
    /// The stage.
    pub stage: Stage,
    /// The pass.
    pub pass: Pass,
    /// Label such as `expert_gemm1_bwd` (see [`stage_label`]).
    pub label: String,
    /// Number of ops.
    pub count: u64,
    /// Summed op durations in ns, over ranks and steps.
    pub total_ns: u64,
    /// `total_ns / count`.
    pub mean_ns: f64,
    /// `total_ns` over the summed step spans of all ranks and steps; 0 without step spans.
    pub share: f64,
    /// Summed floating-point operations.
    pub flops: u64,
    /// Summed bytes moved.
    pub bytes: u64,
}

/// Builds the stage rows, ordered by [`Stage::ALL`] position and then by pass.
pub fn stage_rows(trace: &Trace) -> Vec<StageRow> {
    #[derive(Default)]
    struct Acc {
        count: u64,
        total_ns: u64,
        flops: u64,
        bytes: u64,
    }
    let mut acc: HashMap<(Stage, Pass), Acc> = HashMap::new();
    for op in &trace.ops {
        let a = acc.entry((op.stage, op.pass)).or_default();
        a.count += 1;
        a.total_ns += op.dur_ns();
        a.flops = a.flops.saturating_add(op.flops);
        a.bytes = a.bytes.saturating_add(op.bytes);
    }
    let step_total: u64 = trace
        .steps
        .iter()
        .map(|s| s.end_ns.saturating_sub(s.start_ns))
        .sum();
    let order = |s: Stage| {
        Stage::ALL
            .iter()
            .position(|x| *x == s)
            .unwrap_or(usize::MAX)
    };
    let mut rows: Vec<StageRow> = acc
        .into_iter()
        .map(|((stage, pass), a)| StageRow {
            stage,
            pass,
            label: stage_label(stage, pass),
            count: a.count,
            total_ns: a.total_ns,
            mean_ns: if a.count == 0 {
                0.0
            } else {
                a.total_ns as f64 / a.count as f64
            },
            share: if step_total == 0 {
                0.0
            } else {
                a.total_ns as f64 / step_total as f64
            },
            flops: a.flops,
            bytes: a.bytes,
        })
        .collect();
    rows.sort_by_key(|r| (order(r.stage), r.pass));
    rows
}
