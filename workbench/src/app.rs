//! The workbench's state and its one transition function, [`App::update`]: every key press,
//! resize, tick and job report goes through it, so behaviour is tested without a terminal.

use crate::composer::{Check, Composer};
use crate::event::{Event, JobEvent, Key};
use crate::jobs::{JobRequest, JobState, Jobs};
use crate::loaded::LoadedRun;
use crate::runs::{self, RunsBrowser};
use crate::timeline::TimelineView;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::time::Instant;

/// The panes, in tab order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pane {
    /// Edit an experiment.
    Composer,
    /// Dispatched runs.
    Jobs,
    /// Ops over time per rank and stream.
    Timeline,
    /// Stage table, overlap, memory; two runs side by side.
    Breakdown,
    /// Past runs under the runs root.
    Runs,
}

impl Pane {
    /// Every pane, in tab order.
    pub const ALL: [Pane; 5] = [Pane::Composer, Pane::Jobs, Pane::Timeline, Pane::Breakdown, Pane::Runs];
    /// Tab title.
    pub fn title(self) -> &'static str {
        match self {
            Pane::Composer => "Composer",
            Pane::Jobs => "Jobs",
            Pane::Timeline => "Timeline",
            Pane::Breakdown => "Breakdown",
            Pane::Runs => "Runs",
        }
    }
    fn index(self) -> usize {
        Pane::ALL.iter().position(|p| *p == self).unwrap_or(0)
    }
    /// Whether `/` filters something in this pane.
    pub fn has_filter(self) -> bool {
        matches!(self, Pane::Composer | Pane::Timeline | Pane::Runs)
    }
}

/// What a text prompt is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptKind {
    /// Path of an experiment to open.
    Open,
    /// Path to save the experiment to.
    Save,
    /// New value of the selected composer field.
    Edit,
    /// Filter of the current pane (applied as you type).
    Filter,
}

/// A one-line text input shown in the status line.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// Purpose.
    pub kind: PromptKind,
    /// What is asked, shown before the text.
    pub label: String,
    /// Typed so far.
    pub text: String,
}

/// What a dirty draft would be dropped for once the same key is pressed again.
#[derive(Debug, Clone, PartialEq)]
enum Discard {
    /// `q`: quit.
    Quit,
    /// `e` in Runs: load this run's `spec.toml` into the composer.
    Load(PathBuf),
}

/// A message in the status line.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// The message.
    pub text: String,
    /// Shown as an error.
    pub error: bool,
    /// The job the message is about while it runs (e.g. "cancelling job 2"): the message is
    /// replaced when that job ends.
    pub job: Option<usize>,
}

/// Everything the workbench shows.
#[derive(Debug)]
pub struct App {
    /// The visible pane.
    pub pane: Pane,
    /// The help overlay is open.
    pub help: bool,
    /// An open text prompt.
    pub prompt: Option<Prompt>,
    /// The last message.
    pub status: Option<Status>,
    /// The experiment being edited.
    pub composer: Composer,
    /// Dispatched jobs.
    pub jobs: Jobs,
    /// Past runs.
    pub runs: RunsBrowser,
    /// The run the timeline and breakdown show (A).
    pub current: Option<LoadedRun>,
    /// The run compared against it (B).
    pub compare: Option<LoadedRun>,
    /// Timeline window and selection.
    pub timeline: TimelineView,
    /// Rank whose memory the breakdown shows (`None`: the rank with the highest peak).
    pub memory_rank: Option<usize>,
    /// Rows scrolled off the top of the breakdown's stage (or comparison) table.
    pub breakdown_scroll: usize,
    /// Set when the user quit.
    pub quit: bool,
    /// `q` was pressed once while jobs were active.
    quit_armed: bool,
    /// A save to this existing file was asked once.
    overwrite_armed: Option<PathBuf>,
    /// A key that drops the composer's unsaved edits was pressed once; cleared by any other key.
    discard_armed: Option<Discard>,
    /// The time used for elapsed figures (updated by ticks).
    pub now: Instant,
}

impl App {
    /// A workbench editing `composer`, listing `runs_root`, dispatching to `worker`.
    pub fn new(composer: Composer, runs_root: PathBuf, worker: Option<Sender<JobRequest>>) -> Self {
        App {
            pane: Pane::Composer,
            help: false,
            prompt: None,
            status: None,
            composer,
            jobs: Jobs::new(worker),
            runs: RunsBrowser::new(runs_root),
            current: None,
            compare: None,
            timeline: TimelineView::default(),
            memory_rank: None,
            breakdown_scroll: 0,
            quit: false,
            quit_armed: false,
            overwrite_armed: None,
            discard_armed: None,
            now: Instant::now(),
        }
    }

