//! The runs browser pane: the run directories, newest first, with status, variant, backend
//! (wide panes), world, step time, overlap and loss; the selected one's note or error below.

use super::{dim_style, error_style, ok_style, truncate};
use crate::app::App;
use crate::runs::RunSummary;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table, TableState, Wrap};
use ratatui::Frame;

fn status_style(s: &str) -> Style {
    match s {
        "completed" => ok_style(),
        "failed" => error_style(),
        crate::runs::UNFINISHED_STATUS => Style::new().fg(Color::Yellow),
        "cancelled" => Style::new().fg(Color::Magenta),
        _ => dim_style(),
    }
}

/// Pane width from which the table has a backend column.
const WIDE: u16 = 100;

/// The table's header and column widths, with a backend column when `wide`.
fn columns(wide: bool) -> (Vec<&'static str>, Vec<Constraint>) {
    let mut header = vec!["", "run", "status", "variant"];
    let mut widths = vec![Constraint::Length(1), Constraint::Min(20), Constraint::Length(9), Constraint::Length(7)];
    if wide {
        header.push("backend");
        widths.push(Constraint::Length(7));
    }
    header.extend(["world", "step ms", "overlap", "loss"]);
    widths.extend([Constraint::Length(5), Constraint::Length(8), Constraint::Length(7), Constraint::Length(7)]);
    (header, widths)
}

/// The cells after the status of a run with a summary: variant, backend (when `wide`),
/// world, step time, overlap and loss ("-" where the run has none, e.g. a sim run's loss).
fn summary_cells(s: &RunSummary, wide: bool) -> Vec<Cell<'static>> {
    let mut cells = vec![Cell::from(s.variant.clone())];
    if wide {
        cells.push(Cell::from(s.backend.clone()));
    }
    let measured = s.step_time_ms.is_finite();
    cells.extend([
        Cell::from(s.world.to_string()),
        Cell::from(if measured { format!("{:.2}", s.step_time_ms) } else { "-".into() }),
        // A run with no measured step has no step time, and no overlap either.
        Cell::from(if measured { format!("{:.0}%", 100.0 * s.overlap) } else { "-".into() }),
        Cell::from(s.final_loss().map_or("-".into(), |l| format!("{l:.4}"))),
    ]);
    cells
}

/// Draw the pane.
pub fn draw(f: &mut Frame, area: Rect, app: &App) {
    let b = &app.runs;
    let [table_area, detail_area] = Layout::vertical([Constraint::Min(4), Constraint::Length(4)]).areas(area);
    let filter = if b.filter.is_empty() { String::new() } else { format!(" · filter {:?}", b.filter) };
    let title = format!(" Runs in {} (newest first){filter} ", b.root.display());
    let block = Block::bordered().title(truncate(&title, area.width.saturating_sub(2) as usize));
    if let Some(problem) = &b.problem {
        f.render_widget(Paragraph::new(Line::styled(problem.clone(), error_style())).wrap(Wrap { trim: false }).block(block), table_area);
        f.render_widget(Block::bordered(), detail_area);
        return;
    }
    let visible = b.visible();
    if visible.is_empty() {
        let msg = if b.entries.is_empty() { "No runs yet: run a job (r in the composer)." } else { "No run matches the filter (/ then Esc clears it)." };
        f.render_widget(Paragraph::new(msg).block(block), table_area);
        f.render_widget(Block::bordered(), detail_area);
        return;
    }
    // The backend gets a column where the run names keep their room (at 80 columns the
    // detail line below names it).
    let wide = area.width >= WIDE;
    let open_dir = app.current.as_ref().and_then(|r| r.dir.as_ref());
    let cmp_dir = app.compare.as_ref().and_then(|r| r.dir.as_ref());
    let rows: Vec<Row> = visible
        .iter()
        .map(|e| {
            let mark = if Some(&e.path) == open_dir { "A" } else if Some(&e.path) == cmp_dir { "B" } else { "" };
            let status = Cell::from(e.status_word().to_string()).style(status_style(e.status_word()));
            let mut cells = vec![Cell::from(mark), Cell::from(e.name.clone()), status];
            if let Some(s) = &e.summary {
                cells.extend(summary_cells(s, wide));
            }
            Row::new(cells)
        })
        .collect();
    let (header, widths) = columns(wide);
    let header = Row::new(header).style(Style::new().add_modifier(Modifier::BOLD));
    let table = Table::new(rows, widths).header(header).block(block).row_highlight_style(Style::new().add_modifier(Modifier::REVERSED));
    let mut state = TableState::default().with_selected(Some(b.selected.min(visible.len() - 1)));
    f.render_stateful_widget(table, table_area, &mut state);
    let detail = match b.selected_entry() {
        Some(e) => match (&e.summary, &e.note) {
            (Some(s), _) => match &s.error {
                Some(err) => Line::styled(format!("{}: {err}", s.status), error_style()),
                None => Line::styled(format!("{} · backend {} · Enter opens, c compares with A", e.path.display(), s.backend), dim_style()),
            },
            (None, Some(note)) => Line::styled(note.clone(), dim_style()),
            (None, None) => Line::raw(""),
        },
        None => Line::raw(""),
    };
    f.render_widget(Paragraph::new(detail).wrap(Wrap { trim: false }).block(Block::bordered()), detail_area);
}
