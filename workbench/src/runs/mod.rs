//! The runs browser's state: the run directories under the runs root, newest first, each
//! with its summary when it has one, and loading a chosen run for the other panes.

pub mod chrome_import;
pub mod summary;

pub use summary::RunSummary;

use crate::error::WorkbenchError;
use crate::loaded::LoadedRun;
use std::path::{Path, PathBuf};

/// One directory under the runs root.
#[derive(Debug, Clone, PartialEq)]
pub struct RunEntry {
    /// Directory name, `<timestamp>-<name>`.
    pub name: String,
    /// Full path.
    pub path: PathBuf,
    /// Its summary, when `summary.json` exists and reads.
    pub summary: Option<RunSummary>,
    /// Why there is no summary (e.g. a comparison directory, or a damaged file).
    pub note: Option<String>,
    /// A run directory without its summary yet (`spec.toml` and `run.log` but no
    /// `summary.json`): still running, or killed before it finished.
    pub in_progress: bool,
}

/// The status shown for a run that has not recorded one: still running, or killed before it
/// finished (the browser cannot tell which).
pub const UNFINISHED_STATUS: &str = "running?";

impl RunEntry {
    /// The run's status for the table: its summary's, [`UNFINISHED_STATUS`] for a run
    /// directory with no status yet (no summary, or a summary without one), else "-".
    pub fn status_word(&self) -> &str {
        match &self.summary {
            Some(s) if !s.status.is_empty() => &s.status,
            Some(_) => UNFINISHED_STATUS,
            None if self.in_progress => UNFINISHED_STATUS,
            None => "-",
        }
    }
}

/// The browser: entries, selection and filter.
#[derive(Debug, Clone)]
pub struct RunsBrowser {
    /// The runs root (`runs/` by default).
    pub root: PathBuf,
    /// Entries, newest first.
    pub entries: Vec<RunEntry>,
    /// Selected row among the filtered entries.
    pub selected: usize,
    /// Case-insensitive substring the names must contain.
    pub filter: String,
    /// Why the root could not be listed (missing directory, permissions).
    pub problem: Option<String>,
}

impl RunsBrowser {
    /// A browser over `root`, listed once.
    pub fn new(root: PathBuf) -> Self {
        let mut b = RunsBrowser { root, entries: Vec::new(), selected: 0, filter: String::new(), problem: None };
        b.refresh();
        b
    }

    /// Re-list the root, keeping the selected directory selected when it still exists.
    pub fn refresh(&mut self) {
        let keep = self.selected_entry().map(|e| e.name.clone());
        match list_runs(&self.root) {
            Ok(entries) => {
                self.entries = entries;
                self.problem = None;
            }
            Err(e) => {
                self.entries.clear();
                self.problem = Some(match &e {
                    WorkbenchError::Io { message, .. } if !self.root.exists() => format!(
                        "no runs directory at {} yet ({message}); run a job (r in the composer) to create it",
                        self.root.display()
                    ),
                    other => other.to_string(),
                });
            }
        }
        let visible = self.visible();
        self.selected = keep.and_then(|k| visible.iter().position(|e| e.name == k)).unwrap_or(0);
    }

    /// Entries passing the filter, newest first.
    pub fn visible(&self) -> Vec<&RunEntry> {
        let f = self.filter.to_lowercase();
        self.entries.iter().filter(|e| f.is_empty() || e.name.to_lowercase().contains(&f)).collect()
    }

    /// The selected entry among the visible ones.
    pub fn selected_entry(&self) -> Option<&RunEntry> {
        self.visible().get(self.selected).copied()
    }

    /// Move the selection by `delta` rows, clamped.
    pub fn move_selection(&mut self, delta: isize) {
        let n = self.visible().len();
        if n == 0 {
            self.selected = 0;
            return;
        }
        self.selected = (self.selected as isize + delta).clamp(0, n as isize - 1) as usize;
    }

    /// Set the filter; the selected run stays selected while it passes (so clearing the
    /// filter keeps it), else the selection moves to the first match.
    pub fn set_filter(&mut self, filter: &str) {
        let keep = self.selected_entry().map(|e| e.name.clone());
        self.filter = filter.to_string();
        self.selected = keep.and_then(|k| self.visible().iter().position(|e| e.name == k)).unwrap_or(0);
    }
}

