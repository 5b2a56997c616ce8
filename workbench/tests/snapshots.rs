//! Rendering snapshots (ratatui TestBackend + insta) of every pane at 80x24 and 160x48, the
//! help overlay, and the too-small message at 40x10. Fixtures are synthetic and timed by
//! hand, so a changed snapshot means a changed rendering.

mod common;

use common::{app, render, synthetic_run};
use moelab_workbench::app::Pane;
use moelab_workbench::event::{Event, Key};
use moelab_workbench::jobs::{Job, JobState};
use moelab_workbench::App;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZES: [(u16, u16); 2] = [(80, 24), (160, 48)];

fn snap(name: &str, app: &App) {
    for (w, h) in SIZES {
        let t = render(app, w, h);
        insta::assert_snapshot!(format!("{name}_{w}x{h}"), t.backend());
    }
}

fn press(app: &mut App, keys: &[Key]) {
    for k in keys {
        app.update(Event::Key(*k));
    }
}

#[test]
fn composer_valid() {
    snap("composer_valid", &app());
}

#[test]
fn composer_invalid_names_the_field() {
    let mut a = app();
    assert!(a.composer.select_key("layout.ep"));
    press(&mut a, &[Key::Left]);
    let t = render(&a, 80, 24);
    assert!(t.backend().to_string().contains("layout.ep"), "the problem names its field");
    snap("composer_invalid", &a);
}

fn job(id: usize, state: JobState, base: Instant, started: u64, finished: Option<u64>) -> Job {
    let text = moelab_workbench::composer::templates::template_toml(if id % 2 == 0 { "mpmoe" } else { "topk" });
    Job {
        id,
        spec: moelab::spec::from_toml_str(&text).expect("template"),
        state,
        started: Some(base + Duration::from_secs(started)),
        finished: finished.map(|f| base + Duration::from_secs(f)),
        cancel: Arc::new(AtomicBool::new(false)),
        dir: Some(format!("runs/20260101-00000{id}-job").into()),
        run: None,
    }
}

#[test]
fn jobs_queue_with_every_state() {
    let mut a = app();
    let base = Instant::now();
    let mut done = job(1, JobState::Completed, base, 0, Some(3));
    done.run = Some(Box::new(synthetic_run("20260101-000001-job", 4, 2, 1, 0)));
    let failed = JobState::Failed { error: "rank 1 failed in op L0.expert_gemm1: injected failure (run directory kept: runs/x)".into() };
    a.jobs.jobs = vec![
        done,
        job(2, failed, base, 3, Some(4)),
        job(3, JobState::Cancelled, base, 4, Some(5)),
        job(4, JobState::Running { done: 2, total: 4, loss: Some(1.2345) }, base, 5, None),
        job(5, JobState::Queued, base, 0, None),
    ];
    a.jobs.jobs[4].started = None;
    a.jobs.selected = 1;
    a.now = base + Duration::from_secs(12);
    a.pane = Pane::Jobs;
    snap("jobs", &a);
    let mut empty = app();
    empty.pane = Pane::Jobs;
    snap("jobs_empty", &empty);
}

#[test]
fn timeline_with_a_selected_exposed_comm_op() {
    let mut a = app();
    a.show_run(synthetic_run("20260101-000000-mpmoe", 4, 2, 2, 0));
    a.pane = Pane::Timeline;
    press(&mut a, &[Key::Char('n'), Key::Char('+')]);
    snap("timeline", &a);
    let mut empty = app();
    empty.pane = Pane::Timeline;
    snap("timeline_empty", &empty);
}

#[test]
fn breakdown_single_and_compared() {
    let mut a = app();
    a.show_run(synthetic_run("20260101-000000-mpmoe", 4, 2, 2, 0));
    a.pane = Pane::Breakdown;
    snap("breakdown", &a);
    a.compare = Some(synthetic_run("20260102-000000-topk", 4, 2, 1, 3_000));
    snap("breakdown_compare", &a);
}

#[test]
fn runs_browser_newest_first_and_missing_dir() {
    let mut a = app();
    a.pane = Pane::Runs;
    snap("runs", &a);
    let mut missing = App::new(moelab_workbench::composer::Composer::from_template("topk").expect("t"), "tests/fixtures/no-such-runs".into(), None);
    missing.pane = Pane::Runs;
    snap("runs_missing", &missing);
}

#[test]
fn help_overlay() {
    let mut a = app();
    press(&mut a, &[Key::Char('?')]);
    snap("help", &a);
}

#[test]
fn too_small_terminal_says_so() {
    let mut a = app();
    a.show_run(synthetic_run("r", 2, 1, 1, 0));
    for pane in Pane::ALL {
        a.pane = pane;
        let t = render(&a, 40, 10);
        assert!(t.backend().to_string().contains("terminal too small"));
    }
    insta::assert_snapshot!("too_small_40x10", render(&a, 40, 10).backend());
    // Degenerate sizes draw nothing and do not panic.
    for (w, h) in [(0, 0), (1, 1), (59, 40), (200, 15)] {
        render(&a, w, h);
    }
}

