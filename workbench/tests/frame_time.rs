//! Frame-time bench: a real cpu run of 8 ranks x 4 MoE blocks with MPMoE chunking (thousands
//! of ops), drawn at 160x48 while zooming, panning and stepping through ops as a user would.
//! Prints the frame times (`cargo test -p moelab-workbench --test frame_time -- --nocapture`);
//! it asserts only that the run is as large as it claims, not how fast the frames are.

mod common;

use common::render;
use moelab_workbench::app::Pane;
use moelab_workbench::event::{Event, Key};
use moelab_workbench::loaded::LoadedRun;
use std::time::{Duration, Instant};

const SPEC: &str = r#"
name = "frame-bench"
variant = "mpmoe"
[model]
d_model = 32
d_ffn = 64
n_experts = 8
top_k = 2
n_layers = 4
batch = 2
seq_len = 32
[model.backbone]
n_heads = 2
d_mlp = 64
[layout]
ep = 8
[run]
backend = "cpu"
steps = 1
warmup = 0
[mpmoe]
chunks = 4
"#;

#[test]
fn frame_time_for_8_ranks_4_blocks_chunked() {
    let spec = moelab::spec::from_toml_str(SPEC).expect("bench spec");
    let dir = tempfile::tempdir().expect("tempdir");
    let outcome = moelab::run::run(&spec, dir.path(), &moelab::run::RunHooks::default()).expect("bench run");
    let run = LoadedRun::from_outcome(&spec, outcome);
    let ops = run.trace.ops.len();
    assert!(ops >= 1000, "the bench needs thousands of ops, got {ops}");
    assert_eq!(run.trace.world, 8);

    let mut app = common::app();
    app.show_run(run);
    app.pane = Pane::Timeline;
    let mut script: Vec<Key> = Vec::new();
    script.extend([Key::Char('+'); 6]);
    script.extend([Key::Char('L'); 10]);
    script.extend([Key::Right; 20]);
    script.extend([Key::Down; 12]);
    script.extend([Key::Char('n'); 10]);
    script.extend([Key::Char('-'); 6]);
    script.extend([Key::Char('H'); 10]);
    let mut times: Vec<Duration> = Vec::new();
    let mut term = render(&app, 160, 48);
    for k in script {
        app.update(Event::Key(k));
        let t0 = Instant::now();
        term.draw(|f| moelab_workbench::ui::draw(f, &app)).expect("draw");
        times.push(t0.elapsed());
    }
    app.pane = Pane::Breakdown;
    let t0 = Instant::now();
    term.draw(|f| moelab_workbench::ui::draw(f, &app)).expect("draw");
    let breakdown = t0.elapsed();
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mean = times.iter().map(|d| ms(*d)).sum::<f64>() / times.len() as f64;
    println!(
        "frame time, timeline at 160x48, {ops} ops (8 ranks x 4 MoE blocks, 4 chunks), {} frames: mean {mean:.3} ms, median {:.3} ms, p95 {:.3} ms, max {:.3} ms; breakdown frame {:.3} ms (budget for no visible lag: 16 ms)",
        times.len(),
        ms(times[times.len() / 2]),
        ms(times[times.len() * 95 / 100]),
        ms(times[times.len() - 1]),
        ms(breakdown)
    );
}
