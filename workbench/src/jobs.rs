//! Jobs: the queue of experiments dispatched from the composer, their state, and the
//! background worker that runs them one at a time (the cpu backend already uses a thread per
//! rank and stream) and reports through the event channel, so the UI never waits on a run.

use crate::event::{Event, JobEvent, JobFailure};
use crate::loaded::LoadedRun;
use moelab::backend::BackendError;
use moelab::run::{self, RunError, RunHooks};
use moelab::spec::ExperimentSpec;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where a job is.
#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    /// Waiting for the worker.
    Queued,
    /// Executing: steps done of steps in all (warmup included).
    Running {
        /// Steps finished.
        done: usize,
        /// Steps in all.
        total: usize,
        /// Loss of the last finished step.
        loss: Option<f64>,
    },
    /// Finished; its run is in `Job::run`.
    Completed,
    /// Stopped by an error, shown to the user.
    Failed {
        /// The error.
        error: String,
    },
    /// Stopped by the user.
    Cancelled,
}

impl JobState {
    /// One word for tables.
    pub fn word(&self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running { .. } => "running",
            JobState::Completed => "done",
            JobState::Failed { .. } => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
    /// Whether the job is still queued or running.
    pub fn is_active(&self) -> bool {
        matches!(self, JobState::Queued | JobState::Running { .. })
    }
}

/// One dispatched experiment.
#[derive(Debug, Clone)]
pub struct Job {
    /// Id, counting from 1.
    pub id: usize,
    /// The resolved spec it runs.
    pub spec: ExperimentSpec,
    /// State.
    pub state: JobState,
    /// When the worker started it.
    pub started: Option<Instant>,
    /// When it ended.
    pub finished: Option<Instant>,
    /// Set to stop it (between ops when running; skipped when still queued).
    pub cancel: Arc<AtomicBool>,
    /// The run directory (also kept for failed and cancelled runs).
    pub dir: Option<PathBuf>,
    /// The completed run, ready for the timeline.
    pub run: Option<Box<LoadedRun>>,
}

impl Job {
    /// Time spent running so far (or in all, once finished); zero while queued.
    pub fn elapsed(&self, now: Instant) -> Duration {
        match (self.started, self.finished) {
            (Some(s), Some(f)) => f.saturating_duration_since(s),
            (Some(s), None) => now.saturating_duration_since(s),
            _ => Duration::ZERO,
        }
    }
    /// Share of steps done, 0..=1.
    pub fn progress(&self) -> f64 {
        match &self.state {
            JobState::Running { done, total, .. } if *total > 0 => *done as f64 / *total as f64,
            JobState::Completed => 1.0,
            _ => 0.0,
        }
    }
}

/// A request to the worker.
#[derive(Debug)]
pub struct JobRequest {
    /// Job id.
    pub id: usize,
    /// What to run.
    pub spec: ExperimentSpec,
    /// The job's cancel flag.
    pub cancel: Arc<AtomicBool>,
}

/// The job list and the line to the worker.
#[derive(Debug)]
pub struct Jobs {
    /// Every job of this session, oldest first.
    pub jobs: Vec<Job>,
    /// Selected row.
    pub selected: usize,
    worker: Option<Sender<JobRequest>>,
}

impl Jobs {
    /// A job list that sends work to `worker` (`None`: dispatch reports that no worker runs).
    pub fn new(worker: Option<Sender<JobRequest>>) -> Self {
        Jobs { jobs: Vec::new(), selected: 0, worker }
    }

    /// Queue a resolved spec; returns the job id.
    pub fn submit(&mut self, spec: ExperimentSpec) -> Result<usize, String> {
        let tx = self.worker.as_ref().ok_or("no job worker is running")?;
        let id = self.jobs.len() + 1;
        let cancel = Arc::new(AtomicBool::new(false));
        tx.send(JobRequest { id, spec: spec.clone(), cancel: cancel.clone() }).map_err(|_| "the job worker has stopped".to_string())?;
        self.jobs.push(Job { id, spec, state: JobState::Queued, started: None, finished: None, cancel, dir: None, run: None });
        self.selected = self.jobs.len() - 1;
        Ok(id)
    }

    /// Ask a job to stop; false when it already ended.
    pub fn cancel(&mut self, id: usize) -> bool {
        match self.get_mut(id) {
            Some(j) if j.state.is_active() => {
                j.cancel.store(true, Ordering::SeqCst);
                true
            }
            _ => false,
        }
    }

    /// Cancel every queued or running job; returns how many.
    pub fn cancel_all(&mut self) -> usize {
        let ids: Vec<usize> = self.jobs.iter().filter(|j| j.state.is_active()).map(|j| j.id).collect();
        ids.iter().filter(|&&id| self.cancel(id)).count()
    }

    /// Jobs still queued or running.
    pub fn active(&self) -> usize {
        self.jobs.iter().filter(|j| j.state.is_active()).count()
    }

    /// The job with this id.
    pub fn get_mut(&mut self, id: usize) -> Option<&mut Job> {
        self.jobs.iter_mut().find(|j| j.id == id)
    }

    /// The selected job.
    pub fn selected_job(&self) -> Option<&Job> {
        self.jobs.get(self.selected)
    }

    /// Move the selection by `delta`, clamped.
    pub fn move_selection(&mut self, delta: isize) {
        let n = self.jobs.len() as isize;
        self.selected = if n == 0 { 0 } else { (self.selected as isize + delta).clamp(0, n - 1) as usize };
    }

