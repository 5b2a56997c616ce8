//! Where evcxr builds cells. Each kernel takes the first free numbered slot under the cache
//! root (a file lock says "taken"), so the compiled moelab dependency stays in the slot's
//! target directory between sessions: only the first session of a slot (or `install`, which
//! warms slot 0) compiles moelab; later sessions load it in seconds.

use std::fs::File;
use std::path::{Path, PathBuf};

/// Slots tried before giving up (one per concurrently running kernel).
pub const MAX_SLOTS: usize = 16;

/// A locked evcxr work directory; the lock is released when this is dropped.
#[derive(Debug)]
pub struct Workdir {
    /// The directory evcxr uses as its crate directory (`EVCXR_TMPDIR`).
    pub crate_dir: PathBuf,
    /// The slot number.
    pub slot: usize,
    _lock: File,
}

/// The cache root: `$MOELAB_KERNEL_CACHE`, else `$XDG_CACHE_HOME/moelab-kernel`, else
/// `~/.cache/moelab-kernel`, else the system temp directory.
pub fn cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("MOELAB_KERNEL_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("moelab-kernel");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache").join("moelab-kernel"),
        None => std::env::temp_dir().join("moelab-kernel"),
    }
}

/// The Cargo workspace manifest above `dir`, if any: evcxr's generated crate cannot build
/// inside another workspace (cargo says it "believes it's in a workspace when it's not").
pub fn enclosing_workspace(dir: &Path) -> Option<PathBuf> {
    dir.ancestors().map(|a| a.join("Cargo.toml")).find(|m| std::fs::read_to_string(m).is_ok_and(|t| t.lines().any(|l| l.trim() == "[workspace]")))
}

/// Lock the first free slot under `root` (which must not lie inside a Cargo workspace).
pub fn acquire(root: &Path) -> std::io::Result<Workdir> {
    let abs = std::path::absolute(root)?;
    if let Some(ws) = enclosing_workspace(&abs) {
        return Err(std::io::Error::other(format!(
            "the kernel cache {} lies inside the Cargo workspace {}, where evcxr cannot build (fix: set MOELAB_KERNEL_CACHE to a directory outside it)",
            abs.display(), ws.display()
        )));
    }
    for slot in 0..MAX_SLOTS {
        let dir = root.join(format!("slot-{slot}"));
        std::fs::create_dir_all(&dir)?;
        let lock = File::options().create(true).truncate(false).write(true).open(dir.join("lock"))?;
        if lock.try_lock().is_ok() {
            let crate_dir = dir.join("crate");
            std::fs::create_dir_all(&crate_dir)?;
            return Ok(Workdir { crate_dir, slot, _lock: lock });
        }
    }
    Err(std::io::Error::other(format!("all {MAX_SLOTS} kernel work slots under {} are in use", root.display())))
}

/// The directory holding the toolchain's `libstd-*.so` (`rustc --print target-libdir`).
/// Cells are dylibs linked against it; cargo's relative rpath for them is computed from
/// `target/.../deps` but evcxr loads the copy one level up, which misses the toolchain when
/// the work directory shares a prefix with it (e.g. both under `$HOME`). The kernel puts this
/// directory on the evaluation process's library path instead.
pub fn rust_std_lib_dir() -> Option<PathBuf> {
    let out = std::process::Command::new("rustc").args(["--print", "target-libdir"]).output().ok()?;
    out.status.success().then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The Rust source directory of the moelab crate cells depend on: `$MOELAB_SOURCE_DIR`, else
/// the checkout this kernel was built from.
pub fn moelab_source() -> PathBuf {
    match std::env::var_os("MOELAB_SOURCE_DIR") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("kernel/ has a parent").to_path_buf(),
    }
}

/// The cell that loads moelab into every session.
pub fn prelude(source: &Path) -> String {
    format!(
        ":dep moelab = {{ path = {:?} }}\nuse moelab::notebook::{{DataFrame, Experiment, FrameDisplay, Runs}};\n",
        source.display().to_string()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_slot_is_skipped_and_freed_on_drop() {
        let root = tempfile::tempdir().unwrap();
        let a = acquire(root.path()).unwrap();
        let b = acquire(root.path()).unwrap();
        assert_eq!((a.slot, b.slot), (0, 1));
        drop(a);
        assert_eq!(acquire(root.path()).unwrap().slot, 0);
    }

    #[test]
    fn a_cache_inside_a_cargo_workspace_is_refused_with_the_fix() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("Cargo.toml"), "[workspace]\nmembers = []\n").unwrap();
        let e = acquire(&root.path().join("target/cache")).unwrap_err().to_string();
        assert!(e.contains("MOELAB_KERNEL_CACHE"), "{e}");
    }

    #[test]
    fn the_prelude_depends_on_the_source_tree_by_path() {
        let p = prelude(Path::new("/src/moelab"));
        assert!(p.starts_with(":dep moelab = { path = \"/src/moelab\" }"), "{p}");
    }
}
