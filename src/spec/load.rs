//! Parsing TOML into a resolved, validated [`ExperimentSpec`].

use super::validate::{resolve_and_validate, SpecError};
use super::ExperimentSpec;
use std::path::Path;

/// Parse, fill defaults and validate a spec from TOML text.
pub fn from_toml_str(text: &str) -> Result<ExperimentSpec, SpecError> {
    check_top_level_keys(text)?;
    let spec: ExperimentSpec = toml::from_str(text).map_err(|e| SpecError::Parse {
        message: match e.span().and_then(|s| field_at(text, s.start)) {
            Some(field) if !e.message().contains('`') || e.message().starts_with("invalid") || e.message().starts_with("unknown variant") => {
                // serde names the Rust type; say what to write instead.
                let want = if e.message().contains("expected usize") || e.message().contains("expected u64") || e.message().contains("expected u32") {
                    " (fix: a whole number, 0 or more)"
                } else {
                    ""
                };
                format!("{field}: {}{want}", e.message())
            }
            _ => with_field_hint(e.message()),
        },
        location: e.span().map(|s| line_col(text, s.start)),
        file: None,
    })?;
    resolve_and_validate(spec)
}

/// A misspelled table (`[modle]`) is named before serde reads the spec: serde would first
/// miss the fields of the table it meant (`missing field d_model`, pointing elsewhere).
fn check_top_level_keys(text: &str) -> Result<(), SpecError> {
    // Text that is not TOML gets serde's own error below.
    let Ok(table) = toml::from_str::<toml::Table>(text) else { return Ok(()) };
    let known = ExperimentSpec::TOP_LEVEL_KEYS;
    match table.keys().find(|k| !known.contains(&k.as_str())) {
        None => Ok(()),
        Some(key) => {
            // A swap or one wrong letter (a quarter of a long name): `modle`, `layuot`; not
            // `seed` for `ted`.
            let near = |k: &str| strsim::damerau_levenshtein(k, key);
            let closest = known.iter().copied().min_by_key(|k| near(k)).filter(|k| near(k) <= 1.max(key.len() / 4));
            let hint = closest.map(|c| format!(" (did you mean `{c}`?)")).unwrap_or_default();
            let expected: Vec<String> = known.iter().map(|k| format!("`{k}`")).collect();
            Err(SpecError::Parse {
                message: format!("unknown field `{key}`{hint}, expected one of {}", expected.join(", ")),
                location: key_offset(text, key).map(|o| line_col(text, o)),
                file: None,
            })
        }
    }
}

/// serde's "unknown field" and "missing field" messages with a hint: the field meant (one
/// letter off or two swapped: `top_kk` -> `top_k`), the table a field belongs in (`n_heads`
/// in `[model]` -> `[model.backbone]`), or where every field is shown.
fn with_field_hint(message: &str) -> String {
    let quoted = |m: &str| m.split('`').nth(1).map(str::to_string);
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let Some(key) = quoted(message) else { return message.to_string() };
        let expected: Vec<&str> = rest.split('`').skip(2).step_by(2).collect();
        let near = |k: &str| strsim::damerau_levenshtein(k, &key);
        // A field of other tables first (an exact name beats a near one), then a near name.
        let homes: Vec<String> = table_fields().iter().filter(|(_, fields)| fields.contains(&key)).map(|(t, _)| format!("[{t}]")).collect();
        let hint = if !homes.is_empty() && !expected.contains(&key.as_str()) {
            format!(" (`{key}` belongs in {})", homes.join(" or "))
        } else {
            match expected.iter().copied().min_by_key(|k| near(k)).filter(|k| near(k) <= 1.max(key.len() / 4)) {
                Some(c) => format!(" (did you mean `{c}`?)"),
                None => String::new(),
            }
        };
        let head = format!("unknown field `{key}`");
        return format!("{head}{hint}{}", &message[head.len()..]);
    }
    if message.starts_with("missing field `") {
        return format!("{message} (add it to the table; experiments/quickstart.toml and src/spec/mod.rs show every field)");
    }
    message.to_string()
}

/// Every spec table and its fields, as serde lists them (read once from the types).
fn table_fields() -> &'static [(&'static str, Vec<String>)] {
    static FIELDS: std::sync::OnceLock<Vec<(&'static str, Vec<String>)>> = std::sync::OnceLock::new();
    FIELDS.get_or_init(|| {
        // A field no table has: serde's error names the table's fields.
        fn fields<T: serde::de::DeserializeOwned>() -> Vec<String> {
            match toml::from_str::<T>("zz_no_such_field = 0") {
                Err(e) => e.message().split('`').skip(3).step_by(2).map(str::to_string).collect(),
                Ok(_) => Vec::new(),
            }
        }
        use super::*;
        vec![
            ("model", fields::<ModelSpec>()),
            ("model.backbone", fields::<BackboneSpec>()),
            ("layout", fields::<LayoutSpec>()),
            ("run", fields::<RunSpec>()),
            ("mpmoe", fields::<MpmoeSpec>()),
            ("tutel", fields::<TutelSpec>()),
            ("ted", fields::<TedSpec>()),
            ("ppmoe", fields::<PpmoeSpec>()),
        ]
    })
}

/// Where the top-level `key` is written: its table header (`[key]`, `[key.sub]`) or its
/// `key = value` line outside any table.
fn key_offset(text: &str, key: &str) -> Option<usize> {
    let mut offset = 0;
    let mut in_table = false;
    for line in text.split_inclusive('\n') {
        let t = line.trim_start();
        let at = offset + (line.len() - t.len());
        if let Some(h) = t.strip_prefix('[') {
            let name = h.trim_start_matches('[').split([']', '.']).next().unwrap_or("").trim().trim_matches('"');
            if name == key {
                return Some(at);
            }
            in_table = true;
        } else if !in_table && t.split(['=', '.']).next().is_some_and(|k| k.trim().trim_matches('"') == key) {
            return Some(at);
        }
        offset += line.len();
    }
    None
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
