//! Chrome trace (Trace Event Format) export, so a run can be inspected in Perfetto or
//! chrome://tracing: one process per rank, one thread per stream, memory as counters.

use super::{MemEvent, Trace};
use crate::analysis::memory::replay_series;
use crate::taxonomy::{stage_label, MemCategory, Pass, Stream};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Nanoseconds to the format's microseconds.
fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// snake_case name of a pass.
fn pass_str(p: Pass) -> &'static str {
    match p {
        Pass::Forward => "forward",
        Pass::Backward => "backward",
        Pass::Update => "update",
    }
}

/// The thread of each rank's step spans (compute and comm are 0 and 1).
pub const STEPS_TID: u32 = 2;

/// Builds the Chrome trace JSON: `{"traceEvents": [...], "displayTimeUnit": "ms", "otherData":
/// {"group_sizes": [...]}}` with process/thread metadata, one complete (`X`) event per op
/// (a collective's group and position in `args`), one per rank and measured step on the
/// rank's `steps` thread ([`STEPS_TID`], category `step`) and `memory` counter events.
pub fn to_chrome_json(trace: &Trace) -> Value {
    let mut ranks: BTreeSet<u32> = (0..trace.world).collect();
    ranks.extend(trace.ops.iter().map(|o| o.rank));
    ranks.extend(trace.memory.iter().map(|m| m.rank));
    ranks.extend(trace.steps.iter().map(|s| s.rank));

    let mut events: Vec<Value> =
        Vec::with_capacity(ranks.len() * 3 + trace.ops.len() + trace.memory.len());
    for &rank in &ranks {
        events.push(json!({
            "ph": "M", "name": "process_name", "pid": rank, "tid": 0,
            "args": {"name": format!("rank {rank}")},
        }));
        for stream in [Stream::Compute, Stream::Comm] {
            events.push(json!({
                "ph": "M", "name": "thread_name", "pid": rank, "tid": stream.index(),
                "args": {"name": stream.as_str()},
            }));
        }
        events.push(json!({"ph": "M", "name": "thread_name", "pid": rank, "tid": STEPS_TID, "args": {"name": "steps"}}));
    }

    // Each measured step of each rank as one bar on the rank's "steps" thread.
    for s in &trace.steps {
        events.push(json!({
            "ph": "X", "name": format!("step {}", s.step), "cat": "step", "pid": s.rank, "tid": STEPS_TID,
            "ts": us(s.start_ns), "dur": us(s.end_ns.saturating_sub(s.start_ns)), "args": {"step": s.step},
        }));
    }

    let mut ops: Vec<_> = trace.ops.iter().collect();
    ops.sort_by_key(|o| (o.rank, o.stream.index(), o.start_ns));
    for op in ops {
        let mut ev = json!({
            "ph": "X",
            "name": op.name,
            "cat": stage_label(op.stage, op.pass),
            "pid": op.rank,
            "tid": op.stream.index(),
            "ts": us(op.start_ns),
            "dur": us(op.dur_ns()),
            "args": {
                "stage": op.stage.as_str(),
                "pass": pass_str(op.pass),
                "layer": op.layer,
                "chunk": op.chunk,
                "step": op.step,
                "flops": op.flops,
                "bytes": op.bytes,
            },
        });
        if let Some(c) = op.collective {
            ev["args"]["group"] = json!(c.group);
            ev["args"]["seq"] = json!(c.seq);
        }
        if let Some(h) = op.host_ns {
            ev["args"]["host_us"] = json!(us(h));
        }
        if let Some(h) = op.issue_ns {
            ev["args"]["issue_us"] = json!(us(h));
        }
        if let Some(n) = op.gemm_calls {
            ev["args"]["gemm_calls"] = json!(n);
        }
        events.push(ev);
    }

    let mut mem_by_rank: BTreeMap<u32, Vec<&MemEvent>> = BTreeMap::new();
    for m in &trace.memory {
        mem_by_rank.entry(m.rank).or_default().push(m);
    }
    for (rank, evs) in mem_by_rank {
        for (t_ns, bytes) in replay_series(&evs) {
            let mut args = Map::new();
            for c in MemCategory::ALL {
                args.insert(c.as_str().to_string(), json!(bytes[c.index()]));
            }
            events.push(json!({
                "ph": "C", "name": "memory", "pid": rank, "tid": 0,
                "ts": us(t_ns), "args": Value::Object(args),
            }));
        }
    }

    // moelab's own facts a viewer ignores: what lines up collectives on read-back.
    json!({"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"group_sizes": trace.group_sizes}})
}

/// Writes [`to_chrome_json`] of `trace` to `path`, for opening in Perfetto.
pub fn write_chrome_trace(trace: &Trace, path: &Path) -> std::io::Result<()> {
    let mut w = BufWriter::new(File::create(path)?);
    serde_json::to_writer(&mut w, &to_chrome_json(trace)).map_err(std::io::Error::other)?;
    w.flush()
}