#[test]
fn every_pane_draws_at_many_sizes_without_panicking() {
    let mut a = app();
    a.show_run(synthetic_run("r", 8, 4, 4, 0));
    a.compare = Some(synthetic_run("s", 2, 1, 1, 0));
    for pane in Pane::ALL {
        a.pane = pane;
        for (w, h) in [(60, 16), (61, 17), (80, 24), (100, 30), (133, 41), (250, 80)] {
            render(&a, w, h);
        }
    }
}

#[test]
fn breakdown_scrolls_its_stage_table() {
    let mut a = app();
    a.show_run(synthetic_run("r", 2, 2, 2, 0));
    a.pane = Pane::Breakdown;
    // 24 rows leave the stage table fewer rows than it has stages: it says which rows show.
    let first = render(&a, 80, 24).backend().to_string();
    assert!(first.contains("rows 1-"), "{first}");
    press(&mut a, &[Key::PageDown, Key::PageDown, Key::PageDown]);
    let scrolled = render(&a, 80, 24).backend().to_string();
    assert!(!scrolled.contains("rows 1-"), "{scrolled}");
    // Scrolling past the end keeps the last row in view; Home goes back to the top.
    assert!(scrolled.contains(" of "), "{scrolled}");
    press(&mut a, &[Key::Home]);
    assert_eq!(render(&a, 80, 24).backend().to_string(), first);
}

#[test]
fn comparing_runs_of_other_backends_or_worlds_warns_above_the_table() {
    let mut a = app();
    let mut sim = synthetic_run("20260101-000000-sim", 4, 2, 2, 0);
    sim.summary.backend = "sim".into();
    sim.summary.world = 16;
    a.show_run(sim);
    a.compare = Some(synthetic_run("20260102-000000-cpu", 4, 2, 1, 3_000));
    a.pane = Pane::Breakdown;
    for (w, h) in SIZES {
        let text = render(&a, w, h).backend().to_string();
        assert!(text.contains("runs differ: backend sim vs cpu, world 16 vs 4"), "{text}");
        assert!(text.contains("step time (ms)"), "the table still shows: {text}");
    }
}

#[test]
fn help_box_holds_its_wrapped_lines() {
    let mut a = app();
    press(&mut a, &[Key::Char('?')]);
    for (w, h) in [(60, 30), (70, 30)] {
        let t = render(&a, w, h).backend().to_string();
        assert!(t.contains("magenta all-to-all"), "the last line shows at {w}x{h}:\n{t}");
    }
}

#[test]
fn narrow_terminals_keep_every_tab_and_the_overlap_ranks() {
    let mut a = app();
    a.show_run(synthetic_run("r", 2, 2, 2, 0));
    a.pane = Pane::Breakdown;
    let t = render(&a, 60, 20).backend().to_string();
    for tab in [" 1 ", " 2 ", " 3 ", " 5 ", "4 Breakdown"] {
        assert!(t.contains(tab), "tab {tab:?} at 60x20:\n{t}");
    }
    assert!(t.contains("rank") && t.contains("hid"), "the overlap table keeps its rank and hidden columns:\n{t}");
}

#[test]
fn deep_zoom_labels_tell_the_window_apart() {
    let mut a = app();
    // 2 ms all-to-alls: a step of several ms, so the window's times read in ms.
    a.show_run(synthetic_run("r", 2, 2, 1, 2_000_000));
    a.pane = Pane::Timeline;
    press(&mut a, &[Key::Char('n')]);
    press(&mut a, &[Key::Char('+'); 40]);
    assert_eq!(a.timeline.span, 1_000, "zoomed in to the smallest window");
    for (w, h) in SIZES {
        let t = render(&a, w, h).backend().to_string();
        let lines: Vec<String> = t.lines().map(|l| l.trim_matches('"').to_string()).collect();
        let head = lines.iter().find(|l| l.contains(" – ") && l.contains(" of ")).unwrap_or_else(|| panic!("a header:\n{t}"));
        let window = head.split(" · ").nth(1).and_then(|s| s.split(" of ").next()).expect("t0 – t1");
        let (t0, t1) = window.split_once(" – ").expect("two times");
        assert!(t0.ends_with("ms") && t0 != t1, "{w}x{h}: the header's window {window:?} reads as one time");
        let axis = lines.iter().find(|l| l.starts_with("     ") && l.matches(" ms").count() == 3).unwrap_or_else(|| panic!("an axis line:\n{t}"));
        let labels: Vec<&str> = axis.split("  ").map(str::trim).filter(|s| !s.is_empty()).collect();
        assert_eq!(labels.len(), 3, "{axis}");
        assert!(labels[0] != labels[1] && labels[1] != labels[2], "{w}x{h}: axis labels {labels:?} repeat");
    }
}