    fn info(&mut self, text: impl Into<String>) {
        self.status = Some(Status { text: text.into(), error: false, job: None });
    }

    /// An info message about job `id` while it is active, replaced when the job ends.
    fn info_job(&mut self, id: usize, text: impl Into<String>) {
        self.status = Some(Status { text: text.into(), error: false, job: Some(id) });
    }

    fn error(&mut self, text: impl Into<String>) {
        self.status = Some(Status { text: text.into(), error: true, job: None });
    }

    /// Apply one event.
    pub fn update(&mut self, ev: Event) {
        match ev {
            Event::Tick => self.now = Instant::now(),
            Event::Resize(..) => {}
            Event::Job(je) => {
                self.now = Instant::now();
                let ended = match &je {
                    JobEvent::Finished { id, .. } => Some(*id),
                    _ => None,
                };
                if let Some(id) = self.jobs.apply(je, self.now) {
                    self.runs.refresh();
                    let dir = self.jobs.get_mut(id).and_then(|j| j.dir.clone()).map(|d| d.display().to_string()).unwrap_or_default();
                    if self.current.is_none() {
                        if let Some(run) = self.jobs.get_mut(id).and_then(|j| j.run.as_deref().cloned()) {
                            self.show_run(run);
                        }
                        self.info(format!("job {id} done: {dir} (open in Timeline: 3)"));
                    } else {
                        self.info(format!("job {id} done: {dir} (Enter in Jobs opens it, c compares it)"));
                    }
                } else {
                    // Failures and cancellations also leave a directory behind.
                    self.runs.refresh();
                    self.job_ended(ended);
                }
            }
            Event::Key(k) => self.key(k),
            Event::Terminate => {
                self.jobs.cancel_all();
                self.quit = true;
            }
        }
    }

    /// A job that failed or was cancelled has ended: a status message about it (e.g.
    /// "cancelling job 2") is replaced by how it ended.
    fn job_ended(&mut self, ended: Option<usize>) {
        let Some(id) = ended.filter(|&id| self.status.as_ref().is_some_and(|s| s.job == Some(id))) else { return };
        let Some(job) = self.jobs.get_mut(id) else { return };
        let dir = job.dir.as_ref().map_or_else(String::new, |d| format!(" (its run directory: {}; Enter in Jobs opens it)", d.display()));
        match &job.state {
            JobState::Failed { error } => {
                let text = format!("job {id} failed: {error}");
                self.error(text)
            }
            state => {
                let text = format!("job {id} {}{dir}", state.word());
                self.info(text)
            }
        }
    }

    fn key(&mut self, k: Key) {
        if k == Key::CtrlC {
            return self.request_quit();
        }
        let armed = self.discard_armed.take();
        if self.prompt.is_some() {
            return self.prompt_key(k);
        }
        if self.help {
            match k {
                Key::Char('q') => self.quit_key(armed),
                _ => self.help = false,
            }
            return;
        }
        match k {
            Key::Char('q') => return self.quit_key(armed),
            Key::Char('?') => {
                self.help = true;
                return;
            }
            Key::Tab => return self.switch(Pane::ALL[(self.pane.index() + 1) % Pane::ALL.len()]),
            Key::BackTab => return self.switch(Pane::ALL[(self.pane.index() + Pane::ALL.len() - 1) % Pane::ALL.len()]),
            Key::Char(c @ '1'..='5') => return self.switch(Pane::ALL[c as usize - '1' as usize]),
            Key::Char('/') => {
                if self.pane.has_filter() {
                    // A new filter starts empty (the old one is cleared, keeping the selection).
                    self.apply_filter("");
                    self.prompt = Some(Prompt { kind: PromptKind::Filter, label: "filter".into(), text: String::new() });
                } else {
                    self.info(format!("nothing to filter in {} (/ filters the composer, timeline and runs)", self.pane.title()));
                }
                return;
            }
            _ => {}
        }
        self.quit_armed = false;
        match self.pane {
            Pane::Composer => self.composer_key(k),
            Pane::Jobs => self.jobs_key(k),
            Pane::Timeline => self.timeline_key(k),
            Pane::Breakdown => self.breakdown_key(k),
            Pane::Runs => self.runs_key(k, armed),
        }
    }

