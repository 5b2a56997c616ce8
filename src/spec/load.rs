//! Parsing TOML into a resolved, validated [`ExperimentSpec`].

use super::validate::{resolve_and_validate, SpecError};
use super::ExperimentSpec;
use std::path::Path;

/// Parse, fill defaults and validate a spec from TOML text.
pub fn from_toml_str(text: &str) -> Result<ExperimentSpec, SpecError> {
    let spec: ExperimentSpec = toml::from_str(text).map_err(|e| SpecError::Parse {
        message: e.message().to_string(),
        location: e.span().map(|s| line_col(text, s.start)),
        file: None,
    })?;
    resolve_and_validate(spec)
}

/// Read a spec file; the error names the file.
pub fn load_file(path: &Path) -> Result<ExperimentSpec, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|e| SpecError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    from_toml_str(&text).map_err(|e| e.in_file(path))
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.len(), |p| before.len() - p - 1) + 1;
    (line, col)
}