/// The run directories under `root`, newest first (names start with a timestamp).
pub fn list_runs(root: &Path) -> Result<Vec<RunEntry>, WorkbenchError> {
    let rd = std::fs::read_dir(root).map_err(|e| WorkbenchError::io(root, e))?;
    let mut out = Vec::new();
    for entry in rd.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let mut in_progress = false;
        let (summary, note) = if path.join("summary.json").exists() {
            match RunSummary::read(&path) {
                Ok(s) => (Some(s), None),
                Err(e) => (None, Some(e.to_string())),
            }
        } else if path.join("compare.csv").exists() {
            (None, Some("comparison tables only (compare.csv, compare.parquet); no trace to open".to_string()))
        } else if let (true, Ok(log)) = (path.join("spec.toml").is_file(), std::fs::read_to_string(path.join("run.log"))) {
            let last = log.lines().last().unwrap_or("(empty)").to_string();
            in_progress = true;
            (None, Some(format!("no summary.json: still running, or killed before it finished (e edits its spec); run.log ends: {last}")))
        } else {
            (None, Some("no summary.json: not a finished run directory".to_string()))
        };
        out.push(RunEntry { name, path, summary, note, in_progress });
    }
    out.sort_by(|a, b| b.name.cmp(&a.name));
    Ok(out)
}

/// Load a past run: its summary, its trace (from `trace.json` or `trace.json.gz`) and their
/// analysis.
pub fn open_run(dir: &Path) -> Result<LoadedRun, WorkbenchError> {
    let summary = RunSummary::read(dir)?;
    let backend = if summary.backend.is_empty() { "cpu".to_string() } else { summary.backend.clone() };
    let trace = chrome_import::read_trace(dir, &backend)?;
    let label = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
    let mut run = LoadedRun::new(label, Some(dir.to_path_buf()), summary, trace);
    // The model's sizes, for warning when two compared runs differ in them.
    run.model = moelab::spec::load_file(&dir.join("spec.toml")).ok().map(|s| s.model);
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_root_is_a_message_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = RunsBrowser::new(dir.path().join("nope"));
        assert!(b.entries.is_empty());
        let p = b.problem.expect("a problem is reported");
        assert!(p.contains("no runs directory"), "{p}");
    }

    #[test]
    fn runs_are_listed_newest_first_and_filtered() {
        let dir = tempfile::tempdir().expect("tempdir");
        for n in ["20260101-000000-a", "20260301-000000-b", "20260201-000000-c"] {
            std::fs::create_dir(dir.path().join(n)).expect("mkdir");
        }
        std::fs::write(dir.path().join("20260301-000000-b/summary.json"), r#"{"name":"b","status":"completed"}"#).expect("write");
        let mut b = RunsBrowser::new(dir.path().to_path_buf());
        let names: Vec<_> = b.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["20260301-000000-b", "20260201-000000-c", "20260101-000000-a"]);
        assert_eq!(b.entries[0].summary.as_ref().map(|s| s.status.as_str()), Some("completed"));
        assert!(b.entries[1].note.is_some());
        b.set_filter("-C");
        assert_eq!(b.visible().len(), 1);
        assert_eq!(b.selected_entry().map(|e| e.name.as_str()), Some("20260201-000000-c"));
    }

    #[test]
    fn opening_a_damaged_run_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("summary.json"), "{}").expect("write");
        std::fs::write(dir.path().join("trace.json"), "not json").expect("write");
        let e = open_run(dir.path()).expect_err("damaged");
        assert!(e.to_string().contains("trace.json"), "{e}");
    }

    #[test]
    fn runs_without_a_status_read_as_running() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mk = |n: &str, files: &[(&str, &str)]| {
            std::fs::create_dir(dir.path().join(n)).expect("mkdir");
            for (f, text) in files {
                std::fs::write(dir.path().join(n).join(f), text).expect("write");
            }
        };
        mk("20260101-a-live", &[("spec.toml", "name = \"a\""), ("run.log", "step 1/4")]);
        mk("20260102-b-nostatus", &[("summary.json", r#"{"name":"b"}"#)]);
        mk("20260103-c-done", &[("summary.json", r#"{"name":"c","status":"completed"}"#)]);
        mk("20260104-d-other", &[]);
        let b = RunsBrowser::new(dir.path().to_path_buf());
        let words: Vec<_> = b.entries.iter().map(|e| e.status_word()).collect();
        assert_eq!(words, ["-", "completed", UNFINISHED_STATUS, UNFINISHED_STATUS]);
    }
}
