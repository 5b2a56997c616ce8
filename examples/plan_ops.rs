//! Prints rank 0's ops of an experiment with their buffers (name, elements, bytes per element),
//! for reading a plan op by op:
//!
//!     cargo run --release --example plan_ops -- experiments/mixtral-ish/topk-1gpu-bf16.toml [filter]

use moelab::plan::Plan;

fn main() -> anyhow::Result<()> {
    let path = std::env::args().nth(1).unwrap_or_else(|| "experiments/quickstart.toml".into());
    let filter = std::env::args().nth(2).unwrap_or_default();
    let overrides = [moelab::spec::overrides::Override::parse("run.backend=sim")?];
    let spec = moelab::spec::load_file_with(std::path::Path::new(&path), &overrides)?;
    let plan = Plan::build(&spec)?;
    let rank = &plan.ranks[0];
    for op in rank.ops.iter().filter(|o| o.name.contains(&filter)) {
        let bufs = |ids: &[moelab::plan::BufId]| {
            ids.iter().map(|b| { let d = rank.buffer(*b); format!("{}[{}x{}B{}]", d.name, d.elems, d.elem_bytes, if d.dynamic { ",dyn" } else { "" }) }).collect::<Vec<_>>().join(" ")
        };
        println!("{} ({:?}) reads {} writes {}", op.name, op.stage, bufs(&op.reads), bufs(&op.writes));
    }
    Ok(())
}
