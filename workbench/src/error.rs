//! The workbench library's one error type: what could not be read or understood, naming the
//! file, so a front end can show it and keep running.

use std::path::Path;

/// Why a file the workbench needs could not be used.
#[derive(Debug, thiserror::Error)]
pub enum WorkbenchError {
    /// A file or directory could not be read or written.
    #[error("cannot access {path}: {message}")]
    Io {
        /// The path involved.
        path: String,
        /// What the OS said.
        message: String,
    },
    /// A run directory's file is not in the format moelab writes.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// An experiment file is malformed (its TOML does not parse into a spec).
    #[error(transparent)]
    Spec(#[from] moelab::spec::SpecError),
}

impl WorkbenchError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, e: std::io::Error) -> Self {
        WorkbenchError::Io { path: path.display().to_string(), message: e.to_string() }
    }
    /// A format error in `path`.
    pub fn format(path: &Path, message: impl Into<String>) -> Self {
        WorkbenchError::Format { path: path.display().to_string(), message: message.into() }
    }
}
