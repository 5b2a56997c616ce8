//! Buffer dumps: a rank's buffers written at the end of a run for `moelab crosscheck
//! --buffers`, as one file of little-endian 4-byte values (`buffers-rank<r>.bin`: f32 values,
//! bf16 storage widened to f32, or i32 indices) and a JSON index of where each buffer lies in
//! it (`buffers-rank<r>.json`). The cuda worker writes them when [`DUMP_BUFFERS_ENV`] is set
//! in its environment (the launcher sets it for the workers it starts when
//! `ExecOptions::dump_buffers` asks); the cross-check reads them back.

use super::cpu::store::Data;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Environment variable that makes each cuda worker keep every non-persistent buffer of the
/// run past its last use and dump it (with `MOELAB_DUMP_PARAMS`, into the run directory).
/// Every activation stays in device memory to the end: for small experiments only.
pub const DUMP_BUFFERS_ENV: &str = "MOELAB_DUMP_BUFFERS";

/// Where one buffer lies in a dump's value file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpEntry {
    /// Buffer name.
    pub name: String,
    /// i32 values (otherwise f32).
    pub int: bool,
    /// First element, counted in 4-byte values from the start of the file.
    pub offset: usize,
    /// Elements.
    pub len: usize,
}

/// A dump that could not be written or read back.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// A file could not be written or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The index is not valid JSON of [`DumpEntry`]s.
    #[error("{path}: {source}")]
    Index {
        /// The index file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// An index entry points past the end of the value file.
    #[error("{path}: buffer {name} ends at value {end}, the file holds {held}")]
    Truncated {
        /// The value file.
        path: PathBuf,
        /// Buffer name.
        name: String,
        /// Where the buffer should end, in values.
        end: usize,
        /// Values in the file.
        held: usize,
    },
}

/// The value file and index file of `rank`'s dump in `dir`.
pub fn paths(dir: &Path, rank: usize) -> (PathBuf, PathBuf) {
    (dir.join(format!("buffers-rank{rank}.bin")), dir.join(format!("buffers-rank{rank}.json")))
}

/// Writes `rank`'s buffers (name, contents) into `dir`.
pub fn write(dir: &Path, rank: usize, buffers: &[(String, Data)]) -> Result<(), DumpError> {
    let (bin, idx) = paths(dir, rank);
    let mut bytes = Vec::with_capacity(buffers.iter().map(|b| b.1.len() * 4).sum());
    let mut index = Vec::with_capacity(buffers.len());
    for (name, data) in buffers {
        index.push(DumpEntry { name: name.clone(), int: matches!(data, Data::I32(_)), offset: bytes.len() / 4, len: data.len() });
        match data {
            Data::F32(v) => v.iter().for_each(|x| bytes.extend_from_slice(&x.to_le_bytes())),
            Data::I32(v) => v.iter().for_each(|x| bytes.extend_from_slice(&x.to_le_bytes())),
        }
    }
    std::fs::write(&bin, bytes).map_err(|source| DumpError::Io { path: bin, source })?;
    let text = serde_json::to_string(&index).map_err(|source| DumpError::Index { path: idx.clone(), source })?;
    std::fs::write(&idx, text).map_err(|source| DumpError::Io { path: idx, source })
}

/// Reads `rank`'s dump from `dir`: (name, contents) in the order written.
pub fn read(dir: &Path, rank: usize) -> Result<Vec<(String, Data)>, DumpError> {
    let (bin, idx) = paths(dir, rank);
    let text = std::fs::read_to_string(&idx).map_err(|source| DumpError::Io { path: idx.clone(), source })?;
    let index: Vec<DumpEntry> = serde_json::from_str(&text).map_err(|source| DumpError::Index { path: idx, source })?;
    let bytes = std::fs::read(&bin).map_err(|source| DumpError::Io { path: bin.clone(), source })?;
    let held = bytes.len() / 4;
    let mut out = Vec::with_capacity(index.len());
    for e in index {
        let end = e.offset + e.len;
        if end > held {
            return Err(DumpError::Truncated { path: bin, name: e.name, end, held });
        }
        let words = bytes[e.offset * 4..end * 4].chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]);
        let data = if e.int { Data::I32(words.map(i32::from_le_bytes).collect()) } else { Data::F32(words.map(f32::from_le_bytes).collect()) };
        out.push((e.name, data));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_reads_back_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let bufs = vec![
            ("a".to_string(), Data::F32(vec![1.5, -0.0, f32::NAN, 3e-20])),
            ("idx".to_string(), Data::I32(vec![-1, 7, i32::MAX])),
            ("empty".to_string(), Data::F32(Vec::new())),
        ];
        write(dir.path(), 3, &bufs).unwrap();
        let back = read(dir.path(), 3).unwrap();
        assert_eq!(back.len(), 3);
        for ((n0, d0), (n1, d1)) in bufs.iter().zip(&back) {
            assert_eq!(n0, n1);
            match (d0, d1) {
                (Data::F32(a), Data::F32(b)) => assert_eq!(a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()),
                (Data::I32(a), Data::I32(b)) => assert_eq!(a, b),
                _ => panic!("{n0}: element type changed"),
            }
        }
    }

    #[test]
    fn a_truncated_dump_is_an_error_naming_the_buffer() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 0, &[("x".to_string(), Data::F32(vec![1.0; 8]))]).unwrap();
        let (bin, _) = paths(dir.path(), 0);
        std::fs::write(&bin, [0u8; 12]).unwrap();
        let e = read(dir.path(), 0).unwrap_err();
        assert!(matches!(&e, DumpError::Truncated { name, end: 8, held: 3, .. } if name == "x"), "{e}");
    }
}
