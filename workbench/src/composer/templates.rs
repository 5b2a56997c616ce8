//! A starting experiment per variant: the seed designs' sizes (small enough to run in
//! seconds on the cpu backend) with the layout and options each variant needs to validate.
//! Written as TOML and read through the library, so fields it adds get their defaults.

use moelab::spec::ExperimentSpec;
use toml::{Table, Value};

/// The template's TOML for `variant` (a TOML spelling such as `"mpmoe"`).
pub fn template_toml(variant: &str) -> String {
    let top_k = if variant == "scmoe" { 1 } else { 2 };
    let layout = match variant {
        "ppmoe" => "ep = 1\ntp = 4",
        "ted" => "ep = 2\ntp = 2",
        _ => "ep = 4",
    };
    let options = match variant {
        "mpmoe" => "\n[mpmoe]\nchunks = 4\nreuse = \"none\"\n",
        "tutel" => "\n[tutel]\ndegree = 2\na2a = \"flat\"\n",
        "ted" => "\n[ted]\nduplicate_dropping = true\n",
        "ppmoe" => "\n[ppmoe]\nschedule = \"1f1b\"\n",
        _ => "",
    };
    format!(
        "name = \"new-{variant}\"\ndescription = \"{variant} experiment started from the workbench template\"\nvariant = \"{variant}\"\n\n\
         [model]\nd_model = 64\nd_ffn = 128\nn_experts = 8\ntop_k = {top_k}\ncapacity_factor = 1.25\nn_layers = 2\nbatch = 4\nseq_len = 64\n\n\
         [model.backbone]\nn_heads = 4\nd_mlp = 128\n\n[layout]\n{layout}\n\n[run]\nbackend = \"cpu\"\nsteps = 3\nwarmup = 1\nseed = 0\n{options}"
    )
}

/// The template of `variant` as a draft table (every field the library knows, defaults
/// included); `None` when the library does not parse it (an unknown variant).
pub fn template(variant: &str) -> Option<Table> {
    let spec: ExperimentSpec = toml::from_str(&template_toml(variant)).ok()?;
    Value::try_from(&spec).ok()?.as_table().cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use moelab::spec::Variant;

    #[test]
    fn every_template_validates_and_plans() {
        for v in Variant::ALL {
            let t = template(v.as_str()).unwrap_or_else(|| panic!("{} parses", v.as_str()));
            let text = toml::to_string(&t).expect("serializes");
            let resolved = moelab::spec::from_toml_str(&text).unwrap_or_else(|e| panic!("{}: {e}", v.as_str()));
            moelab::plan::Plan::build(&resolved).unwrap_or_else(|e| panic!("{}: {e}", v.as_str()));
        }
    }
}