    fn switch(&mut self, pane: Pane) {
        self.pane = pane;
        if pane == Pane::Runs {
            self.runs.refresh();
        }
    }

    /// `q`: quit, unless the draft has unsaved edits and this is the first `q` (then ask:
    /// a second `q` drops them and quits, cancelling active jobs too).
    fn quit_key(&mut self, armed: Option<Discard>) {
        if !self.composer.dirty || armed == Some(Discard::Quit) {
            return self.request_quit();
        }
        self.discard_armed = Some(Discard::Quit);
        let active = self.jobs.active();
        // The second `q` confirms the jobs' cancellation too, not only the draft's loss.
        self.quit_armed = active > 0;
        let jobs = if active > 0 { format!(" (cancelling {active} queued or running job(s))") } else { String::new() };
        let save = self.save_hint();
        self.error(format!("the draft has unsaved changes: q again quits and drops them{jobs}, {save}"));
    }

    /// How to save the draft from the current pane.
    fn save_hint(&self) -> &'static str {
        if self.pane == Pane::Composer { "s saves" } else { "s in the Composer (1) saves" }
    }

    fn request_quit(&mut self) {
        let active = self.jobs.active();
        if active == 0 || self.quit_armed {
            self.jobs.cancel_all();
            self.quit = true;
        } else {
            self.quit_armed = true;
            self.error(format!("{active} job(s) still queued or running: press q again to cancel them and quit"));
        }
    }

    fn prompt_key(&mut self, k: Key) {
        let Some(mut p) = self.prompt.take() else { return };
        match k {
            Key::Esc => {
                if p.kind == PromptKind::Filter {
                    self.apply_filter("");
                }
                self.overwrite_armed = None;
                return;
            }
            Key::Backspace => {
                p.text.pop();
            }
            Key::CtrlU => p.text.clear(),
            Key::Char(c) => p.text.push(c),
            Key::Enter => return self.commit_prompt(p),
            _ => {}
        }
        if p.kind == PromptKind::Filter {
            self.apply_filter(&p.text.clone());
        }
        self.prompt = Some(p);
    }

    fn apply_filter(&mut self, text: &str) {
        match self.pane {
            Pane::Composer => self.composer.set_filter(text),
            Pane::Timeline => self.timeline.filter = text.to_lowercase(),
            Pane::Runs => self.runs.set_filter(text),
            _ => {}
        }
    }

    fn commit_prompt(&mut self, p: Prompt) {
        match p.kind {
            PromptKind::Filter => {}
            PromptKind::Edit => {
                if let Err(e) = self.composer.set_selected(&p.text) {
                    self.error(e);
                    self.prompt = Some(p);
                } else {
                    self.after_edit();
                }
            }
            PromptKind::Open => {
                let path = PathBuf::from(p.text.trim());
                match Composer::open(&path) {
                    Ok(c) => {
                        self.composer.replace(c);
                        let n = match &self.composer.check {
                            Check::Valid { note: None, .. } => "valid".to_string(),
                            Check::Valid { note: Some(n), .. } => format!("valid, but {n}"),
                            Check::Invalid { problems } => format!("{} problem(s) to fix", problems.len()),
                        };
                        self.info(format!("opened {} ({n}; u undoes)", path.display()));
                    }
                    Err(e) => {
                        self.error(format!("{e} (the current experiment is unchanged)"));
                        self.prompt = Some(p);
                    }
                }
            }
            PromptKind::Save => {
                let path = PathBuf::from(p.text.trim());
                let other_file = self.composer.path.as_deref() != Some(path.as_path());
                if path.exists() && other_file && self.overwrite_armed.as_deref() != Some(path.as_path()) {
                    self.overwrite_armed = Some(path.clone());
                    self.error(format!("{} exists: Enter again overwrites it, Esc keeps it", path.display()));
                    self.prompt = Some(p);
                    return;
                }
                self.overwrite_armed = None;
                match self.composer.save(&path) {
                    Ok(()) => match &self.composer.check {
                        Check::Valid { note: None, .. } => self.info(format!("saved {}: `moelab run {}` runs it", path.display(), path.display())),
                        Check::Valid { note: Some(n), .. } => self.info(format!("saved {} (valid, but {n})", path.display())),
                        Check::Invalid { problems } => self.error(format!(
                            "saved {}, but it has {} problem(s): moelab run will refuse it until they are fixed",
                            path.display(),
                            problems.len()
                        )),
                    },
                    Err(e) => {
                        self.error(e.to_string());
                        self.prompt = Some(p);
                    }
                }
            }
        }
    }

    fn after_edit(&mut self) {
        match &self.composer.check {
            Check::Valid { .. } => self.status = None,
            Check::Invalid { problems } => {
                let first = problems.first().map(|p| p.to_string()).unwrap_or_default();
                self.error(format!("invalid: {first}"));
            }
        }
    }

    fn composer_key(&mut self, k: Key) {
        let c = &mut self.composer;
        match k {
            Key::Up | Key::Char('k') => c.move_selection(-1),
            Key::Down | Key::Char('j') => c.move_selection(1),
            Key::PageUp => c.move_selection(-10),
            Key::PageDown => c.move_selection(10),
            Key::Home => c.selected = 0,
            Key::End => c.move_selection(isize::MAX / 2),
            Key::Left | Key::Right | Key::Char('h') | Key::Char('l') | Key::Char('-') | Key::Char('+') => {
                let dir = if matches!(k, Key::Left | Key::Char('h') | Key::Char('-')) { -1 } else { 1 };
                match c.adjust(dir) {
                    Ok(()) => self.after_edit(),
                    Err(e) => self.info(e),
                }
            }
            Key::Enter => {
                if let Some(f) = c.selected_field() {
                    self.status = None;
                    self.prompt = Some(Prompt { kind: PromptKind::Edit, label: f.key.to_string(), text: f.get(&c.draft) });
                }
            }
            Key::Char('P') => {
                let name = c.cycle_profile();
                self.info(format!("predicting on {name}"));
            }
            Key::Char('u') => {
                if c.undo() {
                    self.info("undone");
                } else {
                    self.info("nothing to undo");
                }
            }
            Key::Char('t') => {
                let v = c.variant().to_string();
                match Composer::from_template(&v) {
                    Some(t) => {
                        c.replace(t);
                        self.info(format!("template for variant {v} (u undoes)"));
                    }
                    None => self.error(format!("no template for variant {v:?}")),
                }
            }
            Key::Char('o') => {
                let text = c.path.as_ref().map_or_else(|| "experiments/".to_string(), |p| p.display().to_string());
                self.status = None;
                self.prompt = Some(Prompt { kind: PromptKind::Open, label: "open experiment".into(), text });
            }
            Key::Char('s') => {
                let text = c.default_save_path().display().to_string();
                self.status = None;
                self.prompt = Some(Prompt { kind: PromptKind::Save, label: "save as".into(), text });
            }
            Key::Char('r') => self.dispatch(),
            _ => {}
        }
    }

    /// Queue the composer's experiment on the worker.
    fn dispatch(&mut self) {
        let Some(spec) = self.composer.resolved().cloned() else {
            let first = match &self.composer.check {
                Check::Invalid { problems } => problems.first().map(|p| p.to_string()).unwrap_or_default(),
                Check::Valid { .. } => String::new(),
            };
            return self.error(format!("cannot run an invalid experiment: {first}"));
        };
        let mut spec = spec;
        let backend = spec.run.backend.as_str();
        // A sim job runs on the profile the live prediction shows (`P`), not only the spec's.
        let mut on = String::new();
        if let (moelab::spec::BackendKind::Sim, Some(p)) = (spec.run.backend, self.composer.profile.clone()) {
            on = format!(", profile {p}");
            spec.run.profile = Some(p);
        }
        match self.jobs.submit(spec) {
            Ok(id) => {
                let name = self.composer.name().to_string();
                self.info_job(id, format!("job {id} ({name}) queued on the {backend} backend{on}; see Jobs (2)"));
            }
            Err(e) => self.error(e),
        }
    }

    fn jobs_key(&mut self, k: Key) {
        match k {
            Key::Up | Key::Char('k') => self.jobs.move_selection(-1),
            Key::Down | Key::Char('j') => self.jobs.move_selection(1),
            Key::Char('x') => {
                let Some(id) = self.jobs.selected_job().map(|j| j.id) else { return };
                if self.jobs.cancel(id) {
                    self.info_job(id, format!("cancelling job {id}"));
                } else {
                    self.info(format!("job {id} has already ended"));
                }
            }
            Key::Enter | Key::Char('c') => {
                let Some(job) = self.jobs.selected_job() else { return };
                let (id, word) = (job.id, job.state.word());
                // A failed or cancelled job has no outcome but keeps its run directory (spec,
                // log, what it measured): open that, as the Runs pane would.
                let run = match (job.run.as_deref().cloned(), job.dir.clone()) {
                    (Some(run), _) => run,
                    (None, _) if job.state.is_active() => return self.info_job(id, format!("job {id} is still {word}: its run opens when it ends")),
                    (None, Some(dir)) => match runs::open_run(&dir) {
                        Ok(run) => run,
                        Err(e) => return self.error(format!("job {id} ({word}): cannot open its run directory: {e}")),
                    },
                    (None, None) => return self.info(format!("job {id} ({word}) left no run directory to show")),
                };
                if k == Key::Enter {
                    self.show_run(run);
                    self.pane = Pane::Timeline;
                } else {
                    self.set_compare(run);
                }
            }
            _ => {}
        }
    }

    /// Make `run` the current run (A) and fit the timeline to it.
    pub fn show_run(&mut self, run: LoadedRun) {
        self.timeline.reset(&run);
        self.memory_rank = None;
        self.breakdown_scroll = 0;
        self.current = Some(run);
    }

    fn set_compare(&mut self, run: LoadedRun) {
        let Some(a) = self.current.as_ref() else {
            return self.info("open a run first (Enter), then pick the one to compare it with (c)");
        };
        if crate::compare::same_run(a, &run) {
            return self.info(format!("{} is the open run (A) itself: pick another run to compare it with", run.label));
        }
        match crate::compare::mismatch_warning(a, &run) {
            Some(w) => self.error(format!("comparing with {}: {w}", run.label)),
            None => self.info(format!("comparing with {} (c in Breakdown clears it)", run.label)),
        }
        self.compare = Some(run);
        self.breakdown_scroll = 0;
        self.pane = Pane::Breakdown;
    }

    fn timeline_key(&mut self, k: Key) {
        let Some(run) = self.current.as_ref() else {
            return self.info("no run loaded: run a job (r in the composer) or open one in Runs (5)");
        };
        let v = &mut self.timeline;
        match k {
            Key::Left | Key::Char('h') => v.step_op(run, -1),
            Key::Right | Key::Char('l') => v.step_op(run, 1),
            Key::Up | Key::Char('k') => v.step_lane(run, -1),
            Key::Down | Key::Char('j') => v.step_lane(run, 1),
            Key::Char('+') | Key::Char('=') | Key::Char('z') => v.zoom(run, 0.5),
            Key::Char('-') | Key::Char('Z') => v.zoom(run, 2.0),
            Key::Char('H') | Key::Char('<') => v.pan(run, -0.25),
            Key::Char('L') | Key::Char('>') => v.pan(run, 0.25),
            Key::Home | Key::Char('0') => v.fit(run),
            Key::Char('n') | Key::Char('e') => {
                let exposed = k == Key::Char('e');
                if !v.next_comm(run, exposed) {
                    let what = if exposed { "exposed communication" } else { "communication op" };
                    self.info(format!("no later {what} on this rank"));
                }
            }
            _ => {}
        }
    }

    fn breakdown_key(&mut self, k: Key) {
        let ranks = self.current.as_ref().map_or(0, |r| r.analysis.memory.ranks.len());
        match k {
            Key::Char('c') => {
                if self.compare.take().is_some() {
                    self.breakdown_scroll = 0;
                    self.info("comparison cleared");
                }
            }
            // Kept below the table's row count (the table also keeps its last page in view), so
            // scrolling back up after overshooting moves at once.
            Key::Down | Key::Char('j') => self.breakdown_scroll = (self.breakdown_scroll + 1).min(self.breakdown_rows().saturating_sub(1)),
            Key::Up | Key::Char('k') => self.breakdown_scroll = self.breakdown_scroll.saturating_sub(1),
            Key::PageDown => self.breakdown_scroll = (self.breakdown_scroll + 10).min(self.breakdown_rows().saturating_sub(1)),
            Key::PageUp => self.breakdown_scroll = self.breakdown_scroll.saturating_sub(10),
            Key::Home => self.breakdown_scroll = 0,
            Key::Left | Key::Char('h') => {
                self.memory_rank = match self.memory_rank {
                    None | Some(0) => None,
                    Some(r) => Some(r - 1),
                }
            }
            Key::Right | Key::Char('l') if ranks > 0 => {
                self.memory_rank = Some(self.memory_rank.map_or(0, |r| (r + 1).min(ranks - 1)));
            }
            _ => {}
        }
    }

    /// Rows of the breakdown's scrolled table: the comparison's metrics, else the stages.
    fn breakdown_rows(&self) -> usize {
        match (&self.current, &self.compare) {
            (Some(a), Some(b)) => crate::compare::compare(a, b).len(),
            (Some(a), None) => a.analysis.stages.len(),
            _ => 0,
        }
    }

    fn runs_key(&mut self, k: Key, armed: Option<Discard>) {
        match k {
            Key::Up | Key::Char('k') => self.runs.move_selection(-1),
            Key::Down | Key::Char('j') => self.runs.move_selection(1),
            Key::Char('r') => {
                self.runs.refresh();
                self.info(format!("{} run(s) in {}", self.runs.entries.len(), self.runs.root.display()));
            }
            Key::Enter | Key::Char('c') => {
                let Some(path) = self.runs.selected_entry().map(|e| e.path.clone()) else { return };
                match runs::open_run(&path) {
                    Ok(run) if k == Key::Enter => {
                        let note = run.nothing_measured().map_or_else(String::new, |why| format!(": {why}"));
                        self.info(format!("opened {}{note}", run.label));
                        self.show_run(run);
                        self.pane = Pane::Timeline;
                    }
                    Ok(run) => self.set_compare(run),
                    Err(e) => self.error(format!("cannot open this run: {e}")),
                }
            }
            Key::Char('e') => {
                let Some(path) = self.runs.selected_entry().map(|e| e.path.join("spec.toml")) else { return };
                match Composer::open(&path) {
                    Ok(_) if self.composer.dirty && armed.as_ref() != Some(&Discard::Load(path.clone())) => {
                        self.discard_armed = Some(Discard::Load(path.clone()));
                        let save = self.save_hint();
                        self.error(format!("the draft has unsaved changes: e again replaces it with {}, {save}", path.display()));
                    }
                    Ok(mut c) => {
                        // A copy to edit: the run's own record is never the save target.
                        c.path = None;
                        c.dirty = true;
                        self.composer.replace(c);
                        self.pane = Pane::Composer;
                        self.info(format!("editing {} (s saves it elsewhere; u undoes)", path.display()));
                    }
                    Err(e) => self.error(e.to_string()),
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::composer::fields::by_key;

    fn app() -> App {
        let dir = std::env::temp_dir().join("moelab-workbench-no-such-runs-dir");
        App::new(Composer::from_template("topk").expect("template"), dir, None)
    }

    fn keys(app: &mut App, ks: &[Key]) {
        for k in ks {
            app.update(Event::Key(*k));
        }
    }

    #[test]
    fn tab_cycles_and_digits_jump() {
        let mut a = app();
        keys(&mut a, &[Key::Tab, Key::Tab]);
        assert_eq!(a.pane, Pane::Timeline);
        keys(&mut a, &[Key::BackTab, Key::BackTab, Key::BackTab]);
        assert_eq!(a.pane, Pane::Runs);
        keys(&mut a, &[Key::Char('1')]);
        assert_eq!(a.pane, Pane::Composer);
    }

    #[test]
    fn q_quits_but_not_while_typing() {
        let mut a = app();
        keys(&mut a, &[Key::Enter, Key::Char('q')]);
        assert!(!a.quit);
        assert!(a.prompt.as_ref().is_some_and(|p| p.text.ends_with('q')));
        keys(&mut a, &[Key::Esc, Key::Char('q')]);
        assert!(a.quit);
    }

    #[test]
    fn editing_a_field_by_typing_validates_and_bad_text_keeps_the_prompt() {
        let mut a = app();
        a.composer.select_key("layout.ep");
        keys(&mut a, &[Key::Enter, Key::Backspace, Key::Char('3'), Key::Enter]);
        assert!(a.prompt.is_none());
        assert!(a.status.as_ref().is_some_and(|s| s.error && s.text.contains("layout.ep")), "{:?}", a.status);
        keys(&mut a, &[Key::Enter, Key::Backspace, Key::Char('x'), Key::Enter]);
        assert!(a.prompt.is_some(), "unparsable text leaves the prompt open");
        assert!(a.status.as_ref().is_some_and(|s| s.text.contains("whole number")));
        keys(&mut a, &[Key::Esc]);
        assert_eq!(by_key("layout.ep").expect("f").get(&a.composer.draft), "3");
    }

    #[test]
    fn running_an_invalid_experiment_is_refused_with_the_field() {
        let mut a = app();
        a.composer.select_key("layout.ep");
        keys(&mut a, &[Key::Left, Key::Char('r')]);
        assert!(a.jobs.jobs.is_empty());
        assert!(a.status.as_ref().is_some_and(|s| s.error && s.text.contains("layout.ep")), "{:?}", a.status);
    }

    #[test]
    fn filter_applies_while_typing_and_esc_clears_it() {
        let mut a = app();
        keys(&mut a, &[Key::Char('/'), Key::Char('y'), Key::Char('o'), Key::Char('u')]);
        let keys_left: Vec<_> = a.composer.visible_fields().iter().map(|f| f.key).collect();
        assert_eq!(keys_left, ["layout.world", "layout.dp", "layout.ep", "layout.tp", "layout.pp"]);
        keys(&mut a, &[Key::Esc]);
        assert!(a.composer.visible_fields().len() > 10);
    }

    #[test]
    fn opening_a_broken_file_keeps_the_draft() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("bad.toml");
        std::fs::write(&p, "name = [").expect("write");
        let mut a = app();
        let before = a.composer.draft.clone();
        a.update(Event::Key(Key::Char('o')));
        a.prompt.as_mut().expect("prompt").text = p.display().to_string();
        a.update(Event::Key(Key::Enter));
        assert_eq!(a.composer.draft, before);
        assert!(a.status.as_ref().is_some_and(|s| s.error && s.text.contains("bad.toml")), "{:?}", a.status);
    }

    #[test]
    fn save_refuses_to_clobber_another_file_without_a_second_enter() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("other.toml");
        std::fs::write(&p, "keep me").expect("write");
        let mut a = app();
        a.update(Event::Key(Key::Char('s')));
        a.prompt.as_mut().expect("prompt").text = p.display().to_string();
        a.update(Event::Key(Key::Enter));
        assert_eq!(std::fs::read_to_string(&p).expect("read"), "keep me");
        a.update(Event::Key(Key::Enter));
        assert!(moelab::spec::load_file(&p).is_ok());
    }

    fn ended(id: usize, cancelled: bool) -> Event {
        let failure = crate::event::JobFailure { cancelled, message: "boom".into(), dir: None };
        Event::Job(JobEvent::Finished { id, result: Err(failure) })
    }

    #[test]
    fn a_status_about_a_job_is_replaced_when_the_job_ends() {
        let (tx, _rx) = std::sync::mpsc::channel();
        let dir = std::env::temp_dir().join("moelab-workbench-no-such-runs-dir");
        let mut a = App::new(Composer::from_template("topk").expect("template"), dir, Some(tx));
        keys(&mut a, &[Key::Char('r'), Key::Char('r'), Key::Char('2'), Key::Up, Key::Up, Key::Char('x')]);
        assert_eq!(a.status.as_ref().map(|s| s.text.as_str()), Some("cancelling job 1"));
        a.update(ended(1, true));
        let text = a.status.as_ref().map(|s| s.text.clone()).unwrap_or_default();
        assert_eq!(text, "job 1 cancelled");
        // Another job's end leaves a message about a different one alone.
        keys(&mut a, &[Key::Down, Key::Char('x')]);
        assert_eq!(a.status.as_ref().map(|s| s.text.as_str()), Some("cancelling job 2"));
        a.update(ended(1, true));
        assert_eq!(a.status.as_ref().map(|s| s.text.as_str()), Some("cancelling job 2"));
        a.update(ended(2, false));
        assert_eq!(a.status.clone().map(|s| (s.text, s.error)), Some(("job 2 failed: boom".to_string(), true)));
    }

    fn status_text(a: &App) -> String {
        a.status.as_ref().map(|s| s.text.clone()).unwrap_or_default()
    }

    #[test]
    fn q_with_unsaved_edits_asks_before_dropping_them() {
        let mut a = app();
        a.composer.select_key("layout.ep");
        keys(&mut a, &[Key::Right]);
        assert!(a.composer.dirty);
        keys(&mut a, &[Key::Char('q')]);
        assert!(!a.quit, "the first q only asks");
        assert!(status_text(&a).contains("the draft has unsaved changes: q again quits and drops them, s saves"), "{:?}", a.status);
        // Any other key disarms it; q then asks again.
        keys(&mut a, &[Key::Down, Key::Char('q')]);
        assert!(!a.quit);
        keys(&mut a, &[Key::Char('q')]);
        assert!(a.quit, "the second q quits");
        // From another pane the hint says where saving is.
        let mut b = app();
        b.composer.dirty = true;
        keys(&mut b, &[Key::Char('3'), Key::Char('q')]);
        assert!(!b.quit && status_text(&b).contains("s in the Composer (1) saves"), "{:?}", b.status);
    }

    #[test]
    fn a_clean_draft_quits_at_once_and_ctrl_c_never_asks_about_the_draft() {
        let mut a = app();
        keys(&mut a, &[Key::Char('q')]);
        assert!(a.quit);
        let mut b = app();
        b.composer.dirty = true;
        keys(&mut b, &[Key::CtrlC]);
        assert!(b.quit, "Ctrl-C quits as before");
        let mut c = app();
        c.composer.dirty = true;
        c.update(Event::Terminate);
        assert!(c.quit, "a signal quits as before");
    }

    #[test]
    fn editing_a_runs_spec_over_unsaved_edits_asks_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let run_dir = dir.path().join("20260101-000000-m");
        std::fs::create_dir(&run_dir).expect("mkdir");
        std::fs::write(run_dir.join("spec.toml"), Composer::from_template("mpmoe").expect("template").toml()).expect("write");
        let mut a = App::new(Composer::from_template("topk").expect("template"), dir.path().to_path_buf(), None);
        a.composer.select_key("layout.ep");
        keys(&mut a, &[Key::Right]);
        let draft = a.composer.draft.clone();
        keys(&mut a, &[Key::Char('5'), Key::Char('e')]);
        assert_eq!(a.composer.draft, draft, "the first e only asks");
        assert_eq!(a.pane, Pane::Runs);
        assert!(status_text(&a).contains("e again replaces it"), "{:?}", a.status);
        keys(&mut a, &[Key::Char('e')]);
        assert_eq!((a.pane, a.composer.variant()), (Pane::Composer, "mpmoe"));
        // The loaded copy is dirty too; u brings the old draft back.
        keys(&mut a, &[Key::Char('u')]);
        assert_eq!(a.composer.draft, draft);
    }

    #[test]
    fn a_new_filter_starts_empty_and_clearing_it_keeps_the_selection() {
        let mut a = app();
        keys(&mut a, &[Key::Char('/'), Key::Char('s'), Key::Char('t'), Key::Char('e'), Key::Char('p'), Key::Char('s'), Key::Enter]);
        assert_eq!(a.composer.filter, "steps");
        keys(&mut a, &[Key::Char('/'), Key::Char('w'), Key::Char('a'), Key::Char('r'), Key::Char('m')]);
        assert_eq!(a.prompt.as_ref().map(|p| p.text.as_str()), Some("warm"));
        assert_eq!(a.composer.filter, "warm");
        keys(&mut a, &[Key::Esc]);
        let mut b = app();
        b.composer.select_key("layout.tp");
        keys(&mut b, &[Key::Char('/'), Key::Char('t'), Key::Char('p')]);
        assert_eq!(b.composer.selected_field().map(|f| f.key), Some("layout.tp"));
        keys(&mut b, &[Key::Esc]);
        assert_eq!(b.composer.selected_field().map(|f| f.key), Some("layout.tp"), "Esc keeps the field selected");
        keys(&mut b, &[Key::Char('/'), Key::Backspace, Key::Enter]);
        assert_eq!(b.composer.selected_field().map(|f| f.key), Some("layout.tp"));
    }

    #[test]
    fn ctrl_u_clears_the_value_being_typed() {
        let mut a = app();
        a.composer.select_key("layout.ep");
        keys(&mut a, &[Key::Enter, Key::CtrlU]);
        assert_eq!(a.prompt.as_ref().map(|p| p.text.as_str()), Some(""));
        keys(&mut a, &[Key::Char('4'), Key::Enter]);
        assert_eq!(by_key("layout.ep").expect("f").get(&a.composer.draft), "4");
    }

    #[test]
    fn comparing_a_run_with_itself_is_refused() {
        let mut a = app();
        let run = || LoadedRun::new("20260101-x".into(), None, crate::runs::RunSummary::default(), moelab::trace::Trace::default());
        a.show_run(run());
        a.set_compare(run());
        assert!(a.compare.is_none());
        let text = a.status.as_ref().map(|s| s.text.clone()).unwrap_or_default();
        assert!(text.contains("is the open run (A) itself"), "{text}");
    }
}
