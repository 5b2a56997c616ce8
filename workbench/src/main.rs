//! `moelab-workbench`: the terminal workbench binary (also started by `moelab workbench`).
//! Sets up the terminal, the job worker and the input thread, then loops: draw, wait for
//! one event, update. Errors before the terminal is taken print plainly.

use anyhow::{Context, Result};
use clap::Parser;
use moelab_workbench::app::{App, Status};
use moelab_workbench::composer::Composer;
use moelab_workbench::event::{self, Event};
use moelab_workbench::{jobs, ui};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

/// The moelab terminal workbench: compose an experiment (live validation and predicted
/// memory), run it in the background on its backend, and read its timeline and
/// breakdowns; browse and compare past runs. Press ? inside for the keys.
#[derive(Parser)]
#[command(name = "moelab-workbench", version, about, long_about)]
struct Args {
    /// Experiment file to open in the composer (e.g. experiments/quickstart.toml).
    file: Option<PathBuf>,
    /// Directory of run directories: where jobs write and the runs browser looks.
    #[arg(long, env = "MOELAB_RUNS_DIR", default_value = "runs")]
    runs_dir: PathBuf,
    /// Variant whose template the composer starts from when no file is given.
    #[arg(long, default_value = "topk")]
    template: String,
    /// Override a field of the opened file before it is checked, e.g. `--set layout.ep=2`
    /// (repeatable; an empty value removes the field), as `moelab run --set` does.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

/// How often elapsed times refresh while nothing else happens.
const TICK: Duration = Duration::from_millis(250);

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    // An empty MOELAB_RUNS_DIR means unset (as for notebooks), not an empty --runs-dir.
    if std::env::var_os("MOELAB_RUNS_DIR").is_some_and(|v| v.is_empty()) {
        std::env::remove_var("MOELAB_RUNS_DIR");
    }
    let args = Args::parse();
    let variant = args.template.as_str();
    let template = Composer::from_template(variant)
        .with_context(|| format!("--template {variant:?} is not a variant (one of: topk, ppmoe, ted, tutel, mpmoe, scmoe, dgmoe)"))?;
    // A file that cannot be opened does not stop the workbench: it starts from the template
    // and says why, so nothing is written over the broken file.
    let overrides = args.sets.iter().map(|s| moelab::spec::overrides::Override::parse(s)).collect::<Result<Vec<_>, _>>()?;
    let (composer, startup) = match &args.file {
        Some(path) => match Composer::open_with(path, &overrides) {
            Ok(c) => (c, None),
            Err(e) => (template, Some(format!("{e} (started from the {variant} template; o opens a file)"))),
        },
        None => (template, None),
    };
    let (tx, rx) = mpsc::channel::<Event>();
    let worker = jobs::spawn_worker(args.runs_dir.clone(), tx.clone());
    let mut app = App::new(composer, args.runs_dir.clone(), Some(worker));
    app.status = startup.map(|text| Status { text, error: true, job: None });

    // A signal to stop (kill, a closed SSH session) quits like `q q`: the active jobs are
    // cancelled and, below, given time to write their run directories.
    let on_signal = tx.clone();
    ctrlc::set_handler(move || {
        let _ = on_signal.send(Event::Terminate);
    })
    .context("installing the signal handler")?;
    let mut terminal = ratatui::try_init().context("setting up the terminal")?;
    event::spawn_input_thread(tx);
    let result = (|| -> Result<()> {
        loop {
            terminal.draw(|f| ui::draw(f, &app)).context("drawing")?;
            match rx.recv_timeout(TICK) {
                Ok(ev) => app.update(ev),
                Err(RecvTimeoutError::Timeout) => app.update(Event::Tick),
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            // Apply whatever else arrived before drawing again (key repeat, step reports).
            while let Ok(ev) = rx.try_recv() {
                app.update(ev);
            }
            if app.quit {
                return Ok(());
            }
        }
    })();
    // After a hangup the terminal is gone: restoring it fails and stderr may fail too, so
    // neither may panic before the jobs below have written their run directories.
    // The terminal shows its cursor here, not in its Drop, which prints (and, on a hung-up
    // tty, panics) when it cannot.
    let _ = terminal.show_cursor();
    std::mem::forget(terminal);
    let _ = ratatui::try_restore();
    // Quitting cancelled the active jobs; let them write their run directories.
    if app.jobs.active() > 0 {
        let _ = writeln!(std::io::stderr(), "waiting for {} cancelled job(s) to write their run directories...", app.jobs.active());
        let deadline = Instant::now() + Duration::from_secs(30);
        while app.jobs.active() > 0 {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Event::Job(ev)) => {
                    app.jobs.apply(ev, Instant::now());
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
    result
}
