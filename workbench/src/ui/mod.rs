//! Rendering: `draw(frame, &app)` lays out the tab bar, the visible pane and the status
//! line, and the help overlay on top. Renderers read the state and never change it.

pub mod breakdown;
pub mod composer;
pub mod help;
pub mod jobs;
pub mod runs;
pub mod timeline;

use crate::app::{App, Pane};
use moelab::taxonomy::Stage;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Wrap};
use ratatui::Frame;

/// Smallest terminal the panes are laid out for; smaller ones get a message instead.
pub const MIN_SIZE: (u16, u16) = (60, 16);

/// Colour of a stage's bars and labels: one hue per family (backbone, routing, experts,
/// all-to-all, other collectives, the rest), from the 16 standard colours so that dark and
/// light terminal themes both keep them readable.
pub fn stage_color(stage: Stage) -> Color {
    match stage {
        Stage::Layernorm | Stage::Attention | Stage::DenseMlp => Color::Blue,
        Stage::Gate | Stage::Topk | Stage::Permute | Stage::Combine => Color::Yellow,
        Stage::ExpertGemm1 | Stage::Act | Stage::ExpertGemm2 => Color::Green,
        Stage::AllToAll => Color::Magenta,
        Stage::AllReduce | Stage::AllGather | Stage::ReduceScatter => Color::Cyan,
        Stage::SendRecv => Color::LightMagenta,
        Stage::Data | Stage::Loss | Stage::Optimizer | Stage::GradAccum => Color::Gray,
    }
}

/// Style of an error.
pub fn error_style() -> Style {
    Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)
}

/// Style of a good result.
pub fn ok_style() -> Style {
    Style::new().fg(Color::Green).add_modifier(Modifier::BOLD)
}

/// Style of secondary text.
pub fn dim_style() -> Style {
    Style::new().add_modifier(Modifier::DIM)
}

/// A horizontal bar line: `label  ████░░░░  value`, the bar `value / max` of `width` cells.
pub fn bar_line<'a>(label: &str, label_w: usize, frac: f64, width: usize, color: Color, value: String) -> Line<'a> {
    let frac = if frac.is_finite() { frac.clamp(0.0, 1.0) } else { 0.0 };
    let filled = ((frac * width as f64).round() as usize).min(width);
    let filled = if frac > 0.0 { filled.max(1) } else { 0 };
    Line::from(vec![
        Span::raw(format!("{:<w$} ", truncate(label, label_w), w = label_w)),
        Span::styled("█".repeat(filled), Style::new().fg(color)),
        Span::styled("░".repeat(width - filled), dim_style()),
        Span::raw(format!(" {value}")),
    ])
}

/// Cut `s` to at most `n` characters, marking the cut with `…`.
pub fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else if n == 0 {
        String::new()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

/// Draw the whole workbench.
pub fn draw(f: &mut Frame, app: &App) {
    let area = f.area();
    if area.width < MIN_SIZE.0 || area.height < MIN_SIZE.1 {
        return draw_too_small(f, area);
    }
    // A long message (an error naming a file and a fix) gets a second row rather than a cut.
    let long = app.prompt.is_none() && app.status.as_ref().is_some_and(|s| s.text.chars().count() > area.width as usize);
    let status_h = if long { 2 } else { 1 };
    let [tabs, body, status] = Layout::vertical([Constraint::Length(1), Constraint::Min(1), Constraint::Length(status_h)]).areas(area);
    draw_tabs(f, tabs, app);
    match app.pane {
        Pane::Composer => composer::draw(f, body, app),
        Pane::Jobs => jobs::draw(f, body, app),
        Pane::Timeline => timeline::draw(f, body, app),
        Pane::Breakdown => breakdown::draw(f, body, app),
        Pane::Runs => runs::draw(f, body, app),
    }
    draw_status(f, status, app);
    if app.help {
        help::draw(f, area, app);
    }
}

fn draw_too_small(f: &mut Frame, area: Rect) {
    let text = vec![
        Line::styled("terminal too small", error_style()),
        Line::raw(format!("{}x{}; the workbench needs {}x{}.", area.width, area.height, MIN_SIZE.0, MIN_SIZE.1)),
        Line::raw("Enlarge the window; nothing is lost. q quits."),
    ];
    f.render_widget(Paragraph::new(text).wrap(Wrap { trim: true }), area);
}

fn draw_tabs(f: &mut Frame, area: Rect, app: &App) {
    let active = app.jobs.active();
    let jobs = if active > 0 { format!("{active} job(s) active · ") } else { String::new() };
    let full = |i: usize, p: &Pane| format!(" {} {} ", i + 1, p.title());
    let wide: usize = Pane::ALL.iter().enumerate().map(|(i, p)| full(i, p).chars().count()).sum();
    // In a narrow terminal "q quit" goes first, then the other panes keep only their number,
    // so every tab stays visible.
    let fits = |right: &String| wide + right.chars().count() <= area.width as usize;
    let mut right = format!("{jobs}? help · q quit ");
    if !fits(&right) {
        right = format!("{jobs}? help ");
    }
    let narrow = !fits(&right);
    let mut spans = Vec::new();
    for (i, p) in Pane::ALL.iter().enumerate() {
        let current = *p == app.pane;
        let label = if current || !narrow { full(i, p) } else { format!(" {} ", i + 1) };
        let style = if current { Style::new().add_modifier(Modifier::REVERSED | Modifier::BOLD) } else { Style::new() };
        spans.push(Span::styled(label, style));
    }
    let [left_area, right_area] = Layout::horizontal([Constraint::Min(1), Constraint::Length(right.chars().count() as u16)]).areas(area);
    f.render_widget(Paragraph::new(Line::from(spans)), left_area);
    f.render_widget(Paragraph::new(Line::styled(right, dim_style())), right_area);
}

/// Key hints shown when there is no message.
fn hints(pane: Pane) -> &'static str {
    match pane {
        Pane::Composer => "↑↓ field · ←→ change · Enter type · r run · s save · o open · t template · u undo",
        Pane::Jobs => "↑↓ job · Enter open in timeline · c compare · x cancel",
        Pane::Timeline => "←→ op · ↑↓ lane · +/- zoom · H/L pan · 0 fit · n next comm · e next exposed",
        Pane::Breakdown => "↑↓ scroll · ←→ memory rank · c clear comparison (pick B with c in Runs or Jobs)",
        Pane::Runs => "↑↓ run · Enter open · c compare with the open run · e edit its spec · r refresh",
    }
}

fn draw_status(f: &mut Frame, area: Rect, app: &App) {
    let line = if let Some(p) = &app.prompt {
        let mut spans = vec![
            Span::styled(format!("{}: ", p.label), Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(p.text.clone()),
            Span::styled("▏", Style::new().add_modifier(Modifier::SLOW_BLINK)),
            Span::styled("  (Enter ok · Esc cancel)", dim_style()),
        ];
        // What the last Enter said (a bad value, a file that exists) stays beside the prompt.
        if let Some(s) = app.status.as_ref().filter(|s| s.error) {
            spans.push(Span::styled(format!("  {}", s.text), error_style()));
        }
        Line::from(spans)
    } else if let Some(s) = &app.status {
        Line::styled(s.text.clone(), if s.error { error_style() } else { Style::new() })
    } else {
        Line::styled(hints(app.pane), dim_style())
    };
    f.render_widget(Paragraph::new(line).wrap(Wrap { trim: false }), area);
}
