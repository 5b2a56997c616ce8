//! The run log: timestamped lines appended and flushed one by one, so a crash keeps them.

use std::fs::File;
use std::io::Write;
use std::path::Path;

/// An append-only, line-flushed log file.
pub struct RunLog {
    file: File,
}

impl RunLog {
    /// Create (truncate) the log at `path`.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        Ok(RunLog { file: File::create(path)? })
    }
    /// Append one timestamped line; write errors are ignored (the run matters more).
    pub fn line(&mut self, text: &str) {
        let now = chrono::Local::now().format("%Y-%m-%d %H:%M:%S%.3f");
        let _ = writeln!(self.file, "{now} {text}");
        let _ = self.file.flush();
    }
}
