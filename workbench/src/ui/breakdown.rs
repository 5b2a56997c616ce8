//! The breakdown pane: the stage table with each stage's share of step time as a bar, the
//! overlap figures per rank, and the memory at peak per category as bars; with a second run
//! picked, the two side by side with every difference beyond 5% marked better or worse.

use super::composer::memory_lines;
use super::{dim_style, error_style, ok_style, stage_color, truncate};
use crate::app::App;
use crate::compare::{compare, mismatch_warning, Verdict};
use crate::loaded::LoadedRun;
use crate::units::{fmt_bytes, fmt_ns};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table, Wrap};
use ratatui::Frame;

/// Draw the pane.
pub fn draw(f: &mut Frame, area: Rect, app: &App) {
    let Some(a) = app.current.as_ref() else {
        let p = Paragraph::new(vec![
            Line::raw("No run loaded."),
            Line::styled("Run a job or open a past run (Runs, 5); pick a second one with c to compare.", dim_style()),
        ])
        .wrap(Wrap { trim: false })
        .block(Block::bordered().title(" Breakdown "));
        f.render_widget(p, area);
        return;
    };
    // A run with no measured step has no stage, overlap or step figure to show or compare.
    let unmeasured = [Some(a), app.compare.as_ref()].into_iter().flatten().find_map(|r| r.nothing_measured().map(|why| (r, why)));
    if let Some((r, why)) = unmeasured {
        return draw_unmeasured(f, area, r, &why, app.compare.is_some());
    }
    match app.compare.as_ref() {
        Some(b) => draw_compare(f, area, a, b, app.breakdown_scroll),
        None => draw_single(f, area, a, app.memory_rank, app.breakdown_scroll),
    }
}

/// The message that stands in for the tables of a run with no measured step.
fn draw_unmeasured(f: &mut Frame, area: Rect, run: &LoadedRun, why: &str, comparing: bool) {
    let mut lines = vec![
        Line::styled(why.to_string(), bold()),
        Line::styled("No stage table, overlap or step time: they are figures of measured steps.", dim_style()),
    ];
    if let Some(e) = run.summary.error.as_ref().filter(|_| run.summary.status != "cancelled") {
        lines.push(Line::styled(format!("error: {e}"), error_style()));
    }
    if let Some(m) = run.summary.memory.iter().max_by_key(|m| m.predicted_peak) {
        lines.push(Line::raw(format!("plan predicted peak {} (rank {}, busiest)", fmt_bytes(m.predicted_peak), m.rank)));
    }
    if comparing {
        lines.push(Line::styled("c clears the comparison.", dim_style()));
    }
    let title = format!(" {} · {} ", run.label, run.summary.variant);
    let block = Block::bordered().title(truncate(&title, area.width.saturating_sub(2) as usize));
    f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }).block(block), area);
}

/// The rows of a table in `area` (bordered, one header row) from `scroll` on, the offset
/// clamped so the last row stays in view, and a title note saying which rows show.
fn scrolled<T>(rows: Vec<T>, area: Rect, scroll: usize) -> (Vec<T>, String) {
    let visible = (area.height as usize).saturating_sub(3).max(1);
    let n = rows.len();
    if n <= visible {
        return (rows, String::new());
    }
    let first = scroll.min(n - visible);
    let note = format!(" rows {}-{} of {n} · ↑↓ scroll ", first + 1, first + visible);
    (rows.into_iter().skip(first).collect(), note)
}

fn bold() -> Style {
    Style::new().add_modifier(Modifier::BOLD)
}

fn draw_single(f: &mut Frame, area: Rect, run: &LoadedRun, memory_rank: Option<usize>, scroll: usize) {
    let bottom_h = (run.analysis.memory.ranks.len().max(7) as u16 + 3).min(area.height / 2).max(6);
    let [top, bottom] = Layout::vertical([Constraint::Min(5), Constraint::Length(bottom_h)]).areas(area);
    let [ov_area, mem_area] = Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(bottom);
    draw_stages(f, top, run, scroll);
    draw_overlap(f, ov_area, run);
    draw_memory(f, mem_area, run, memory_rank);
}

fn draw_stages(f: &mut Frame, area: Rect, run: &LoadedRun, scroll: usize) {
    let a = &run.analysis;
    let mut stages: Vec<_> = a.stages.iter().collect();
    stages.sort_by(|x, y| y.total_ns.cmp(&x.total_ns));
    let bar_w = (area.width as usize).saturating_sub(66).clamp(4, 40);
    let per = (a.overlap.len().max(1) * a.steps.max(1) as usize) as f64;
    let top = stages.first().map_or(1, |s| s.total_ns).max(1);
    let rows: Vec<Row> = stages
        .iter()
        .map(|s| {
            let n = ((s.total_ns as f64 / top as f64) * bar_w as f64).round() as usize;
            Row::new(vec![
                Cell::from(s.label.clone()).style(Style::new().fg(stage_color(s.stage))),
                Cell::from(s.count.to_string()),
                Cell::from(fmt_ns(s.total_ns as f64 / per)),
                Cell::from(fmt_ns(s.mean_ns)),
                Cell::from(if s.share > 0.0 { format!("{:.1}%", 100.0 * s.share) } else { "-".into() }),
                Cell::from(Line::styled("█".repeat(n.max(1)), Style::new().fg(stage_color(s.stage)))),
            ])
        })
        .collect();
    let header = Row::new(["stage", "ops", "per rank·step", "mean", "share", "time"]).style(bold());
    let widths = [
        Constraint::Length(20),
        Constraint::Length(6),
        Constraint::Length(13),
        Constraint::Length(10),
        Constraint::Length(6),
        Constraint::Min(4),
    ];
    let (rows, shown) = scrolled(rows, area, scroll);
    let title = format!(
        " {} · {} · step {:.2} ms · {} ranks × {} steps ",
        run.label, run.summary.variant, run.step_time_ms(), a.overlap.len(), a.steps
    );
    let block = Block::bordered().title(truncate(&title, area.width.saturating_sub(2) as usize)).title_bottom(Line::from(shown).right_aligned());
    f.render_widget(Table::new(rows, widths).header(header).block(block), area);
}

