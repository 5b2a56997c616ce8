//! The timeline pane: one row per (rank, stream) lane, ops as bars coloured by stage, the
//! cells of mostly exposed communication (at least half of their op's time in the cell)
//! marked `▓`, the selected op `=`, and its details below:
//! stage, duration, FLOPs, bytes, what overlapped it and how much of it was exposed.

use super::{dim_style, error_style, stage_color, truncate};
use crate::app::App;
use crate::loaded::LoadedRun;
use crate::timeline::{matches_filter, paint_lane, TimelineView};
use crate::units::{fmt_bytes, fmt_flops, fmt_ns, fmt_ns_within};
use moelab::taxonomy::{stage_label, Stream};
use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Wrap};
use ratatui::Frame;

/// Width of the lane labels (`r12 comm `).
const LABEL_W: u16 = 9;

/// Draw the pane.
pub fn draw(f: &mut Frame, area: Rect, app: &App) {
    let Some(run) = app.current.as_ref() else {
        let p = Paragraph::new(vec![
            Line::raw("No run loaded."),
            Line::styled("Run a job (r in the composer), or open a past run in Runs (5) with Enter.", dim_style()),
        ])
        .wrap(Wrap { trim: false })
        .block(Block::bordered().title(" Timeline "));
        f.render_widget(p, area);
        return;
    };
    if run.index.lanes.is_empty() {
        let why = run.nothing_measured().unwrap_or_else(|| "no ops in this trace".to_string());
        let p = Paragraph::new(vec![
            Line::styled(why, Style::new().add_modifier(Modifier::BOLD)),
            Line::styled("Nothing to draw: the trace holds no op. Its run directory keeps the spec and run.log.", dim_style()),
        ])
        .wrap(Wrap { trim: false })
        .block(Block::bordered().title(truncate(&format!(" Timeline · {} ", run.label), area.width.saturating_sub(2) as usize)));
        f.render_widget(p, area);
        return;
    }
    let detail_h = if area.height >= 30 { 8 } else { 6 };
    let [header, lanes, axis, detail, legend] =
        Layout::vertical([Constraint::Length(1), Constraint::Min(3), Constraint::Length(1), Constraint::Length(detail_h), Constraint::Length(1)])
            .areas(area);
    let v = &app.timeline;
    let full = run.index.t_max.saturating_sub(run.index.t_min).max(1);
    let head = format!(
        "{} · {} – {} of {} · ×{:.1}{}",
        run.label,
        fmt_ns_within(v.t0.saturating_sub(run.index.t_min) as f64, v.span as f64),
        fmt_ns_within((v.t0 + v.span).saturating_sub(run.index.t_min) as f64, v.span as f64),
        fmt_ns(full as f64),
        full as f64 / v.span.max(1) as f64,
        if v.filter.is_empty() { String::new() } else { format!(" · filter {:?}", v.filter) }
    );
    f.render_widget(Paragraph::new(Line::styled(truncate(&head, header.width as usize), Style::new().add_modifier(Modifier::BOLD))), header);
    let block = Block::bordered().title(format!(" {} ranks × compute/comm ", run.trace.world));
    let inner = block.inner(lanes);
    f.render_widget(block, lanes);
    draw_lanes(f.buffer_mut(), inner, run, v);
    draw_axis(f, axis, run, v);
    draw_detail(f, detail, run, v);
    let legend_line = Line::from(vec![
        Span::raw("█ compute  "),
        Span::styled("▒", Style::new().fg(Color::Magenta)),
        Span::raw(" comm mostly hidden  "),
        Span::styled("▓", Style::new().fg(Color::Red)),
        Span::raw(" comm mostly exposed  = selected  · ? keys"),
    ]);
    f.render_widget(Paragraph::new(legend_line), legend);
}

/// First lane to show so that the selected one is visible in `rows` rows.
fn lane_offset(selected: usize, lanes: usize, rows: usize) -> usize {
    if rows == 0 || lanes <= rows {
        0
    } else {
        selected.saturating_sub(rows / 2).min(lanes - rows)
    }
}

