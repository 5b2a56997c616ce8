//! Per-buffer diagnostics of a cross-check (`moelab crosscheck --buffers`): in the grad pass
//! (one step, optimizer skipped) both backends keep every non-persistent buffer (activations,
//! saved tensors, comm buffers, gradients of activations) to the end of the step; the cuda
//! workers dump theirs ([`crate::backend::dump`]) and each buffer is compared with the cpu's
//! copy, listed per rank in the order of the op that first writes it, so the first op whose
//! output drifts apart names where the two backends start to diverge. Values are compared as
//! f32 (bf16 storage widened on both sides) by relative error, index buffers by the count of
//! differing entries. For f32 plans the cross-check fails when a buffer (other than a
//! routing-sized one) is apart by more than its tolerance; for bf16 plans none of this
//! decides whether it passes.

use crate::backend::cpu::store::Data;
use crate::plan::{BufId, BufferDesc, ElemType, OpId, Plan, RankPlan};
use crate::taxonomy::Stage;
use serde::Serialize;
use std::collections::HashMap;
use std::fmt::Write as _;

/// Relative error above which a buffer counts as diverged in the summary.
pub const DIVERGED: f64 = 1e-3;
/// Diverged buffers listed per rank in the summary, in op order.
pub const FIRST_LISTED: usize = 5;
/// Buffers listed as the worst in the summary.
pub const WORST_LISTED: usize = 10;

/// How one buffer's two copies compare.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Diff {
    /// Values: `||cuda - cpu|| / ||cpu||` (NaN when the cuda copy has a non-finite value).
    RelErr {
        /// The relative error.
        rel_err: f64,
    },
    /// Indices or counts: how many entries differ.
    Differing {
        /// Entries that differ.
        count: usize,
    },
    /// The copies have different lengths (a routing-dependent size); not compared.
    Lengths {
        /// Elements of the cuda copy.
        cuda: usize,
        /// Elements of the cpu copy.
        cpu: usize,
    },
    /// One side does not hold the buffer (`"cuda"` or `"cpu"`).
    Missing {
        /// The side without it.
        on: String,
    },
}

/// One buffer of one rank, compared.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BufferDiff {
    /// Global rank.
    pub rank: u32,
    /// Buffer name.
    pub name: String,
    /// The op that writes it first, in plan order.
    pub op: String,
    /// That op's kind (its [`crate::plan::OpKind`] variant).
    pub op_kind: String,
    /// That op's position in the rank's op list.
    pub op_index: usize,
    /// Storage type: `f32`, `bf16` or `i32`.
    pub dtype: String,
    /// Elements of the cpu copy (of the cuda copy when the cpu has none).
    pub elems: usize,
    /// Size depends on routing (dropless): padding rows may legitimately differ.
    pub dynamic: bool,
    /// The comparison.
    pub diff: Diff,
}

impl BufferDiff {
    /// Whether the two copies are apart: relative error above `threshold` (or NaN),
    /// differing indices, or different lengths. A missing copy is not a divergence.
    pub fn diverged(&self, threshold: f64) -> bool {
        match self.diff {
            Diff::RelErr { rel_err } => rel_err.is_nan() || rel_err > threshold,
            Diff::Differing { count } => count > 0,
            Diff::Lengths { .. } => true,
            Diff::Missing { .. } => false,
        }
    }
    /// The relative error of a value buffer (NaN ranks above everything in the worst list).
    pub fn rel_err(&self) -> Option<f64> {
        match self.diff {
            Diff::RelErr { rel_err } => Some(rel_err),
            _ => None,
        }
    }
}

/// Every compared buffer of the grad pass plus the summary.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BufferReport {
    /// Buffers, rank by rank, each rank's in the order of their first writer.
    pub buffers: Vec<BufferDiff>,
    /// Indices into `buffers`: per rank, the first [`FIRST_LISTED`] that diverged (above
    /// [`DIVERGED`]), in op order.
    pub first_diverged: Vec<usize>,
    /// Indices into `buffers`: the [`WORST_LISTED`] value buffers of highest relative error.
    pub worst: Vec<usize>,
    /// Why a rank's dump could not be read (its buffers then show as missing on cuda).
    pub problems: Vec<String>,
}

