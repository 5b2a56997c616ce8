//! The composer pane: the fields with their values (problems marked on the field they
//! name), the validation result, and the plan's predicted peak memory per category.

use super::{bar_line, dim_style, error_style, ok_style, truncate};
use crate::app::App;
use crate::composer::Check;
use crate::units::{fmt_bytes, fmt_ns};
use moelab::taxonomy::MemCategory;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, List, ListItem, ListState, Paragraph, Wrap};
use ratatui::Frame;

/// Colour of each memory category's bar.
pub fn category_color(c: MemCategory) -> Color {
    match c {
        MemCategory::Params => Color::Blue,
        MemCategory::Grads => Color::Cyan,
        MemCategory::OptimizerState => Color::Magenta,
        MemCategory::Inputs => Color::Gray,
        MemCategory::Activations => Color::Green,
        MemCategory::Temporaries => Color::Yellow,
        MemCategory::CommBuffers => Color::Red,
    }
}

/// Memory bars, one line per category, each as a share of `total`.
pub fn memory_lines<'a>(at_peak: &[u64; 7], total: u64, width: u16) -> Vec<Line<'a>> {
    let label_w = 15usize;
    let value_w = 11usize;
    let bar_w = (width as usize).saturating_sub(label_w + value_w + 2).max(1);
    MemCategory::ALL
        .iter()
        .map(|c| {
            let b = at_peak[c.index()];
            bar_line(c.as_str(), label_w, b as f64 / total.max(1) as f64, bar_w, category_color(*c), fmt_bytes(b))
        })
        .collect()
}

/// Draw the pane.
pub fn draw(f: &mut Frame, area: Rect, app: &App) {
    let [left, right] = Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(area);
    draw_fields(f, left, app);
    let [check_area, mem_area] = Layout::vertical([Constraint::Min(4), Constraint::Length(9)]).areas(right);
    draw_check(f, check_area, app);
    draw_memory(f, mem_area, app);
}

fn draw_fields(f: &mut Frame, area: Rect, app: &App) {
    let c = &app.composer;
    let file = c.path.as_ref().map_or_else(|| "(new, not saved)".to_string(), |p| p.display().to_string());
    let title = format!(" Composer: {}{} ", truncate(&file, area.width.saturating_sub(16) as usize), if c.dirty { " *" } else { "" });
    let block = Block::bordered().title(title);
    let inner = block.inner(area);
    f.render_widget(block, area);
    let [list_area, help_area] = Layout::vertical([Constraint::Min(1), Constraint::Length(1)]).areas(inner);
    let fields = c.visible_fields();
    let key_w = 23usize;
    let items: Vec<ListItem> = fields
        .iter()
        .map(|fd| {
            let problems = c.problems_for(fd.key);
            let bad = !problems.is_empty();
            let value = fd.get(&c.draft);
            let mark = if bad { Span::styled(" ✗", error_style()) } else { Span::raw("") };
            let vstyle = if bad { error_style() } else { Style::new().fg(Color::Cyan) };
            ListItem::new(Line::from(vec![Span::raw(format!("{:<key_w$} ", fd.key)), Span::styled(value, vstyle), mark]))
        })
        .collect();
    if items.is_empty() {
        f.render_widget(Paragraph::new(format!("no field matches the filter {:?} (Esc in / clears it)", c.filter)).style(dim_style()), list_area);
    } else {
        let list = List::new(items).highlight_symbol("▶ ").highlight_style(Style::new().add_modifier(Modifier::REVERSED));
        let mut state = ListState::default().with_selected(Some(c.selected.min(fields.len() - 1)));
        f.render_stateful_widget(list, list_area, &mut state);
    }
    let help = c.selected_field().map_or(String::new(), |fd| fd.help.to_string());
    f.render_widget(Paragraph::new(Line::styled(truncate(&help, help_area.width as usize), dim_style())), help_area);
}

fn draw_check(f: &mut Frame, area: Rect, app: &App) {
    let c = &app.composer;
    let mut lines = Vec::new();
    let title;
    match &c.check {
        Check::Valid { resolved, prediction, note } => {
            title = " Validation ";
            match note {
                None => lines.push(Line::styled("✓ valid: moelab run accepts it", ok_style())),
                Some(n) => lines.push(Line::styled(format!("✓ valid, but {n}"), error_style())),
            }
            lines.push(Line::raw(format!(
                "variant {} · world {} (dp {} ep {} tp {} pp {}) · backend {}",
                resolved.variant.as_str(), resolved.world(), resolved.layout.dp, resolved.layout.ep, resolved.layout.tp, resolved.layout.pp,
                resolved.run.backend.as_str()
            )));
            lines.push(Line::raw(format!(
                "{} tokens per rank · {} MoE blocks · {} + {} steps",
                resolved.tokens_per_rank(), resolved.model.n_layers, resolved.run.warmup, resolved.run.steps
            )));
            match prediction {
                Ok(p) => {
                    lines.push(Line::raw(format!("plan: {} ops per step on the busiest rank", p.max_ops)));
                    lines.push(match &p.step {
                        Ok(sp) => Line::styled(format!("predicted step time: {} (sim, {} profile)", fmt_ns(sp.seconds * 1e9), sp.profile), ok_style()),
                        Err(e) => Line::styled(format!("predicted step time: none ({e})"), dim_style()),
                    });
                    if let Ok(sp) = &p.step {
                        lines.push(Line::raw(format!(
                            "predicted overlap: {:.0}% of comm, {:.0}% of all-to-all hidden (P: profile)",
                            100.0 * sp.overlap, 100.0 * sp.a2a_overlap
                        )));
                        for w in &sp.warnings {
                            lines.push(Line::styled(format!("warning: {w}"), error_style()));
                        }
                    }
                }
                Err(e) => lines.push(Line::styled(format!("the plan cannot be built: {e}"), error_style())),
            }
        }
        Check::Invalid { problems } => {
            title = " Validation: invalid ";
            lines.push(Line::styled(format!("✗ {} problem(s); moelab run would refuse it", problems.len()), error_style()));
            for p in problems {
                lines.push(Line::from(vec![Span::styled(format!("{}: ", p.field), error_style()), Span::raw(p.message.clone())]));
                lines.push(Line::styled(format!("  fix: {}", p.fix), dim_style()));
            }
        }
    }
    f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }).block(Block::bordered().title(title)), area);
}

fn draw_memory(f: &mut Frame, area: Rect, app: &App) {
    let block_title;
    let lines = match &app.composer.check {
        Check::Valid { prediction: Ok(p), .. } => {
            block_title = format!(
                " Predicted peak {}{} (rank {}) ",
                fmt_bytes(p.peak_total),
                if p.upper_bound { " upper bound" } else { "" },
                p.worst_rank
            );
            let mut lines = memory_lines(&p.at_peak, p.peak_total, area.width.saturating_sub(2));
            // Where the two streams may overlap, what the worst order of their ops holds.
            if fmt_bytes(p.interleaved_peak) != fmt_bytes(p.peak_total) {
                lines.push(Line::styled(format!("up to {} as its streams interleave", fmt_bytes(p.interleaved_peak)), dim_style()));
            }
            lines
        }
        _ => {
            block_title = " Predicted peak memory ".to_string();
            vec![Line::styled("no prediction until the experiment is valid", dim_style())]
        }
    };
    f.render_widget(Paragraph::new(lines).block(Block::bordered().title(block_title)), area);
}
