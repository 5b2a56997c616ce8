//! The jobs pane: the queue with state, progress and elapsed time, and the selected job's
//! details (its error when it failed).

use super::{dim_style, error_style, ok_style, truncate};
use crate::app::App;
use crate::jobs::JobState;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Cell, Paragraph, Row, Table, TableState, Wrap};
use ratatui::Frame;

/// A text progress bar `█████░░░░░`.
fn progress_bar(frac: f64, width: usize) -> String {
    let n = ((frac.clamp(0.0, 1.0) * width as f64).round() as usize).min(width);
    format!("{}{}", "█".repeat(n), "░".repeat(width - n))
}

fn state_style(s: &JobState) -> Style {
    match s {
        JobState::Queued => dim_style(),
        JobState::Running { .. } => Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
        JobState::Completed => ok_style(),
        JobState::Failed { .. } => error_style(),
        JobState::Cancelled => Style::new().fg(Color::Magenta),
    }
}

/// Draw the pane.
pub fn draw(f: &mut Frame, area: Rect, app: &App) {
    let [table_area, detail_area] = Layout::vertical([Constraint::Min(4), Constraint::Length(6)]).areas(area);
    let title = " Jobs: in the background, one at a time, on the backend each spec names ";
    let block = Block::bordered().title(truncate(title, area.width.saturating_sub(2) as usize));
    if app.jobs.jobs.is_empty() {
        let p = Paragraph::new(vec![
            Line::raw("No jobs yet."),
            Line::styled("Press r in the composer (1) to run the experiment in the background (backend: run.backend).", dim_style()),
        ])
        .wrap(Wrap { trim: false })
        .block(block);
        f.render_widget(p, table_area);
    } else {
        let rows: Vec<Row> = app
            .jobs
            .jobs
            .iter()
            .map(|j| {
                let progress = match &j.state {
                    JobState::Running { done, total, .. } => format!("{} {done}/{total}", progress_bar(j.progress(), 8)),
                    JobState::Completed => format!("{} done", progress_bar(1.0, 8)),
                    _ => String::new(),
                };
                let result = match (&j.state, &j.run) {
                    (JobState::Completed, Some(r)) => format!("{:.2} ms/step", r.step_time_ms()),
                    (JobState::Failed { error }, _) => error.clone(),
                    (JobState::Running { loss: Some(l), .. }, _) => format!("loss {l:.4}"),
                    _ => String::new(),
                };
                Row::new(vec![
                    Cell::from(j.id.to_string()),
                    Cell::from(j.spec.name.clone()),
                    Cell::from(j.spec.variant.as_str()),
                    Cell::from(j.spec.world().to_string()),
                    Cell::from(j.state.word()).style(state_style(&j.state)),
                    Cell::from(progress),
                    Cell::from(format!("{:.1} s", j.elapsed(app.now).as_secs_f64())),
                    Cell::from(result),
                ])
            })
            .collect();
        let widths = [
            Constraint::Length(3),
            Constraint::Min(10),
            Constraint::Length(7),
            Constraint::Length(5),
            Constraint::Length(9),
            Constraint::Length(17),
            Constraint::Length(8),
            Constraint::Min(12),
        ];
        let header = Row::new(["#", "name", "variant", "world", "state", "progress", "elapsed", "result"]).style(Style::new().add_modifier(Modifier::BOLD));
        let table = Table::new(rows, widths).header(header).block(block).row_highlight_style(Style::new().add_modifier(Modifier::REVERSED));
        let mut state = TableState::default().with_selected(Some(app.jobs.selected));
        f.render_stateful_widget(table, table_area, &mut state);
    }
    draw_detail(f, detail_area, app);
}

fn draw_detail(f: &mut Frame, area: Rect, app: &App) {
    let Some(j) = app.jobs.selected_job() else {
        f.render_widget(Block::bordered().title(" Job "), area);
        return;
    };
    let dir = j.dir.as_ref().map_or_else(|| "(none yet)".to_string(), |d| d.display().to_string());
    let mut lines = vec![Line::raw(format!(
        "{} · variant {} · world {} · backend {} · {} warmup + {} measured steps",
        j.spec.name, j.spec.variant.as_str(), j.spec.world(), j.spec.run.backend.as_str(), j.spec.run.warmup, j.spec.run.steps
    ))];
    match &j.state {
        JobState::Queued => lines.push(Line::styled("waiting for the job before it; x cancels", dim_style())),
        JobState::Running { done, total, .. } => lines.push(Line::raw(format!("running: {done} of {total} steps; x cancels (stops between ops)"))),
        JobState::Completed => {
            lines.push(Line::styled(format!("done: {dir}"), ok_style()));
            lines.push(Line::styled("Enter opens it in the timeline; c compares the open run with it", dim_style()));
        }
        JobState::Failed { error } => {
            lines.push(Line::styled(format!("failed: {error}"), error_style()));
            lines.push(Line::styled(format!("run directory (log, what was measured): {dir}"), dim_style()));
        }
        JobState::Cancelled => lines.push(Line::raw(format!("cancelled; run directory: {dir}"))),
    }
    let p = Paragraph::new(lines).wrap(Wrap { trim: false }).block(Block::bordered().title(format!(" Job {} ", j.id)));
    f.render_widget(p, area);
}