/// The buffers a step of `rp` produces, each with the op that writes it first: every
/// non-persistent buffer written by an op that runs (optimizer ops do not with
/// `skip_optimizer`), in the order of that op.
pub fn produced(rp: &RankPlan, skip_optimizer: bool) -> Vec<(BufId, OpId)> {
    let mut first: Vec<Option<OpId>> = vec![None; rp.buffers.len()];
    let mut out = Vec::new();
    for op in rp.ops.iter().filter(|o| !(skip_optimizer && o.stage == Stage::Optimizer)) {
        for w in &op.writes {
            let slot = &mut first[w.0 as usize];
            if slot.is_none() && !rp.buffer(*w).persistent {
                *slot = Some(op.id);
                out.push((*w, op.id));
            }
        }
    }
    out
}

/// Names of every non-persistent buffer of any rank: what both backends keep past its last
/// use for a per-buffer comparison ([`crate::backend::ExecOptions::retain`]).
pub fn transient_names(plan: &Plan) -> Vec<String> {
    let mut names: Vec<String> = plan.ranks.iter().flat_map(|rp| rp.buffers.iter().filter(|b| !b.persistent).map(|b| b.name.clone())).collect();
    names.sort();
    names.dedup();
    names
}

/// Compares every buffer the grad pass of `plan` produces: `cpu(rank, desc)` reads the
/// reference copy, `cuda[rank]` holds the other backend's copies by name.
pub fn compare(plan: &Plan, cpu: &dyn Fn(usize, &BufferDesc) -> Option<Data>, cuda: &[HashMap<String, Data>]) -> BufferReport {
    let mut report = BufferReport::default();
    let none = HashMap::new();
    for (r, rp) in plan.ranks.iter().enumerate() {
        let theirs = cuda.get(r).unwrap_or(&none);
        for (id, op) in produced(rp, true) {
            let desc = rp.buffer(id);
            let op = &rp.ops[op.0 as usize];
            let mine = cpu(r, desc);
            let other = theirs.get(&desc.name);
            let elems = mine.as_ref().or(other).map_or(0, Data::len);
            report.buffers.push(BufferDiff {
                rank: rp.rank,
                name: desc.name.clone(),
                op: op.name.clone(),
                op_kind: kind_name(&op.kind),
                op_index: op.id.0 as usize,
                dtype: dtype(desc).into(),
                elems,
                dynamic: desc.dynamic,
                diff: diff(other, mine.as_ref()),
            });
        }
    }
    summarize(&mut report);
    report
}

/// Fills `first_diverged` and `worst` from `buffers`.
pub fn summarize(report: &mut BufferReport) {
    let mut per_rank: HashMap<u32, usize> = HashMap::new();
    report.first_diverged = (0..report.buffers.len())
        .filter(|&i| report.buffers[i].diverged(DIVERGED))
        .filter(|&i| {
            let n = per_rank.entry(report.buffers[i].rank).or_default();
            *n += 1;
            *n <= FIRST_LISTED
        })
        .collect();
    let mut valued: Vec<(usize, f64)> = report.buffers.iter().enumerate().filter_map(|(i, b)| Some((i, b.rel_err()?))).collect();
    // NaN first, then descending; ties keep op order.
    valued.sort_by(|a, b| b.1.is_nan().cmp(&a.1.is_nan()).then(b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal)));
    report.worst = valued.into_iter().take(WORST_LISTED).map(|(i, _)| i).collect();
}

fn diff(cuda: Option<&Data>, cpu: Option<&Data>) -> Diff {
    match (cuda, cpu) {
        (None, _) => Diff::Missing { on: "cuda".into() },
        (_, None) => Diff::Missing { on: "cpu".into() },
        (Some(a), Some(b)) if a.len() != b.len() => Diff::Lengths { cuda: a.len(), cpu: b.len() },
        (Some(Data::F32(a)), Some(Data::F32(b))) => Diff::RelErr { rel_err: super::rel_err(a, b) },
        (Some(Data::I32(a)), Some(Data::I32(b))) => Diff::Differing { count: a.iter().zip(b).filter(|(x, y)| x != y).count() },
        // A type mismatch would be a dump bug: compare the values as f32 anyway.
        (Some(a), Some(b)) => Diff::RelErr { rel_err: super::rel_err(&as_f32(a), &as_f32(b)) },
    }
}

fn as_f32(d: &Data) -> Vec<f32> {
    match d {
        Data::F32(v) => v.clone(),
        Data::I32(v) => v.iter().map(|x| *x as f32).collect(),
    }
}

