//! Command-line overrides of an experiment file: `--set run.backend=cuda --set
//! model.dtype=bf16` edits the TOML before it is parsed, so an override is checked (unknown
//! field, wrong type, inconsistent layout) exactly like the file itself, and the run directory
//! keeps the spec as it ran. An empty value (`--set run.profile=`) removes the key, e.g. to
//! run a sim experiment on another backend.

use super::validate::SpecError;

/// One `KEY=VALUE` override: a dotted key into the TOML tables and a TOML value (a bare word
/// that is not valid TOML is taken as a string, so `run.backend=cuda` needs no quotes).
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// Dotted key, e.g. `model.dtype`.
    pub key: Vec<String>,
    /// The value; `None` removes the key.
    pub value: Option<toml::Value>,
}

impl Override {
    /// Parses `KEY=VALUE`.
    pub fn parse(text: &str) -> Result<Override, SpecError> {
        let bad = |why: &str| SpecError::Parse { message: format!("--set {text}: {why}"), location: None, file: None };
        let (key, value) = text.split_once('=').ok_or_else(|| bad("expected KEY=VALUE, e.g. --set run.backend=cuda"))?;
        let key: Vec<String> = key.trim().split('.').map(|k| k.trim().to_string()).collect();
        if key.iter().any(String::is_empty) {
            return Err(bad("the key has an empty part (write e.g. model.d_model)"));
        }
        let value = value.trim();
        if value.is_empty() {
            return Ok(Override { key, value: None });
        }
        let parsed = toml::from_str::<toml::Table>(&format!("v = {value}")).ok().and_then(|mut t| t.remove("v"));
        Ok(Override { key, value: Some(parsed.unwrap_or_else(|| toml::Value::String(value.to_string()))) })
    }
}

/// `text` (a TOML experiment) with every override applied in order, as TOML text.
pub fn apply(text: &str, overrides: &[Override]) -> Result<String, SpecError> {
    if overrides.is_empty() {
        return Ok(text.to_string());
    }
    let mut doc: toml::Table = toml::from_str(text).map_err(|e| SpecError::Parse { message: e.message().to_string(), location: None, file: None })?;
    for o in overrides {
        let (last, tables) = o.key.split_last().expect("parse refuses empty keys");
        let mut t = &mut doc;
        for (i, part) in tables.iter().enumerate() {
            let entry = t.entry(part.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            t = entry.as_table_mut().ok_or_else(|| SpecError::Parse {
                message: format!("--set {}: {} is a value, not a table", o.key.join("."), tables[..=i].join(".")),
                location: None,
                file: None,
            })?;
        }
        match &o.value {
            Some(v) => {
                t.insert(last.clone(), v.clone());
            }
            None => {
                t.remove(last);
            }
        }
    }
    toml::to_string(&doc).map_err(|e| SpecError::Parse { message: format!("applying --set: {e}"), location: None, file: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_as_toml_or_fall_back_to_strings() {
        let o = Override::parse("model.d_model=128").unwrap();
        assert_eq!(o.key, ["model", "d_model"]);
        assert_eq!(o.value, Some(toml::Value::Integer(128)));
        assert_eq!(Override::parse("run.backend=cuda").unwrap().value, Some(toml::Value::String("cuda".into())));
        assert_eq!(Override::parse("model.capacity_factor=-1.5").unwrap().value, Some(toml::Value::Float(-1.5)));
        assert_eq!(Override::parse("run.profile=").unwrap().value, None);
        assert!(Override::parse("model.d_model").is_err());
        assert!(Override::parse("model..x=1").is_err());
    }

    #[test]
    fn overrides_replace_and_create_keys() {
        let text = "name = \"a\"\n[model]\nd_model = 64\n";
        let out = apply(text, &[Override::parse("model.d_model=32").unwrap(), Override::parse("layout.ep=2").unwrap()]).unwrap();
        let doc: toml::Table = toml::from_str(&out).unwrap();
        assert_eq!(doc["model"]["d_model"].as_integer(), Some(32));
        assert_eq!(doc["layout"]["ep"].as_integer(), Some(2));
        let out = apply(&out, &[Override::parse("model.d_model=").unwrap()]).unwrap();
        assert!(!toml::from_str::<toml::Table>(&out).unwrap()["model"].as_table().unwrap().contains_key("d_model"));
        let err = apply(text, &[Override::parse("name.x=1").unwrap()]).unwrap_err().to_string();
        assert!(err.contains("name is a value, not a table"), "{err}");
    }
}
