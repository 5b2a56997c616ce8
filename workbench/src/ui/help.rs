//! The help overlay (`?`): every key, global and per pane, in a centred box.

use super::dim_style;
use crate::app::App;
use ratatui::text::Span;
use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Clear, Paragraph, Wrap};
use ratatui::Frame;

const SECTIONS: &[(&str, &[(&str, &str)])] = &[
    ("everywhere", &[
        ("Tab / Shift-Tab", "next / previous pane"),
        ("1-5", "Composer, Jobs, Timeline, Breakdown, Runs"),
        ("/", "filter (composer fields, timeline ops, runs)"),
        ("?", "this help (any key closes it)"),
        ("q, Ctrl-C", "quit (asks again: jobs running, unsaved edits for q)"),
    ]),
    ("composer", &[
        ("↑↓ j k", "select a field"),
        ("←→ h l - +", "change it (step, double, cycle, toggle)"),
        ("Enter", "type a value (auto unsets; Ctrl-U clears the line)"),
        ("r", "run it as a background job (backend: run.backend)"),
        ("s / o", "save as / open an experiment file"),
        ("t / u", "template for the variant / undo"),
        ("P", "predict on the next hardware profile (h100, h200, datasheets)"),
    ]),
    ("jobs", &[("Enter / c", "open the run / compare with it"), ("x", "cancel (queued or running)")]),
    ("timeline", &[
        ("←→ ↑↓", "previous/next op, lane"),
        ("+ - 0", "zoom in, out, fit"),
        ("H L", "pan"),
        ("n / e", "next comm op / next exposed comm op"),
    ]),
    ("breakdown", &[("↑↓ PgUp PgDn", "scroll the stage table"), ("←→", "rank of the memory bars"), ("c", "clear the comparison")]),
    ("runs", &[("Enter / c", "open / compare with the open run"), ("e / r", "edit its spec / refresh")]),
];

/// Draw the overlay over `area`: the global keys and the visible pane's.
pub fn draw(f: &mut Frame, area: Rect, app: &App) {
    let mut lines = Vec::new();
    let pane = app.pane.title().to_lowercase();
    for (title, keys) in SECTIONS.iter().filter(|(t, _)| *t == "everywhere" || *t == pane) {
        lines.push(Line::styled(*title, Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED)));
        for (k, what) in *keys {
            lines.push(Line::from(vec![Span::raw(format!("  {k:<16}")), Span::raw(*what)]));
        }
    }
    lines.push(Line::raw(""));
    lines.push(Line::styled("Each pane's ? lists its own keys.", dim_style()));
    lines.push(Line::styled("colours: blue backbone, yellow routing, green experts,", dim_style()));
    lines.push(Line::styled("magenta all-to-all, cyan other collectives; ▓ mostly exposed comm", dim_style()));
    let w = area.width.saturating_sub(4).min(76);
    // Wrapped lines take more rows than there are lines: size the box by the rows they fill.
    let inner = w.saturating_sub(2).max(1) as usize;
    // Word wrap can take a row more than the width alone says.
    let rows: usize = lines.iter().map(|l| { let n = l.width().div_ceil(inner).max(1); if n > 1 { n + 1 } else { n } }).sum();
    let h = area.height.saturating_sub(2).min(rows as u16 + 2);
    let r = Rect { x: area.x + (area.width - w) / 2, y: area.y + (area.height - h) / 2, width: w, height: h };
    f.render_widget(Clear, r);
    f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }).block(Block::bordered().title(" help (any key closes) ")), r);
}