fn dtype(desc: &BufferDesc) -> &'static str {
    match desc.elem {
        ElemType::I32 => "i32",
        ElemType::F32 if desc.is_bf16() => "bf16",
        ElemType::F32 => "f32",
    }
}

/// The variant name of an op kind (the start of its `Debug` form).
fn kind_name(kind: &crate::plan::OpKind) -> String {
    let d = format!("{kind:?}");
    d.split(|c: char| !c.is_alphanumeric() && c != '_').next().unwrap_or_default().to_string()
}

/// The report as text: one line per buffer, then the first diverged and the worst buffers.
pub fn render(report: &BufferReport) -> String {
    let mut s = String::new();
    let wn = report.buffers.iter().map(|b| b.name.len()).max().unwrap_or(6).max(6);
    let wo = report.buffers.iter().map(|b| b.op.len() + b.op_kind.len() + 3).max().unwrap_or(2).max(2);
    let _ = writeln!(s, "  per-buffer comparison of the grad pass (diagnostics only; rel err = ||cuda - cpu|| / ||cpu||):");
    let _ = writeln!(s, "    {:>4}  {:<wn$}  {:<wo$}  {:<5}  {:>9}  diff", "rank", "buffer", "op (kind)", "dtype", "elems");
    for b in &report.buffers {
        let op = format!("{} ({})", b.op, b.op_kind);
        let _ = writeln!(s, "    {:>4}  {:<wn$}  {:<wo$}  {:<5}  {:>9}  {}", b.rank, b.name, op, b.dtype, b.elems, describe(b));
    }
    for p in &report.problems {
        let _ = writeln!(s, "  buffer dump: {p}");
    }
    let missing = report.buffers.iter().filter(|b| matches!(b.diff, Diff::Missing { .. })).count();
    if missing > 0 {
        let _ = writeln!(s, "  {missing} buffer(s) missing on one side (not compared)");
    }
    if report.first_diverged.is_empty() {
        let _ = writeln!(s, "  no buffer diverged above {DIVERGED:.0e}");
    } else {
        let _ = writeln!(s, "  first buffers above {DIVERGED:.0e} (op order, up to {FIRST_LISTED} per rank):");
        for &i in &report.first_diverged {
            let _ = writeln!(s, "    {}", short(&report.buffers[i]));
        }
    }
    if !report.worst.is_empty() {
        let _ = writeln!(s, "  worst {} by rel err:", report.worst.len());
        for &i in &report.worst {
            let _ = writeln!(s, "    {}", short(&report.buffers[i]));
        }
    }
    s
}

fn describe(b: &BufferDiff) -> String {
    let d = match &b.diff {
        Diff::RelErr { rel_err } => format!("{rel_err:.2e}"),
        Diff::Differing { count } => format!("{count} differ"),
        Diff::Lengths { cuda, cpu } => format!("lengths differ: cuda {cuda}, cpu {cpu}"),
        Diff::Missing { on } => format!("missing on {on}"),
    };
    if b.dynamic {
        format!("{d}  [dynamic: padding rows may differ]")
    } else {
        d
    }
}