    /// Apply a worker report at time `now`; returns the id of a job that just completed.
    pub fn apply(&mut self, ev: JobEvent, now: Instant) -> Option<usize> {
        match ev {
            JobEvent::Started { id } => {
                if let Some(j) = self.get_mut(id) {
                    j.started = Some(now);
                    j.state = JobState::Running { done: 0, total: j.spec.run.warmup + j.spec.run.steps, loss: None };
                }
                None
            }
            JobEvent::Progress { id, done, total, loss } => {
                if let Some(j) = self.get_mut(id) {
                    j.state = JobState::Running { done, total, loss: Some(loss) };
                }
                None
            }
            JobEvent::Finished { id, result } => {
                let j = self.get_mut(id)?;
                j.finished = Some(now);
                if j.started.is_none() {
                    j.started = Some(now);
                }
                match result {
                    Ok(outcome) => {
                        j.dir = Some(outcome.dir.clone());
                        j.run = Some(Box::new(LoadedRun::from_outcome(&j.spec, *outcome)));
                        j.state = JobState::Completed;
                        Some(id)
                    }
                    Err(JobFailure { cancelled, message, dir }) => {
                        j.dir = dir;
                        j.state = if cancelled { JobState::Cancelled } else { JobState::Failed { error: message } };
                        None
                    }
                }
            }
        }
    }
}

/// Run one request to the end, reporting through `events`.
fn run_one(req: JobRequest, runs_root: &std::path::Path, events: &Sender<Event>) {
    let id = req.id;
    if req.cancel.load(Ordering::SeqCst) {
        let failure = JobFailure { cancelled: true, message: "cancelled before it started".into(), dir: None };
        let _ = events.send(Event::Job(JobEvent::Finished { id, result: Err(failure) }));
        return;
    }
    let _ = events.send(Event::Job(JobEvent::Started { id }));
    let mut hooks = RunHooks::default();
    hooks.exec.cancel = req.cancel.clone();
    let total = req.spec.run.warmup + req.spec.run.steps;
    let tx = events.clone();
    hooks.on_step = Some(Arc::new(move |r| {
        let _ = tx.send(Event::Job(JobEvent::Progress { id, done: r.step + 1, total, loss: r.loss }));
    }));
    // A panic inside the library is a bug, but it must not take the workbench down with it.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run::run(&req.spec, runs_root, &hooks)));
    let result = match outcome {
        Ok(Ok(o)) => Ok(Box::new(o)),
        Ok(Err(RunError::Backend { source, dir })) => Err(JobFailure {
            cancelled: source == BackendError::Cancelled,
            message: source.to_string(),
            dir: Some(PathBuf::from(dir)),
        }),
        Ok(Err(e)) => Err(JobFailure { cancelled: false, message: e.to_string(), dir: None }),
        Err(panic) => {
            let what = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(JobFailure { cancelled: false, message: format!("the run panicked: {}", what.unwrap_or_default()), dir: None })
        }
    };
    let _ = events.send(Event::Job(JobEvent::Finished { id, result }));
}

/// Start the worker thread: it takes requests in order and writes run directories under
/// `runs_root`. It ends when the returned sender is dropped.
pub fn spawn_worker(runs_root: PathBuf, events: Sender<Event>) -> Sender<JobRequest> {
    let (tx, rx): (Sender<JobRequest>, Receiver<JobRequest>) = mpsc::channel();
    std::thread::Builder::new()
        .name("moelab-jobs".into())
        .spawn(move || {
            for req in rx {
                run_one(req, &runs_root, &events);
            }
        })
        .expect("spawning the job worker thread");
    tx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::composer::templates::template_toml;

    fn small() -> ExperimentSpec {
        let text = template_toml("topk").replace("n_layers = 2", "n_layers = 1").replace("steps = 3", "steps = 1");
        moelab::spec::from_toml_str(&text).expect("valid")
    }

    fn drain(rx: &Receiver<Event>, jobs: &mut Jobs, until: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while jobs.jobs.iter().take(until).any(|j| j.state.is_active()) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Event::Job(ev)) => {
                    jobs.apply(ev, Instant::now());
                }
                Ok(_) => {}
                Err(e) => panic!("worker went quiet: {e}"),
            }
        }
    }

    #[test]
    fn a_job_runs_in_the_background_and_a_queued_cancel_skips_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (etx, erx) = mpsc::channel();
        let mut jobs = Jobs::new(Some(spawn_worker(dir.path().to_path_buf(), etx)));
        let a = jobs.submit(small()).expect("submit");
        let b = jobs.submit(small()).expect("submit");
        assert!(jobs.cancel(b));
        drain(&erx, &mut jobs, 2);
        let ja = jobs.get_mut(a).expect("job").clone();
        assert_eq!(ja.state, JobState::Completed);
        assert!(ja.dir.as_ref().is_some_and(|d| d.join("summary.json").exists()));
        assert!(ja.run.as_ref().is_some_and(|r| !r.trace.ops.is_empty()));
        assert_eq!(jobs.get_mut(b).expect("job").state, JobState::Cancelled);
        assert!(!jobs.cancel(a), "a finished job cannot be cancelled");
    }

    #[test]
    fn a_failing_job_reports_its_error() {
        // A runs root that is a file: the run directory cannot be created.
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "x").expect("write");
        let (etx, erx) = mpsc::channel();
        let mut jobs = Jobs::new(Some(spawn_worker(file, etx)));
        let id = jobs.submit(small()).expect("submit");
        drain(&erx, &mut jobs, 1);
        match &jobs.get_mut(id).expect("job").state {
            JobState::Failed { error } => assert!(error.contains("not-a-dir"), "{error}"),
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn without_a_worker_submit_says_so() {
        let mut jobs = Jobs::new(None);
        assert!(jobs.submit(small()).unwrap_err().contains("no job worker"));
    }
}
