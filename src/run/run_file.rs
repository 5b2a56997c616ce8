//! Files of a run directory read back, plain or gzip-compressed. The run directories kept in
//! the repository (`docs/device-runs/`) store their traces and worker records as
//! `trace.json.gz` and `rank-<r>.json.gz`, which hold a repository of hundreds of measured
//! runs to a size the device machines accept; every reader goes through here, so a
//! compressed run reads like a fresh one.

use std::io::Read;
use std::path::{Path, PathBuf};

/// The text of `name` in run directory `dir`, or of `name.gz` decompressed when only that
/// exists, with the path read (for error messages).
pub fn read_run_file(dir: &Path, name: &str) -> std::io::Result<(String, PathBuf)> {
    let plain = dir.join(name);
    let packed = dir.join(format!("{name}.gz"));
    if plain.exists() || !packed.exists() {
        return std::fs::read_to_string(&plain).map(|t| (t, plain));
    }
    let mut text = String::new();
    flate2::read::MultiGzDecoder::new(std::fs::File::open(&packed)?).read_to_string(&mut text)?;
    Ok((text, packed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_compressed_file_reads_like_the_plain_one_and_the_plain_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        let mut gz = flate2::write::GzEncoder::new(std::fs::File::create(dir.path().join("trace.json.gz")).unwrap(), flate2::Compression::default());
        gz.write_all(b"{\"packed\": 1}").unwrap();
        gz.finish().unwrap();
        let (text, path) = read_run_file(dir.path(), "trace.json").unwrap();
        assert_eq!(text, "{\"packed\": 1}");
        assert!(path.ends_with("trace.json.gz"));
        std::fs::write(dir.path().join("trace.json"), "{\"plain\": 1}").unwrap();
        assert_eq!(read_run_file(dir.path(), "trace.json").unwrap().0, "{\"plain\": 1}");
        // Neither: the plain name's error.
        let e = read_run_file(dir.path(), "rank-0.json").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
        // A damaged archive is an error, not an empty text.
        std::fs::write(dir.path().join("rank-1.json.gz"), "not gzip").unwrap();
        assert!(read_run_file(dir.path(), "rank-1.json").is_err());
    }
}