fn short(b: &BufferDiff) -> String {
    format!("rank {} {} <- {} ({}, op #{}): {}", b.rank, b.name, b.op, b.op_kind, b.op_index, describe(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuRuntime;
    use crate::backend::ExecOptions;
    use crate::spec::from_toml_str;
    use std::sync::Arc;

    fn spec_text(dtype: &str) -> String {
        format!(
            "name = \"t\"\nvariant = \"topk\"\n[model]\ndtype = \"{dtype}\"\nd_model = 16\nd_ffn = 24\nn_experts = 4\ntop_k = 2\n\
             n_layers = 2\nbatch = 2\nseq_len = 8\n[model.backbone]\nn_heads = 2\nd_mlp = 16\n[layout]\nep = 2\n[run]\nbackend = \"cpu\"\n"
        )
    }

    fn read(rt: &CpuRuntime, r: usize, d: &BufferDesc) -> Option<Data> {
        match d.elem {
            ElemType::F32 => rt.read(r, &d.name).map(Data::F32),
            ElemType::I32 => rt.read_i32(r, &d.name).map(Data::I32),
        }
    }

    /// One grad-pass step on the cpu keeping every transient buffer; replays `routes` when given.
    fn grad_pass(dtype: &str, routes: Option<Arc<HashMap<(u32, String), Vec<i32>>>>) -> (Plan, CpuRuntime) {
        let plan = Plan::build(&from_toml_str(&spec_text(dtype)).unwrap()).unwrap();
        let retain = transient_names(&plan);
        let mut rt = CpuRuntime::new(plan.clone(), ExecOptions { skip_optimizer: true, retain, replay_routes: routes, ..Default::default() });
        rt.step(true, None).unwrap();
        (plan, rt)
    }

    /// Every produced buffer of every rank, as a dump would hold it.
    fn dump_of(plan: &Plan, rt: &CpuRuntime) -> Vec<HashMap<String, Data>> {
        plan.ranks.iter().enumerate().map(|(r, rp)| {
            produced(rp, true).into_iter().filter_map(|(id, _)| Some((rp.buffer(id).name.clone(), read(rt, r, rp.buffer(id))?))).collect()
        }).collect()
    }

    #[test]
    fn buffers_are_listed_once_each_in_the_order_of_their_first_writer() {
        let (plan, rt) = grad_pass("f32", None);
        let report = compare(&plan, &|r, d| read(&rt, r, d), &dump_of(&plan, &rt));
        for rp in &plan.ranks {
            let mine: Vec<&BufferDiff> = report.buffers.iter().filter(|b| b.rank == rp.rank).collect();
            assert_eq!(mine[0].op_kind, "LoadBatch", "rank {}: the batch comes first", rp.rank);
            assert!(mine.windows(2).all(|w| w[0].op_index <= w[1].op_index), "rank {}: not in op order", rp.rank);
            let written: std::collections::HashSet<&str> = rp.ops.iter().filter(|o| o.stage != Stage::Optimizer)
                .flat_map(|o| o.writes.iter().map(|w| rp.buffer(*w))).filter(|d| !d.persistent).map(|d| d.name.as_str()).collect();
            assert_eq!(mine.len(), written.len(), "rank {}: every produced buffer once", rp.rank);
            for b in &mine {
                let op = &rp.ops[b.op_index];
                let id = rp.buffer_id(&b.name).unwrap();
                assert!(op.writes.contains(&id), "{} is not written by {}", b.name, op.name);
                assert!(rp.ops[..b.op_index].iter().all(|o| !o.writes.contains(&id)), "{} is written before {}", b.name, op.name);
                assert!(!matches!(b.diff, Diff::Missing { .. }), "{}: the cpu kept every buffer", b.name);
            }
            assert!(mine.iter().any(|b| b.dtype == "i32"), "routing indices are compared");
            assert!(mine.iter().any(|b| b.op_kind == "AllToAll" || b.name.contains("a2a") || b.op.contains("a2a")), "comm buffers are compared");
        }
    }

    #[test]
    fn a_perturbed_buffer_is_named_first_and_the_largest_error_worst() {
        let (plan, rt) = grad_pass("f32", None);
        let mut dump = dump_of(&plan, &rt);
        let same = compare(&plan, &|r, d| read(&rt, r, d), &dump);
        assert!(same.first_diverged.is_empty(), "a run against itself: {}", render(&same));
        assert!(same.buffers.iter().all(|b| b.rel_err().is_none_or(|e| e == 0.0)));
        // Rank 1: one value buffer a third of the way in gets a small error, a later one a
        // large error, and one routing index changes.
        let rank1: Vec<&BufferDiff> = same.buffers.iter().filter(|b| b.rank == 1 && b.dtype == "f32" && b.elems > 1).collect();
        let (early, late) = (rank1[rank1.len() / 3].name.clone(), rank1[2 * rank1.len() / 3].name.clone());
        let bump = |d: &mut Data, by: f32| {
            if let Data::F32(v) = d {
                let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-3);
                v[0] += by * n;
            }
        };
        bump(dump[1].get_mut(&early).unwrap(), 0.01);
        bump(dump[1].get_mut(&late).unwrap(), 0.5);
        let idx = same.buffers.iter().find(|b| b.rank == 1 && b.dtype == "i32" && b.name.ends_with("route.idx")).unwrap().name.clone();
        if let Some(Data::I32(v)) = dump[1].get_mut(&idx) {
            v[0] = (v[0] + 1) % 4;
        }
        let report = compare(&plan, &|r, d| read(&rt, r, d), &dump);
        let first: Vec<&str> = report.first_diverged.iter().map(|&i| report.buffers[i].name.as_str()).collect();
        let idx_pos = report.buffers.iter().position(|b| b.rank == 1 && b.name == idx).unwrap();
        let early_pos = report.buffers.iter().position(|b| b.rank == 1 && b.name == early).unwrap();
        let expect_first = if idx_pos < early_pos { &idx } else { &early };
        assert_eq!(first[0], expect_first, "{}", render(&report));
        assert!(first.contains(&early.as_str()) && first.contains(&late.as_str()) && first.contains(&idx.as_str()), "{first:?}");
        assert_eq!(report.buffers[report.worst[0]].name, late);
        assert_eq!(report.buffers[report.worst[1]].name, early);
        assert_eq!(report.buffers[idx_pos].diff, Diff::Differing { count: 1 });
        assert!(report.buffers.iter().filter(|b| b.rank == 0).all(|b| !b.diverged(DIVERGED)), "rank 0 untouched");
        // A buffer of another length is reported, not compared.
        if let Some(Data::F32(v)) = dump[1].get_mut(&early) {
            v.pop();
        }
        let report = compare(&plan, &|r, d| read(&rt, r, d), &dump);
        let b = report.buffers.iter().find(|b| b.rank == 1 && b.name == early).unwrap();
        assert!(matches!(b.diff, Diff::Lengths { cuda, cpu } if cuda + 1 == cpu), "{:?}", b.diff);
        // A rank without a dump: everything missing there, nothing diverged.
        dump.pop();
        let report = compare(&plan, &|r, d| read(&rt, r, d), &dump);
        assert!(report.buffers.iter().filter(|b| b.rank == 1).all(|b| b.diff == Diff::Missing { on: "cuda".into() }));
        assert!(render(&report).contains("missing on one side"));
    }

    #[test]
    fn bf16_storage_against_f32_diverges_first_at_a_bf16_buffer() {
        let (plan32, rt32) = grad_pass("f32", None);
        let routes: HashMap<(u32, String), Vec<i32>> = plan32.ranks.iter().enumerate().flat_map(|(r, rp)| {
            let rt = &rt32;
            rp.buffers.iter().filter(|b| b.name.ends_with("route.idx")).map(move |b| ((rp.rank, b.name.clone()), rt.read_i32(r, &b.name).unwrap()))
        }).collect();
        let (plan16, rt16) = grad_pass("bf16", Some(Arc::new(routes)));
        // The bf16 run plays the cuda side; the f32 plan is the reference.
        let report = compare(&plan16, &|r, d| read(&rt32, r, d), &dump_of(&plan16, &rt16));
        let text = render(&report);
        assert!(report.buffers.iter().all(|b| !matches!(b.diff, Diff::Missing { .. } | Diff::Lengths { .. })), "{text}");
        assert!(report.buffers.iter().filter(|b| b.dtype == "i32").all(|b| b.diff == Diff::Differing { count: 0 }), "replayed routing: {text}");
        for rp in &plan16.ranks {
            let mine: Vec<&BufferDiff> = report.buffers.iter().filter(|b| b.rank == rp.rank).collect();
            let first_bf16 = mine.iter().position(|b| b.dtype == "bf16").expect("a bf16 plan stores bf16 activations");
            // Nothing before the first rounded store differs at all; the batch itself carries
            // bf16 rounding error only.
            assert!(mine[..first_bf16].iter().all(|b| b.rel_err().is_none_or(|e| e == 0.0)), "{text}");
            let x = mine[first_bf16];
            let e = x.rel_err().unwrap();
            assert!(e > 1e-4 && e < 1e-2, "{} rel err {e:.2e} is not bf16 rounding", x.name);
            let first = report.first_diverged.iter().map(|&i| &report.buffers[i]).find(|b| b.rank == rp.rank).expect("bf16 diverges above 1e-3");
            assert!(first.op_index >= x.op_index, "{text}");
        }
        assert!(report.worst.iter().all(|&i| report.buffers[i].rel_err().unwrap() >= DIVERGED), "{text}");
    }

    #[test]
    fn json_names_the_diff_kind() {
        let b = BufferDiff {
            rank: 0, name: "x".into(), op: "load".into(), op_kind: "LoadBatch".into(), op_index: 0, dtype: "bf16".into(), elems: 4,
            dynamic: true, diff: Diff::Lengths { cuda: 3, cpu: 4 },
        };
        let v = serde_json::to_value(&b).unwrap();
        assert_eq!(v["diff"]["kind"], "lengths");
        assert_eq!(v["diff"]["cuda"], 3);
        assert!(describe(&b).contains("dynamic"));
    }
}