/// Paint the lanes straight into the buffer (one cell per time slice).
fn draw_lanes(buf: &mut Buffer, area: Rect, run: &LoadedRun, v: &TimelineView) {
    if area.width <= LABEL_W || area.height == 0 {
        return;
    }
    let rows = area.height as usize;
    let n = run.index.lanes.len();
    let off = lane_offset(v.lane, n, rows);
    let width = (area.width - LABEL_W) as usize;
    let selected = v.selected_op(run);
    for (row, li) in (off..n.min(off + rows)).enumerate() {
        let lane = &run.index.lanes[li];
        let y = area.y + row as u16;
        let label = format!("r{} {}", lane.rank, if lane.stream == Stream::Compute { "comp" } else { "comm" });
        let lstyle = if li == v.lane { Style::new().add_modifier(Modifier::REVERSED | Modifier::BOLD) } else { Style::new() };
        buf.set_string(area.x, y, format!("{:<w$}", truncate(&label, LABEL_W as usize - 1), w = LABEL_W as usize), lstyle);
        let cells = paint_lane(run, li, v.t0, v.span, width);
        for (c, cell) in cells.iter().enumerate() {
            let Some(cell) = cell else { continue };
            let op = &run.trace.ops[cell.op];
            let color = stage_color(op.stage);
            let (glyph, style) = if Some(cell.op) == selected {
                ("=", Style::new().fg(Color::Black).bg(if cell.exposed { Color::Red } else { color }).add_modifier(Modifier::BOLD))
            } else if !matches_filter(op, &v.filter) {
                ("·", dim_style())
            } else if lane.stream == Stream::Compute {
                ("█", Style::new().fg(color))
            } else if cell.exposed {
                ("▓", Style::new().fg(Color::Red))
            } else {
                ("▒", Style::new().fg(color))
            };
            buf.set_string(area.x + LABEL_W + c as u16, y, glyph, style);
        }
    }
    if n > rows {
        let more = format!("{}-{} of {} lanes", off + 1, (off + rows).min(n), n);
        let x = area.x + area.width.saturating_sub(more.len() as u16 + 1);
        buf.set_string(x, area.y + area.height - 1, more, dim_style());
    }
}

/// Time labels at the start, middle and end of the window.
fn draw_axis(f: &mut Frame, area: Rect, run: &LoadedRun, v: &TimelineView) {
    let w = area.width.saturating_sub(LABEL_W + 2) as usize;
    if w < 12 {
        return;
    }
    let t = |frac: f64| fmt_ns_within((v.t0 - run.index.t_min) as f64 + frac * v.span as f64, v.span as f64);
    let (a, m, b) = (t(0.0), t(0.5), t(1.0));
    let mut line = vec![' '; w];
    let put = |line: &mut Vec<char>, at: usize, s: &str| {
        for (i, ch) in s.chars().enumerate() {
            if let Some(slot) = line.get_mut(at + i) {
                *slot = ch;
            }
        }
    };
    put(&mut line, 0, &a);
    put(&mut line, (w / 2).saturating_sub(m.chars().count() / 2), &m);
    put(&mut line, w.saturating_sub(b.chars().count()), &b);
    let text: String = line.into_iter().collect();
    f.render_widget(Paragraph::new(Line::styled(format!("{:w$}{text}", "", w = LABEL_W as usize + 1), dim_style())), area);
}

fn draw_detail(f: &mut Frame, area: Rect, run: &LoadedRun, v: &TimelineView) {
    let block = Block::bordered().title(" Selected op ");
    let Some(i) = v.selected_op(run) else {
        f.render_widget(Paragraph::new("no op selected: ←→ selects").block(block), area);
        return;
    };
    let op = &run.trace.ops[i];
    let dur = op.dur_ns();
    let rate = |x: u64, unit: &str, scale: f64| if dur > 0 && x > 0 { format!(" ({:.1} {unit})", x as f64 / dur as f64 * scale) } else { String::new() };
    let mut where_ = format!("rank {} {} · step {}", op.rank, op.stream.as_str(), op.step);
    if let Some(l) = op.layer {
        where_.push_str(&format!(" · layer {l}"));
    }
    if let Some(c) = op.chunk {
        where_.push_str(&format!(" · chunk {c}"));
    }
    let mut lines = vec![
        Line::from(vec![
            Span::styled(op.name.clone(), Style::new().add_modifier(Modifier::BOLD)),
            Span::raw("  "),
            Span::styled(stage_label(op.stage, op.pass), Style::new().fg(stage_color(op.stage))),
            Span::raw(format!("  {where_}")),
        ]),
        Line::raw(format!(
            "start {} · duration {} · {}{} · {}{}",
            fmt_ns_within(op.start_ns.saturating_sub(run.index.t_min) as f64, v.span as f64),
            fmt_ns(dur as f64),
            fmt_flops(op.flops),
            rate(op.flops, "GFLOP/s", 1.0),
            fmt_bytes(op.bytes),
            rate(op.bytes, "GB/s", 1.0)
        )),
    ];
    let over = run.index.overlapping(&run.trace, v.lane, op);
    let over_text = if over.is_empty() {
        "nothing".to_string()
    } else {
        let shown: Vec<String> = over.iter().take(3).map(|(j, ns)| format!("{} ({})", run.trace.ops[*j].name, fmt_ns(*ns as f64))).collect();
        let more = if over.len() > 3 { format!(" and {} more", over.len() - 3) } else { String::new() };
        format!("{}{more}", shown.join(", "))
    };
    lines.push(Line::raw(format!("overlapped by: {over_text}")));
    if op.stream == Stream::Comm {
        let exposed = run.index.exposed_ns(v.lane, op);
        let pct = if dur > 0 { 100.0 * exposed as f64 / dur as f64 } else { 0.0 };
        let style = if exposed > 0 { error_style() } else { Style::new().fg(Color::Green) };
        lines.push(Line::styled(format!("exposed: {} of {} ({pct:.0}%) not hidden by compute", fmt_ns(exposed as f64), fmt_ns(dur as f64)), style));
    }
    f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }).block(block), area);
}
