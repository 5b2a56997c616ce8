//! Runs that stopped early: a failed or cancelled job opens from the Jobs pane like any
//! other run, and a run cancelled before its first measured step says so instead of drawing
//! empty tables and a zero-length timeline.

mod common;

use common::{app, cancelled_in_warmup, render};
use moelab_workbench::app::Pane;
use moelab_workbench::event::{Event, JobEvent, JobFailure, Key};
use moelab_workbench::jobs::{Job, JobState};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// An app whose Jobs pane holds one job that ended without an outcome (cancelled or failed)
/// and left `dir` behind, reported the way the worker reports it.
fn app_with_ended_job(dir: std::path::PathBuf, cancelled: bool) -> moelab_workbench::App {
    let mut a = app();
    let text = moelab_workbench::composer::templates::template_toml("topk");
    let spec = moelab::spec::from_toml_str(&text).expect("template");
    a.jobs.jobs.push(Job { id: 1, spec, state: JobState::Running { done: 1, total: 4, loss: None }, started: None, finished: None, cancel: Arc::new(AtomicBool::new(false)), dir: None, run: None });
    let message = if cancelled { "cancelled".to_string() } else { "rank 0 failed in op L0.gate: injected".to_string() };
    a.update(Event::Job(JobEvent::Finished { id: 1, result: Err(JobFailure { cancelled, message, dir: Some(dir) }) }));
    a.pane = Pane::Jobs;
    a
}

#[test]
fn a_cancelled_or_failed_job_opens_its_run_directory() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = cancelled_in_warmup(root.path());
    for cancelled in [true, false] {
        let mut a = app_with_ended_job(dir.clone(), cancelled);
        assert!(!a.jobs.jobs[0].state.is_active());
        a.update(Event::Key(Key::Enter));
        assert_eq!(a.current.as_ref().and_then(|r| r.dir.as_ref()), Some(&dir), "{:?}", a.status);
        assert_eq!(a.pane, Pane::Timeline);
        // c refuses to compare the open run with itself...
        a.pane = Pane::Jobs;
        a.update(Event::Key(Key::Char('c')));
        assert!(a.compare.is_none() && a.status.as_ref().is_some_and(|s| s.text.contains("itself")), "{:?}", a.status);
        // ...and compares another open run with the job's.
        a.show_run(common::synthetic_run("other", 4, 2, 1, 0));
        a.update(Event::Key(Key::Char('c')));
        assert_eq!(a.compare.as_ref().and_then(|r| r.dir.as_ref()), Some(&dir), "{:?}", a.status);
    }
    // A job whose directory is gone says so, as an error naming the file.
    let mut a = app_with_ended_job(root.path().join("no-such-run"), true);
    a.update(Event::Key(Key::Enter));
    assert!(a.current.is_none());
    assert!(a.status.as_ref().is_some_and(|s| s.error && s.text.contains("no-such-run")), "{:?}", a.status);
}

#[test]
fn a_run_cancelled_in_warmup_says_it_measured_nothing() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = cancelled_in_warmup(root.path());
    let composer = moelab_workbench::composer::Composer::from_template("topk").expect("template");
    let mut a = moelab_workbench::App::new(composer, root.path().to_path_buf(), None);
    a.pane = Pane::Runs;
    let runs = render(&a, 80, 24).backend().to_string();
    let row = runs.lines().find(|l| l.contains("cancelled")).unwrap_or_else(|| panic!("a cancelled row:\n{runs}"));
    assert!(!row.contains('%') && !row.contains("NaN"), "no overlap figure without a measured step: {row}");
    a.update(Event::Key(Key::Enter));
    assert_eq!(a.current.as_ref().and_then(|r| r.dir.as_ref()), Some(&dir), "{:?}", a.status);
    for pane in [Pane::Timeline, Pane::Breakdown] {
        a.pane = pane;
        for (w, h) in [(80, 24), (160, 48)] {
            let t = render(&a, w, h).backend().to_string();
            assert!(t.contains("no measured steps") && t.contains("cancelled during warmup"), "{pane:?} {w}x{h}:\n{t}");
            for garbled in ["NaN", "×0.0", "of 1 ns", "0 steps"] {
                assert!(!t.contains(garbled), "{pane:?} {w}x{h} shows {garbled:?}:\n{t}");
            }
        }
    }
    // Keys on the empty timeline do nothing and do not panic.
    a.pane = Pane::Timeline;
    for k in [Key::Right, Key::Down, Key::Char('+'), Key::Char('n'), Key::Char('e'), Key::Char('0')] {
        a.update(Event::Key(k));
    }
    render(&a, 80, 24);
}