fn draw_overlap(f: &mut Frame, area: Rect, run: &LoadedRun) {
    let a = &run.analysis;
    let steps = a.steps.max(1) as f64;
    // Narrow panes drop the comm column (compute, exposed and hidden share say the most).
    let narrow = area.width < 40;
    let rows: Vec<Row> = a
        .overlap
        .iter()
        .map(|o| {
            let exp = Cell::from(fmt_ns(o.exposed_comm_ns as f64 / steps)).style(if o.exposed_comm_ns > 0 { error_style() } else { Style::new() });
            let mut cells = vec![Cell::from(o.rank.to_string()), Cell::from(fmt_ns(o.compute_ns as f64 / steps))];
            if !narrow {
                cells.push(Cell::from(fmt_ns(o.comm_ns as f64 / steps)));
            }
            cells.extend([exp, Cell::from(format!("{:.0}%", 100.0 * o.overlap_ratio))]);
            Row::new(cells)
        })
        .collect();
    let (header, widths) = if narrow {
        (Row::new(["rank", "compute", "exposed", "hid"]), vec![Constraint::Length(4), Constraint::Length(9), Constraint::Length(9), Constraint::Length(4)])
    } else {
        (
            Row::new(["rank", "compute", "comm", "exposed", "hid"]),
            vec![Constraint::Length(4), Constraint::Min(9), Constraint::Min(9), Constraint::Min(9), Constraint::Length(4)],
        )
    };
    let header = header.style(bold());
    let title = format!(" Overlap {:.0}% · per step ", 100.0 * a.overall_overlap());
    f.render_widget(Table::new(rows, widths).header(header).block(Block::bordered().title(title)), area);
}

fn draw_memory(f: &mut Frame, area: Rect, run: &LoadedRun, memory_rank: Option<usize>) {
    let ranks = &run.analysis.memory.ranks;
    let pick = match memory_rank {
        Some(r) => ranks.get(r),
        None => ranks.iter().max_by_key(|m| m.peak_total),
    };
    let Some(m) = pick else {
        f.render_widget(Paragraph::new("no memory events in this trace").block(Block::bordered().title(" Memory ")), area);
        return;
    };
    let which = if memory_rank.is_some() { "" } else { ", busiest" };
    let title = format!(" Memory rank {}{which}: peak {} ", m.rank, fmt_bytes(m.peak_total));
    let mut lines = memory_lines(&m.at_peak, m.peak_total, area.width.saturating_sub(2));
    if let Some(s) = run.summary.memory.iter().find(|s| s.rank as u32 == m.rank) {
        lines.push(Line::styled(
            format!("plan predicted {}{}", fmt_bytes(s.predicted_peak), if s.predicted_is_upper_bound { " (upper bound)" } else { "" }),
            dim_style(),
        ));
    }
    f.render_widget(Paragraph::new(lines).block(Block::bordered().title(truncate(&title, area.width.saturating_sub(2) as usize))), area);
}

/// Draw the comparison, with a warning line above it when the runs differ in backend, world
/// or model sizes.
fn draw_compare(f: &mut Frame, area: Rect, a: &LoadedRun, b: &LoadedRun, scroll: usize) {
    let area = match mismatch_warning(a, b) {
        Some(w) => {
            let [warn, rest] = Layout::vertical([Constraint::Length(1), Constraint::Min(4)]).areas(area);
            f.render_widget(Paragraph::new(Line::styled(truncate(&format!("⚠ {w}"), warn.width as usize), error_style())), warn);
            rest
        }
        None => area,
    };
    let rows_data = compare(a, b);
    let rows: Vec<Row> = rows_data
        .iter()
        .map(|r| {
            let (text, style) = match (r.relative(), r.verdict()) {
                (_, Verdict::Same) => ("≈".to_string(), dim_style()),
                (Some(d), v) => (
                    format!("{:+.1}% {}", 100.0 * d, if v == Verdict::Better { "better" } else { "worse" }),
                    if v == Verdict::Better { ok_style() } else { error_style() },
                ),
                (None, v) => (format!("new {}", if v == Verdict::Better { "better" } else { "worse" }), error_style()),
            };
            Row::new(vec![
                Cell::from(r.label.clone()),
                Cell::from(format!("{:.3}", r.a)),
                Cell::from(format!("{:.3}", r.b)),
                Cell::from(Line::from(Span::styled(text, style))),
            ])
        })
        .collect();
    let header = Row::new(["metric", "A", "B", "B vs A"]).style(bold());
    let widths = [Constraint::Min(24), Constraint::Length(10), Constraint::Length(10), Constraint::Length(15)];
    let (rows, shown) = scrolled(rows, area, scroll);
    let title = format!(" A: {} ({})  vs  B: {} ({}) ", a.label, a.summary.variant, b.label, b.summary.variant);
    let block = Block::bordered().title(truncate(&title, area.width.saturating_sub(2) as usize)).title_bottom(Line::from(shown).right_aligned());
    let table = Table::new(rows, widths).header(header).block(block);
    f.render_widget(table, area);
}
