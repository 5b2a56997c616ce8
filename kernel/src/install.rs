//! `moelab-kernel install`: write the kernelspec (`kernel.json` and a logo) where Jupyter
//! looks for kernels: the user's data directory, the current Python's `sys.prefix`, or a
//! given prefix.

use serde_json::json;
use std::path::{Path, PathBuf};

/// The kernelspec directory name (what `--kernel_name` / `kernel_name=` select).
pub const KERNEL_NAME: &str = "moelab-rust";

/// Where to install.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// `$JUPYTER_DATA_DIR`, else `~/.local/share/jupyter` (`~/Library/Jupyter` on macOS).
    User,
    /// `sys.prefix/share/jupyter` of the `python3` on PATH (a virtualenv or conda env).
    SysPrefix,
    /// `PREFIX/share/jupyter`.
    Prefix(PathBuf),
}

/// Why the kernelspec could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// No home directory to install into.
    #[error("cannot find the user's Jupyter data directory: neither JUPYTER_DATA_DIR nor HOME is set")]
    NoHome,
    /// `python3` could not tell its `sys.prefix`.
    #[error("cannot ask python3 for sys.prefix (needed by --sys-prefix): {0}")]
    Python(String),
    /// Writing failed.
    #[error("cannot write {path}: {message}")]
    Io {
        /// Path.
        path: String,
        /// OS error.
        message: String,
    },
}

/// The `share/jupyter` (data) directory for `target`.
pub fn data_dir(target: &Target) -> Result<PathBuf, InstallError> {
    match target {
        Target::User => {
            if let Some(d) = std::env::var_os("JUPYTER_DATA_DIR") {
                return Ok(PathBuf::from(d));
            }
            let home = PathBuf::from(std::env::var_os("HOME").ok_or(InstallError::NoHome)?);
            Ok(if cfg!(target_os = "macos") { home.join("Library/Jupyter") } else { home.join(".local/share/jupyter") })
        }
        Target::SysPrefix => {
            let out = std::process::Command::new("python3")
                .args(["-c", "import sys; print(sys.prefix)"])
                .output()
                .map_err(|e| InstallError::Python(e.to_string()))?;
            if !out.status.success() {
                return Err(InstallError::Python(String::from_utf8_lossy(&out.stderr).trim().to_string()));
            }
            Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("share/jupyter"))
        }
        Target::Prefix(p) => Ok(p.join("share/jupyter")),
    }
}

/// The kernel.json for a kernel binary at `exe`.
pub fn kernel_json(exe: &Path) -> serde_json::Value {
    json!({
        "argv": [exe.display().to_string(), "run", "--connection-file", "{connection_file}"],
        "display_name": "Rust (moelab)",
        "language": "rust",
        "interrupt_mode": "message",
        "metadata": { "debugger": false },
    })
}

/// A small SVG logo.
const LOGO_SVG: &str = r##"<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64" viewBox="0 0 64 64"><rect width="64" height="64" rx="10" fill="#1f3b5c"/><text x="32" y="41" font-family="sans-serif" font-size="22" font-weight="bold" fill="#ffb000" text-anchor="middle">MoE</text></svg>"##;

/// Write the kernelspec for `exe` under `target`; returns its directory.
pub fn install(target: &Target, exe: &Path) -> Result<PathBuf, InstallError> {
    let dir = data_dir(target)?.join("kernels").join(KERNEL_NAME);
    let io = |p: &Path, e: std::io::Error| InstallError::Io { path: p.display().to_string(), message: e.to_string() };
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    let spec = serde_json::to_string_pretty(&kernel_json(exe)).expect("JSON serializes");
    std::fs::write(dir.join("kernel.json"), spec).map_err(|e| io(&dir, e))?;
    std::fs::write(dir.join("logo-svg.svg"), LOGO_SVG).map_err(|e| io(&dir, e))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_under_a_prefix_writes_a_kernelspec_jupyter_reads() {
        let root = tempfile::tempdir().unwrap();
        let dir = install(&Target::Prefix(root.path().to_path_buf()), Path::new("/opt/bin/moelab-kernel")).unwrap();
        assert_eq!(dir, root.path().join("share/jupyter/kernels/moelab-rust"));
        let spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("kernel.json")).unwrap()).unwrap();
        assert_eq!(spec["argv"], json!(["/opt/bin/moelab-kernel", "run", "--connection-file", "{connection_file}"]));
        assert_eq!(spec["language"], "rust");
        assert_eq!(spec["interrupt_mode"], "message");
    }
}
