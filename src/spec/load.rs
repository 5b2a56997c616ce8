//! Parsing TOML into a resolved, validated [`ExperimentSpec`].

use super::validate::{resolve_and_validate, SpecError};
use super::ExperimentSpec;
use std::path::Path;

/// Parse, fill defaults and validate a spec from TOML text.
pub fn from_toml_str(text: &str) -> Result<ExperimentSpec, SpecError> {
    let spec: ExperimentSpec = toml::from_str(text).map_err(|e| SpecError::Parse {
        message: match e.span().and_then(|s| field_at(text, s.start)) {
            Some(field) if !e.message().contains('`') || e.message().starts_with("invalid") || e.message().starts_with("unknown variant") => {
                format!("{field}: {}", e.message())
            }
            _ => e.message().to_string(),
        },
        location: e.span().map(|s| line_col(text, s.start)),
        file: None,
    })?;
    resolve_and_validate(spec)
}

/// Read a spec file; the error names the file.
pub fn load_file(path: &Path) -> Result<ExperimentSpec, SpecError> {
    load_file_with(path, &[])
}

/// Read a spec file with command-line overrides applied before parsing (see
/// [`super::overrides`]); the error names the file.
pub fn load_file_with(path: &Path, overrides: &[super::overrides::Override]) -> Result<ExperimentSpec, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|e| SpecError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let text = super::overrides::apply(&text, overrides).map_err(|e| e.in_file(path))?;
    from_toml_str(&text).map_err(|e| blame_overrides(e, overrides).in_file(path))
}

/// A parse error of a text that `overrides` rewrote, reworded to name the overridden keys:
/// its line numbers would point into the rewritten text, not the file.
pub fn blame_overrides(e: SpecError, overrides: &[super::overrides::Override]) -> SpecError {
    match e {
        SpecError::Parse { message, location: Some(_), file } if !overrides.is_empty() => {
            let keys: Vec<String> = overrides.iter().map(|o| o.key.join(".")).collect();
            SpecError::Parse { message: format!("{message} (with --set {})", keys.join(", ")), location: None, file }
        }
        e => e,
    }
}

/// The dotted key (`model.d_model`) whose value sits at `offset`, when the line is a
/// `key = value` line: type errors then name the field, not only the line.
fn field_at(text: &str, offset: usize) -> Option<String> {
    let before = &text[..offset.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |p| p + 1);
    let line = text[line_start..].lines().next()?;
    let key = line.split_once('=')?.0.trim();
    if key.is_empty() || key.starts_with('#') || key.starts_with('[') {
        return None;
    }
    let table = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_string(),
    })
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.len(), |p| before.len() - p - 1) + 1;
    (line, col)
}
