//! How long the sim backend takes on an experiment, phase by phase: load and validate the
//! spec, build the plan (every rank), then check symmetry and simulate one step. Prints the
//! predicted step time too. The 2,048-GPU benchmark of issue 7:
//!
//!     cargo run --example sim_scale -- experiments/sim-2048.toml
//!
//! (Speed is measured here, not asserted in tests: test machines vary.)

use anyhow::Context;
use moelab::backend::sim::{self, Symmetry};
use moelab::plan::Plan;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).unwrap_or_else(|| "experiments/sim-2048.toml".into());
    let symmetry = if std::env::args().any(|a| a == "--full") { Symmetry::Ignore } else { Symmetry::Exploit };
    let t0 = Instant::now();
    let spec = moelab::spec::load_file(std::path::Path::new(&path))?;
    let t_spec = t0.elapsed().as_secs_f64();
    let plan = Plan::build(&spec)?;
    let t_plan = t0.elapsed().as_secs_f64() - t_spec;
    let profile = sim::spec_profile(&spec).context("profile")?;
    let t1 = Instant::now();
    let out = sim::simulate_plan(&plan, &profile, symmetry)?;
    let t_sim = t1.elapsed().as_secs_f64();
    println!(
        "{}: world {}, {} layers, {} ops in the plan; profile {} ({} GPUs/node x {} nodes)",
        spec.name, plan.world(), spec.model.n_layers, plan.op_count(), profile.name, profile.topology.gpus_per_node, profile.topology.nodes
    );
    println!(
        "simulated {} rank(s){}; predicted step {:.3} ms",
        out.simulated.len(), if out.symmetric { " (symmetric plan: rank 0 stands for all)" } else { "" }, out.timeline.makespan * 1e3
    );
    println!("time: spec {t_spec:.3} s, plan build {t_plan:.3} s, symmetry check + simulation {t_sim:.3} s, total {:.3} s", t0.elapsed().as_secs_f64());
    Ok(())
}
