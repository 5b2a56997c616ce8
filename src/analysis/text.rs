//! Plain-text rendering of an [`Analysis`] for the CLI: aligned tables for stages, overlap
//! and memory, using only std formatting and staying within about 100 columns.

use super::Analysis;
use crate::taxonomy::MemCategory;
use std::fmt::Write as _;

const NS_PER_MS: f64 = 1e6;
const NS_PER_US: f64 = 1e3;
const MIB: f64 = 1024.0 * 1024.0;

/// Short column headers for memory categories, in [`MemCategory::ALL`] order.
fn category_header(c: MemCategory) -> &'static str {
    match c {
        MemCategory::Params => "params",
        MemCategory::Grads => "grads",
        MemCategory::OptimizerState => "optim",
        MemCategory::Inputs => "inputs",
        MemCategory::Activations => "activ",
        MemCategory::Temporaries => "temps",
        MemCategory::CommBuffers => "comm_buf",
    }
}

/// Renders one table: first column left-aligned, others right-aligned, dashes under the
/// header and above an optional total line.
fn table(
    out: &mut String,
    title: &str,
    headers: &[&str],
    rows: &[Vec<String>],
    total: Option<Vec<String>>,
) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows.iter().chain(total.iter()) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line_width = widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1);
    let fmt_row = |cells: &[String]| -> String {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == 0 {
                let _ = write!(s, "{cell:<w$}");
            } else {
                let _ = write!(s, "  {cell:>w$}");
            }
        }
        s.trim_end().to_string()
    };
    let _ = writeln!(out, "{title}");
    let head: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    let _ = writeln!(out, "{}", fmt_row(&head));
    let _ = writeln!(out, "{}", "-".repeat(line_width));
    if rows.is_empty() {
        let _ = writeln!(out, "(none)");
    }
    for row in rows {
        let _ = writeln!(out, "{}", fmt_row(row));
    }
    if let Some(t) = total {
        let _ = writeln!(out, "{}", "-".repeat(line_width));
        let _ = writeln!(out, "{}", fmt_row(&t));
    }
}

impl Analysis {
    /// Human-readable report: a summary line, then the stage, overlap and memory-at-peak
    /// tables, each aligned in plain text.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "backend {}  ranks {}  steps {}  step time {:.3} ms",
            self.backend,
            self.world,
            self.steps,
            self.step_time_ns / NS_PER_MS
        );
        if self.unfinished_ops > 0 {
            let _ = writeln!(out, "({} ops of the unfinished last step are left out of these tables; trace.json keeps them)", self.unfinished_ops);
        }
        out.push('\n');

        // Stage table.
        let rows: Vec<Vec<String>> = self
            .stages
            .iter()
            .map(|r| {
                vec![
                    r.label.clone(),
                    r.count.to_string(),
                    format!("{:.3}", r.total_ns as f64 / NS_PER_MS),
                    format!("{:.1}", r.mean_ns / NS_PER_US),
                    format!("{:.1}", r.share * 100.0),
                    format!("{:.3}", r.flops as f64 / 1e9),
                    format!("{:.2}", r.bytes as f64 / 1e6),
                ]
            })
            .collect();
        let total = (!self.stages.is_empty()).then(|| {
            let sum = |f: fn(&super::StageRow) -> u64| -> u64 { self.stages.iter().map(f).sum() };
            vec![
                "total".to_string(),
                sum(|r| r.count).to_string(),
                format!("{:.3}", sum(|r| r.total_ns) as f64 / NS_PER_MS),
                String::new(),
                format!(
                    "{:.1}",
                    self.stages.iter().map(|r| r.share).sum::<f64>() * 100.0
                ),
                format!("{:.3}", sum(|r| r.flops) as f64 / 1e9),
                format!("{:.2}", sum(|r| r.bytes) as f64 / 1e6),
            ]
        });
        table(
            &mut out,
            "Stages (summed over ranks and steps)",
            &[
                "stage", "count", "total ms", "mean us", "share %", "GFLOP", "MB",
            ],
            &rows,
            total,
        );
        out.push('\n');

        let ms = |ns: u64| format!("{:.3}", ns as f64 / NS_PER_MS);
        // Collectives: waiting for the last member vs transfer (only where peers line up).
        if self.waits.iter().any(|w| w.count > w.unmatched) {
            let rows: Vec<Vec<String>> = self
                .waits
                .iter()
                .map(|w| {
                    vec![
                        w.label.clone(),
                        w.count.to_string(),
                        ms(w.total_ns),
                        ms(w.wait_ns),
                        ms(w.transfer_ns()),
                        format!("{:.1}", if w.total_ns == 0 { 0.0 } else { 100.0 * w.wait_ns as f64 / w.total_ns as f64 }),
                    ]
                })
                .collect();
            table(
                &mut out,
                "Collectives: waiting for the group's last member, then transfer (summed over ranks and steps)",
                &["stage", "count", "total ms", "wait ms", "transfer ms", "wait %"],
                &rows,
                None,
            );
            out.push('\n');
        }

        // Overlap table.
        let rows: Vec<Vec<String>> = self
            .overlap
            .iter()
            .map(|r| {
                vec![
                    r.rank.to_string(),
                    ms(r.comm_ns),
                    ms(r.overlapped_ns),
                    ms(r.exposed_comm_ns),
                    format!("{:.1}", r.overlap_ratio * 100.0),
                    ms(r.a2a_ns),
                    format!("{:.1}", r.a2a_ratio() * 100.0),
                    ms(r.compute_ns),
                    ms(r.idle_ns),
                ]
            })
            .collect();
        let total = (!self.overlap.is_empty()).then(|| {
            let sum =
                |f: fn(&super::RankOverlap) -> u64| -> u64 { self.overlap.iter().map(f).sum() };
            vec![
                "total".to_string(),
                ms(sum(|r| r.comm_ns)),
                ms(sum(|r| r.overlapped_ns)),
                ms(self.exposed_comm_ns()),
                format!("{:.1}", self.overall_overlap() * 100.0),
                ms(sum(|r| r.a2a_ns)),
                format!("{:.1}", self.a2a_overlap() * 100.0),
                ms(sum(|r| r.compute_ns)),
                ms(sum(|r| r.idle_ns)),
            ]
        });
        table(
            &mut out,
            "Compute/communication overlap per rank",
            &[
                "rank",
                "comm ms",
                "overlapped ms",
                "exposed ms",
                "overlap %",
                "a2a ms",
                "a2a hid %",
                "compute ms",
                "idle ms",
            ],
            &rows,
            total,
        );
        out.push('\n');

        // Memory at peak.
        let mut headers: Vec<&str> = vec!["rank"];
        headers.extend(MemCategory::ALL.iter().map(|c| category_header(*c)));
        headers.push("peak");
        let mib = |b: u64| format!("{:.1}", b as f64 / MIB);
        let rows: Vec<Vec<String>> = self
            .memory
            .ranks
            .iter()
            .map(|r| {
                let mut row = vec![r.rank.to_string()];
                row.extend(r.at_peak.iter().map(|b| mib(*b)));
                row.push(mib(r.peak_total));
                row
            })
            .collect();
        table(
            &mut out,
            "Memory at peak per rank (MiB)",
            &headers,
            &rows,
            None,
        );
        out
    }
}
