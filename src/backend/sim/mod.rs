//! The `sim` backend: predicts a plan's run on a cluster described by a hardware profile,
//! and writes the same [`Trace`] as the cpu backend, so the stage table, overlap, memory
//! breakdown and comparisons work unchanged. It never touches a GPU and never does the f32
//! math: op times come from the plan's FLOPs, bytes and shapes ([`cost`]) run through a
//! discrete-event simulation of streams, dependencies and coupled collectives on shared
//! links ([`engine`]); memory comes from the plan's buffers, allocated when their producer
//! starts and released when their last user ends.
//!
//! - [`profile`]: hardware profiles (`profiles/*.toml`), built in or by path.
//! - [`cost`]: op durations and the collectives an op performs.
//! - [`engine`]: the event-driven simulation of one step.
//!
//! Symmetry: when every rank's plan is the same up to rank ids (same ops, shapes, buffers,
//! and collectives over groups of the same shape on the nodes), only rank 0 is simulated
//! and the others are its images; this is what makes 2,048 ranks take seconds. Otherwise
//! every rank is simulated.

pub mod calibration;
pub mod cost;
pub mod engine;
pub mod profile;

use super::{BackendError, ExecOptions, StepReport};
use crate::plan::{BufId, GroupId, Plan, RankPlan};
use crate::spec::{BackendKind, Capacity, DType, ExperimentSpec, Problem};
use crate::trace::{MemEvent, OpEvent, StepSpan, Trace};
use engine::{Coupling, SimInput, SimOp, SimRankInput, Timeline};
use profile::{CollectiveKind, GemmDtype, Profile};
use std::collections::HashMap;
use std::sync::atomic::Ordering;

/// Ranks up to which a symmetric simulation still writes every rank into the trace (copies
/// of the representative); larger worlds trace the representative alone.
pub const MAX_TRACED_RANKS: usize = 64;

/// Check and fill the sim fields of a spec's `[run]` (`profile`, `gpus_per_node`, `nodes`):
/// they belong to backend "sim" only; the profile must load; the cluster must hold the world.
/// Called by spec validation; returns the violated rules.
pub fn resolve_spec(spec: &mut ExperimentSpec) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut fail = |field: &str, message: String, fix: String| out.push(Problem { field: field.into(), message, fix });
    let r = &spec.run;
    if r.backend != BackendKind::Sim {
        for (field, set) in [
            ("run.profile", r.profile.is_some()),
            ("run.gpus_per_node", r.gpus_per_node.is_some()),
            ("run.nodes", r.nodes.is_some()),
            ("run.dropless_imbalance", r.dropless_imbalance.is_some()),
            ("run.kept_share", r.kept_share.is_some()),
            ("run.rank_loads", r.rank_loads.is_some()),
            ("run.host_copies", r.host_copies.is_some()),
        ] {
            if set {
                fail(field, format!("{field} applies to backend \"sim\" only (backend is {:?})", r.backend.as_str()),
                    format!("remove {field} (on the command line: --set {field}=), or set backend = \"sim\""));
            }
        }
        return out;
    }
    if let Some(i) = r.dropless_imbalance {
        if !(i.is_finite() && i >= 1.0) {
            fail("run.dropless_imbalance", format!("dropless_imbalance={i} must be a number >= 1 (the fullest expert's load over the mean)"),
                "use 1 for balanced routing, e.g. 1.3 for a fullest expert 30% above the mean".into());
        } else if !spec.model.dropless {
            fail("run.dropless_imbalance", "dropless_imbalance applies to dropless plans only (model.dropless is false)".into(),
                "remove run.dropless_imbalance, or set model.dropless = true".into());
        }
    }
    if let Some(k) = r.kept_share {
        if !(k.is_finite() && k > 0.0 && k <= 1.0) {
            fail("run.kept_share", format!("kept_share={k} must be a number in (0, 1] (the share of routed assignments the capacity keeps)"),
                "use 1 when nothing is dropped, e.g. 0.9 when a tenth of the assignments are dropped".into());
        } else if spec.model.dropless {
            fail("run.kept_share", "kept_share applies to capacity plans only (a dropless plan drops nothing)".into(),
                "remove run.kept_share, or set model.dropless = false".into());
        }
    }
    if let Some(loads) = &r.rank_loads {
        let ep = spec.layout.ep;
        if let Some(bad) = loads.iter().find(|l| !(l.is_finite() && **l > 0.0)) {
            fail("run.rank_loads", format!("rank_loads holds {bad}; every entry must be a positive number (a rank's rows relative to the others)"),
                "use 1 for a rank at the mean, e.g. [1.1, 0.9] when the first of two ranks receives 10% more rows".into());
        } else if loads.len() != ep {
            fail("run.rank_loads", format!("rank_loads has {} entries but layout.ep={ep} expert-parallel ranks", loads.len()),
                format!("give one load per expert-parallel rank ({ep} numbers)"));
        }
    }
    let name = r.profile.clone().unwrap_or_else(|| profile::DEFAULT_PROFILE.to_string());
    let prof = match profile::resolve(&name) {
        Ok(p) => p,
        Err(e) => {
            let builtins: Vec<&str> = profile::BUILTIN.iter().map(|(n, _)| *n).collect();
            let (message, fix) = match &e {
                profile::ProfileError::NotFound { .. } => (e.to_string(),
                    format!("use a built-in profile ({}) or the path of a profile TOML laid out like profiles/h100.toml", builtins.join(", "))),
                profile::ProfileError::Invalid { source_name, field, message, fix } => (format!("{source_name}: {field}: {message}"), fix.clone()),
                profile::ProfileError::Parse { source_name, field, .. } => (e.to_string(),
                    format!("correct {field} in {source_name}; profiles/h100.toml shows every field")),
            };
            fail("run.profile", message, fix);
            return out;
        }
    };
    let world = spec.world();
    let gpn = match r.gpus_per_node.or(spec.node_size_hint()) {
        Some(0) => {
            fail("run.gpus_per_node", "gpus_per_node=0 must be at least 1".into(),
                format!("set gpus_per_node to the GPUs of one node, e.g. {}", prof.topology.gpus_per_node));
            return out;
        }
        Some(g) => g,
        None => prof.topology.gpus_per_node,
    };
    // Tutel's 2D all-to-all groups its first phase by `tutel.gpus_per_node`: a group larger
    // than the cluster's node would run that "intra-node" phase over the inter-node links.
    if let (Some(n), Some(g)) = (r.gpus_per_node, spec.node_size_hint()) {
        if g > 0 && !n.is_multiple_of(g) {
            fail("tutel.gpus_per_node",
                format!("gpus_per_node={g} does not divide run.gpus_per_node={n}: the 2D all-to-all's intra-node phase would cross nodes"),
                format!("set tutel.gpus_per_node = {} (the largest that divides both the node size and layout.ep), or remove run.gpus_per_node to take the node size from [tutel]", gcd(n, spec.layout.ep)));
            return out;
        }
    }
    let need = world.div_ceil(gpn).max(1);
    let nodes = match r.nodes {
        Some(0) => {
            fail("run.nodes", "nodes=0 must be at least 1".into(), format!("set nodes = {need} (world {world} / {gpn} GPUs per node)"));
            return out;
        }
        Some(n) if n.saturating_mul(gpn) < world => {
            fail("run.nodes", format!("nodes={n} x gpus_per_node={gpn} = {} GPUs cannot hold world={world} ranks", n * gpn),
                format!("set nodes = {need} or more, or remove nodes to have it derived"));
            return out;
        }
        Some(n) if n > need => {
            let spread = if world % n == 0 { format!(", or gpus_per_node = {} to spread the ranks over {n} nodes", world / n) } else { String::new() };
            fail("run.nodes", format!("nodes={n} but world={world} ranks fill {need} node(s) of {gpn} GPUs; ranks fill nodes in order, so the other nodes would stay idle"),
                format!("set nodes = {need}{spread}, or remove nodes to have it derived"));
            return out;
        }
        Some(n) => n,
        None => need,
    };
    spec.run.profile = Some(name);
    spec.run.gpus_per_node = Some(gpn);
    spec.run.nodes = Some(nodes);
    out
}

/// Greatest common divisor (for a fix that must divide two sizes).
fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The profile a resolved sim spec names, reshaped to its cluster (`run.gpus_per_node`,
/// `run.nodes`).
pub fn spec_profile(spec: &ExperimentSpec) -> Result<Profile, profile::ProfileError> {
    profile_for(spec, spec.run.profile.as_deref().unwrap_or(profile::DEFAULT_PROFILE))
}

/// Profile `name` (built-in or a TOML path) on the spec's cluster shape: what a sim run of
/// the spec with `run.profile = name` uses (the workbench predicts on any profile this way).
pub fn profile_for(spec: &ExperimentSpec, name: &str) -> Result<Profile, profile::ProfileError> {
    let p = profile::resolve(name)?;
    let gpn = spec.run.gpus_per_node.unwrap_or(p.topology.gpus_per_node);
    let nodes = spec.run.nodes.unwrap_or_else(|| spec.world().div_ceil(gpn).max(1));
    Ok(p.with_cluster(gpn, nodes))
}

/// One simulated step of a whole plan.
#[derive(Debug, Clone)]
pub struct PlanSimulation {
    /// The ranks that were simulated (all ranks, or the representative of a symmetric plan).
    pub simulated: Vec<u32>,
    /// Whether the plan was symmetric and only representatives were simulated.
    pub symmetric: bool,
    /// When each op of each simulated rank ran.
    pub timeline: Timeline,
}

/// How far a rank's op FLOPs, bytes, buffer total and peak memory may be from rank 0's for
/// it to count as an image of rank 0 in a plan of more than [`NEAR_SYMMETRY_MIN_RANKS`] ranks
/// ([`is_symmetric`]).
pub const SYMMETRY_SLACK: f64 = 0.01;

/// Plans of at most this many ranks are reduced to rank 0 only when every rank is exactly its
/// image (each rank's figures then exact); larger ones, which would take long to simulate
/// rank by rank, also when within [`SYMMETRY_SLACK`].
pub const NEAR_SYMMETRY_MIN_RANKS: usize = 64;

/// Whether every rank's plan equals rank 0's up to rank ids, for the simulator: same ops in
/// the same order with the same dependencies, costs, buffers and memory effects, and
/// collectives over groups of the same size spread over nodes in the same way. Above
/// [`NEAR_SYMMETRY_MIN_RANKS`] ranks, costs, buffer bytes and predicted peak memory within
/// [`SYMMETRY_SLACK`] and dependencies up to implied ones suffice. (Uneven `run.rank_loads`
/// are the caller's to exclude.)
pub fn is_symmetric(plan: &Plan, profile: &Profile) -> bool {
    exactly_symmetric(plan, profile) || (plan.ranks.len() > NEAR_SYMMETRY_MIN_RANKS && nearly_symmetric(plan, profile))
}

/// The shape of each group: its size and how many of its ranks share each node.
fn group_shapes(plan: &Plan, profile: &Profile) -> Vec<(usize, Vec<usize>)> {
    plan.groups
        .iter()
        .map(|g| {
            let mut per_node: HashMap<usize, usize> = HashMap::new();
            for r in &g.ranks {
                *per_node.entry(profile.topology.node_of(*r)).or_default() += 1;
            }
            let mut counts: Vec<usize> = per_node.into_values().collect();
            counts.sort_unstable();
            (g.ranks.len(), counts)
        })
        .collect()
}

/// Whether ops `a` and `b` (of two ranks) are both compute ops, or collectives of the same
/// parts: kinds, groups of the same shape, and payloads that `same_bytes` accepts.
fn collectives_match(a: &crate::plan::Op, b: &crate::plan::Op, group_shape: &[(usize, Vec<usize>)], same_bytes: impl Fn(f64, f64) -> bool) -> bool {
    match (cost::collective(a), cost::collective(b)) {
        (None, None) => true,
        (Some(pa), Some(pb)) => {
            pa.len() == pb.len()
                && pa.iter().zip(&pb).all(|(x, y)| x.kind == y.kind && same_bytes(x.bytes, y.bytes) && group_shape[x.group.0 as usize] == group_shape[y.group.0 as usize])
        }
        _ => false,
    }
}

/// Every rank equal to rank 0 up to rank ids, memory effects included.
fn exactly_symmetric(plan: &Plan, profile: &Profile) -> bool {
    let Some(r0) = plan.ranks.first() else { return true };
    let group_shape = group_shapes(plan, profile);
    plan.ranks.iter().skip(1).all(|r| {
        r.ops.len() == r0.ops.len()
            && r.buffers.len() == r0.buffers.len()
            && r.buffers.iter().zip(&r0.buffers).all(|(a, b)| a.bytes() == b.bytes() && a.category == b.category && a.persistent == b.persistent)
            && r.ops.iter().zip(&r0.ops).all(|(a, b)| {
                a.name == b.name
                    && a.stage == b.stage
                    && a.pass == b.pass
                    && a.stream == b.stream
                    && a.deps == b.deps
                    && a.flops == b.flops
                    && a.bytes == b.bytes
                    && a.writes == b.writes
                    && a.frees == b.frees
                    && collectives_match(a, b, &group_shape, |x, y| x == y)
                    && cost::gemms(&a.kind, r) == cost::gemms(&b.kind, r0)
            })
    })
}

/// Every rank within [`SYMMETRY_SLACK`] of rank 0 (see [`is_symmetric`]).
fn nearly_symmetric(plan: &Plan, profile: &Profile) -> bool {
    let Some(r0) = plan.ranks.first() else { return true };
    let group_shape = group_shapes(plan, profile);
    // Ranks may differ by a few small tensors (TED's TP index 0 alone holds the experts'
    // output bias: its gradient, Adam state and share of the gradient all-reduce): within
    // [`SYMMETRY_SLACK`] of each op's FLOPs and bytes and of the buffers' total, a rank is an
    // image of rank 0 (rank 0 the one simulated), so that such plans simulate in seconds at
    // 2,048 ranks; buffers are compared by total, as ranks may number them differently.
    let near = |a: u64, b: u64| a == b || (a as f64 - b as f64).abs() <= SYMMETRY_SLACK * a.max(b) as f64;
    let total = |r: &RankPlan| r.buffers.iter().map(|d| d.bytes()).sum::<u64>();
    // Dependencies may differ where the extra ones are implied (PPMoE's TP index 0 alone adds
    // the residual, which its other ranks reach through other ops): by the stream's order or
    // through the other side's dependencies.
    let same_deps = |r: &RankPlan, a: &crate::plan::Op, b: &crate::plan::Op| {
        a.deps == b.deps
            || (a.deps.iter().all(|d| b.deps.contains(d) || implied(r, a, *d, &b.deps)) && b.deps.iter().all(|d| a.deps.contains(d) || implied(r0, b, *d, &a.deps)))
    };
    let (t0, p0) = (total(r0), crate::plan::memory::issue_order_peak(r0));
    plan.ranks.iter().skip(1).all(|r| {
        r.ops.len() == r0.ops.len()
            && near(total(r), t0)
            // The peak the sim tracks for rank 0 stands for every image's.
            && near(crate::plan::memory::issue_order_peak(r), p0)
            && r.ops.iter().zip(&r0.ops).all(|(a, b)| {
                a.name == b.name
                    && a.stage == b.stage
                    && a.pass == b.pass
                    && a.stream == b.stream
                    && same_deps(r, a, b)
                    && near(a.flops, b.flops)
                    && near(a.bytes, b.bytes)
                    && collectives_match(a, b, &group_shape, |x, y| near(x as u64, y as u64))
                    && cost::gemms(&a.kind, r) == cost::gemms(&b.kind, r0)
            })
    })
}

/// Whether `op` of `rp` waiting for `dep` is implied without it: `dep` is an earlier op of
/// the same stream (which runs in order), or an ancestor of one of `others` in `rp`.
fn implied(rp: &RankPlan, op: &crate::plan::Op, dep: crate::plan::OpId, others: &[crate::plan::OpId]) -> bool {
    if rp.ops[dep.0 as usize].stream == op.stream {
        return true;
    }
    let mut seen = vec![false; rp.ops.len()];
    let mut stack: Vec<crate::plan::OpId> = others.to_vec();
    while let Some(o) = stack.pop() {
        if o == dep {
            return true;
        }
        if std::mem::replace(&mut seen[o.0 as usize], true) {
            continue;
        }
        stack.extend(rp.ops[o.0 as usize].deps.iter().copied());
    }
    false
}

/// Share of all tokens one expert receives under balanced routing: `k / E`
/// ([`ExperimentSpec::routed_k`]), at most 1.
fn balanced_expert_share(spec: &ExperimentSpec) -> f64 {
    (spec.routed_k() as f64 / spec.model.n_experts.max(1) as f64).min(1.0)
}

/// Share of a routing-sized (dynamic) buffer's upper bound that a step is expected to use:
/// dropless plans size expert buffers for every token reaching one expert, while balanced
/// routing sends each expert `k / E` of them (`k`: [`ExperimentSpec::routed_k`]); a bounded
/// capacity (`capacity_factor < 0`, sized like dropless) keeps at most `|cf|` times that. 1
/// for a fixed capacity.
///
/// [`ExperimentSpec::routed_k`]: crate::spec::ExperimentSpec::routed_k
pub fn expected_dynamic_load(spec: &crate::spec::ExperimentSpec) -> f64 {
    let mean = balanced_expert_share(spec);
    match spec.capacity() {
        Capacity::Dropless => mean,
        Capacity::Bounded(cf) => (mean * cf.min(1.0)).min(1.0),
        Capacity::Factor(_) => 1.0,
    }
}

/// Share of the bound of a dropless expert block (`[E_local, rows, d]`) that a step fills:
/// every expert's block is as long as the fullest expert's load, the mean load times
/// `run.dropless_imbalance` (1 when unset); a bounded capacity caps it at `|cf|` times the
/// mean. 1 for a fixed capacity.
pub fn expected_block_load(spec: &crate::spec::ExperimentSpec) -> f64 {
    let imbalance = spec.run.dropless_imbalance.unwrap_or(1.0);
    let mean = balanced_expert_share(spec);
    match spec.capacity() {
        Capacity::Dropless => (mean * imbalance).min(1.0),
        Capacity::Bounded(cf) => (mean * imbalance.min(cf)).min(1.0),
        Capacity::Factor(_) => 1.0,
    }
}

/// Share of the routed assignments a capacity plan keeps: `run.kept_share` (1 when unset or
/// for dropless plans, which drop nothing).
pub fn expected_kept_share(spec: &crate::spec::ExperimentSpec) -> f64 {
    if spec.model.dropless { 1.0 } else { spec.run.kept_share.unwrap_or(1.0).clamp(0.0, 1.0) }
}

/// The routing statistics a simulated step assumes (see [`expected_dynamic_load`],
/// [`expected_block_load`], [`expected_kept_share`]).
#[derive(Debug, Clone, Copy, PartialEq)]
struct RoutingFill {
    load: f64,
    block_load: f64,
    kept: f64,
    zero_rows: f64,
    /// The rank's experts' rows over the mean rank's (`run.rank_loads`, 1 when unset), for a
    /// capacity plan's all-to-alls ([`cost::capacity_all_to_all_payload`]).
    share: f64,
    /// Whether the plan has a fixed capacity (not dropless, not bounded).
    capacity: bool,
}

impl RoutingFill {
    /// What rank `rp` of a plan of `spec` expects: the balanced fill scaled by its
    /// expert-parallel rank's share of `run.rank_loads` ([`rank_load`]); its block is the
    /// fullest expert's (`run.dropless_imbalance`) on the busiest rank, in proportion on the
    /// others, and never shorter than its own mean load. A capacity plan's blocks are as long
    /// on every rank: only their zero rows follow the rank's share.
    fn of(spec: &crate::spec::ExperimentSpec, rp: &RankPlan) -> RoutingFill {
        let (load, block_load) = (expected_dynamic_load(spec), expected_block_load(spec));
        let share = rank_load(spec, rp);
        let (kept, zero_rows) = (expected_kept_share(spec), zero_rows_at(spec, rp, share.unwrap_or(1.0)));
        let capacity = matches!(spec.capacity(), Capacity::Factor(_));
        let fill = RoutingFill { load, block_load, kept, zero_rows, share: share.unwrap_or(1.0), capacity };
        let Some(r) = share.filter(|_| spec.model.dropless) else { return fill };
        let busiest = spec.run.rank_loads.as_deref().map_or(1.0, busiest_rank_share);
        let imbalance = spec.run.dropless_imbalance.unwrap_or(1.0);
        RoutingFill { load: (load * r).min(1.0), block_load: (load * r * imbalance.max(busiest) / busiest).max(load * r).min(1.0), ..fill }
    }
}

/// The busiest rank's share: the largest of `loads` over their mean.
fn busiest_rank_share(loads: &[f64]) -> f64 {
    let mean = loads.iter().sum::<f64>() / loads.len().max(1) as f64;
    loads.iter().copied().fold(0.0, f64::max) / mean
}

/// Rank `rp`'s index in its expert-parallel group (from the first op that routes rows to
/// experts); `None` for a rank without MoE layers.
pub fn ep_index(rp: &RankPlan) -> Option<usize> {
    moe_dims(rp).map(|d| d.ep_index)
}

/// The routing dimensions of rank `rp`'s first op that routes rows to experts.
fn moe_dims(rp: &RankPlan) -> Option<&crate::plan::ops::MoeDims> {
    use crate::plan::OpKind::*;
    rp.ops.iter().find_map(|op| match &op.kind {
        Dispatch { dims, .. } | ExpertLayout { dims, .. } | ChunkLayout { dims, .. } | TpLayout { dims, .. } | LocalLayout { dims, .. } | ShardDispatch { dims, .. } => Some(dims),
        _ => None,
    })
}

/// Share of a capacity plan's expert-block rows on rank `rp` that hold no assignment: each
/// local expert's block has `rows_per_expert` rows, and expects its expert-parallel group's
/// tokens x top_k over the experts, times `run.kept_share`. 0 for dropless plans and ranks
/// without MoE layers.
pub fn expected_zero_rows(spec: &crate::spec::ExperimentSpec, rp: &RankPlan) -> f64 {
    zero_rows_at(spec, rp, 1.0)
}

/// [`expected_zero_rows`] of a rank whose experts take `load` times the mean rank's kept
/// assignments (its share of `run.rank_loads`).
fn zero_rows_at(spec: &crate::spec::ExperimentSpec, rp: &RankPlan, load: f64) -> f64 {
    if spec.model.dropless {
        return 0.0;
    }
    let Some(d) = moe_dims(rp) else { return 0.0 };
    let Some(rows) = d.rows_per_expert.filter(|r| *r > 0) else { return 0.0 };
    let routed = (d.ep_peers.len() * d.tokens * d.top_k) as f64 / d.n_experts.max(1) as f64;
    (1.0 - expected_kept_share(spec) * load * routed / rows as f64).clamp(0.0, 1.0)
}

/// A warning when `run.rank_loads` is uneven but cannot change the prediction: in a capacity
/// plan a rank's load only changes how many of its expert blocks' rows are zero, which the
/// profile prices for bf16 GEMMs only (`kernels.zero_row_gain`).
fn idle_rank_loads(spec: &crate::spec::ExperimentSpec, profile: &Profile) -> Option<String> {
    let loads = spec.run.rank_loads.as_deref()?;
    let uneven = busiest_rank_share(loads) > 1.0 + 1e-12;
    let g = &profile.gpu.kernels.zero_row_gain;
    let priced = spec.model.dtype == crate::spec::DType::Bf16 && [g.forward, g.input_grad, g.weight_grad].iter().any(|x| *x > 0.0);
    (uneven && !spec.model.dropless && !priced).then(|| {
        format!(
            "run.rank_loads changes nothing here: a capacity plan's expert GEMMs run whole capacity blocks whatever rows they hold, and only bf16 GEMMs on a profile with kernels.zero_row_gain run faster over zero rows ({}, profile {})",
            if spec.model.dtype == crate::spec::DType::Bf16 { "this profile has no gain" } else { "this plan is f32" }, profile.name
        )
    })
}

/// Rank `rp`'s expert-parallel rank's rows over the mean (`run.rank_loads`, at its index in
/// its expert-parallel group); `None` when unset or the rank routes no MoE layer.
pub fn rank_load(spec: &crate::spec::ExperimentSpec, rp: &RankPlan) -> Option<f64> {
    let loads = spec.run.rank_loads.as_deref().filter(|l| !l.is_empty())?;
    let index = ep_index(rp)?;
    let mean = loads.iter().sum::<f64>() / loads.len() as f64;
    loads.get(index).map(|l| l / mean)
}

/// Dynamic buffers laid out in expert blocks: the row operands of the expert GEMMs (and so
/// of the activation between them).
fn expert_blocks(rp: &RankPlan) -> Vec<bool> {
    use crate::plan::OpKind::*;
    let mut out = vec![false; rp.buffers.len()];
    for op in &rp.ops {
        let rows: &[BufId] = match &op.kind {
            ExpertLinear { x, y, .. } | ExpertLinearPart { x, y, .. } => &[*x, *y],
            ExpertLinearBwd { x, dy, dx, .. } | ExpertLinearBwdAcc { x, dy, dx, .. } | ExpertLinearPartBwd { x, dy, dx, .. } => &[*x, *dy, *dx],
            _ => &[],
        };
        for b in rows {
            out[b.0 as usize] = rp.buffer(*b).dynamic;
        }
    }
    out
}

/// How a dropless expert GEMM op runs in the executor (`plan::ops::per_expert_pays`, the rule
/// the cuda executor applies each step): one GEMM per expert at the mean load, or one batched
/// GEMM over whole blocks of the fullest expert's rows. `None` for other ops and full buffers.
fn expert_gemm_fill(op: &crate::plan::Op, rp: &RankPlan, load: f64, block_load: f64, bf16: bool, sms: usize) -> Option<cost::Fill> {
    use crate::plan::ops::{aligned_rows, per_expert_pays, DROPLESS_ROW_ALIGN};
    let g = op.kind.expert_gemm()?;
    let (x, n_local, d_in, d_out) = (g.x, g.n_local, g.d_in, g.d_out);
    let d = rp.buffer(x);
    if !d.dynamic || load >= 1.0 {
        return None;
    }
    let bound = d.elems / (n_local * d_in).max(1);
    let rows = |share: f64| ((bound as f64 * share).round() as usize).max(1);
    let block = aligned_rows(rows(block_load), bound, DROPLESS_ROW_ALIGN);
    let used = aligned_rows(rows(load), block, DROPLESS_ROW_ALIGN);
    let block_share = block as f64 / bound.max(1) as f64;
    Some(if per_expert_pays(&vec![used; n_local], block, d_in, d_out, g.gemms, g.calls(), bf16, sms) {
        cost::Fill { block: block_share, ..cost::Fill::per_expert(load) }
    } else {
        cost::Fill { scale: block_share, per_expert: false, block: block_share }
    })
}

/// Costs of a rank's ops; ops that touch a dynamic buffer are scaled to the expected load
/// (see [`expected_dynamic_load`]), so dropless plans are predicted at balanced routing; an
/// element-wise op whose dynamic buffers are all expert blocks runs over the whole blocks
/// (`block_load`, see [`expected_block_load`]), and the expert GEMMs per expert or batched
/// over whole blocks as the executor chooses ([`expert_gemm_fill`]); in a capacity plan
/// that dropped assignments, the routed-row ops read only the kept rows
/// ([`cost::op_cost_kept`]).
///
/// Host work goes with each op ([`cost::split_host`]): with `host_copies` (the cuda
/// executor's behaviour) a routing input read once is known on the host afterwards, so
/// only its first reader waits for the stream.
///
/// An AllToAllV over two or more GPUs also all-gathers its send counts through NCCL before
/// its kernel launches (the cuda executor's `exchange_counts`; `groups` gives the members):
/// the all-gather's time from the profile joins the op's host work.
fn sim_ops(rp: &RankPlan, profile: &Profile, dtype: GemmDtype, routing: &RoutingFill, host_copies: bool, groups: &[Vec<u32>]) -> Vec<SimOp> {
    let blocks = expert_blocks(rp);
    let mut copies = cost::HostCopies::default();
    rp.ops
        .iter()
        .map(|op| {
            let (cost, host_load) = op_cost(op, rp, profile, dtype, routing, &blocks);
            let (mut cost, host) = cost::split_host(cost, op, rp, &profile.gpu, host_load, &copies);
            let members = |g: crate::plan::GroupId| groups.get(g.0 as usize).map_or(&[][..], |m| &m[..]);
            match (&op.kind, &mut cost) {
                (crate::plan::OpKind::AllToAllV { group, send_counts, .. }, cost::Cost::Collective(parts)) => {
                    let counts = rp.buffer(*send_counts);
                    if let (Some(first), true) = (parts.first_mut(), members(*group).len() > 1) {
                        first.host_s += engine::alone_seconds(profile, members(*group), CollectiveKind::AllGather, (counts.elems * counts.elem_bytes) as f64);
                    }
                }
                // The 2D all-to-all all-gathers its counts within the node before the first
                // phase and along the rail before the second.
                (crate::plan::OpKind::AllToAllV2d { intra, inter, send_counts, .. }, cost::Cost::Collective(parts)) => {
                    let counts = rp.buffer(*send_counts);
                    let bytes = (counts.elems * counts.elem_bytes) as f64;
                    for (part, group) in parts.iter_mut().zip([*intra, *inter]) {
                        if members(group).len() > 1 {
                            part.host_s += engine::alone_seconds(profile, members(group), CollectiveKind::AllGather, bytes);
                        }
                    }
                }
                _ => {}
            }
            if host_copies {
                copies.issued(op, rp);
            }
            SimOp { stream: op.stream, deps: op.deps.iter().map(|d| d.0).collect(), cost, host, kernels: cost::held_kernels(op, rp) as u32 }
        })
        .collect()
}

/// One op's cost as [`cost::op_cost_filled`] or [`cost::op_cost_kept`] prices it (every
/// routing input copied down on the stream), and the load its host traffic scales with.
fn op_cost(op: &crate::plan::Op, rp: &RankPlan, profile: &Profile, dtype: GemmDtype, routing: &RoutingFill, blocks: &[bool]) -> (cost::Cost, f64) {
    let (load, block_load) = (routing.load, routing.block_load);
    let mut dynamic_bufs = op.reads.iter().chain(&op.writes).filter(|b| rp.buffer(**b).dynamic).peekable();
    let dynamic = load < 1.0 && dynamic_bufs.peek().is_some();
    let elementwise = matches!(op.kind, crate::plan::OpKind::Act { .. } | crate::plan::OpKind::ActBwd { .. });
    if !dynamic && routing.capacity {
        if let Some(bytes) = cost::capacity_all_to_all_payload(op, rp, routing.kept, routing.share) {
            return (cost::collective_cost(op, rp, &profile.gpu, dtype, bytes), 1.0);
        }
    }
    if !dynamic && (routing.kept < 1.0 || routing.zero_rows > 0.0) {
        return (cost::op_cost_kept(op, rp, &profile.gpu, dtype, routing.kept, routing.zero_rows), 1.0);
    }
    let fill = if !dynamic {
        cost::Fill::FULL
    } else if let Some(f) = expert_gemm_fill(op, rp, load, block_load, dtype == GemmDtype::Bf16, profile.gpu.sms) {
        f
    } else if elementwise && dynamic_bufs.all(|b| blocks[b.0 as usize]) {
        cost::Fill { scale: block_load, per_expert: false, block: block_load }
    } else if matches!(op.kind, crate::plan::OpKind::ExpertLayout { out, .. } if blocks[out.0 as usize]) {
        // It fills a whole expert block (cost::op_cost_filled).
        cost::Fill { scale: load, per_expert: false, block: block_load }
    } else {
        cost::Fill::per_expert(load)
    };
    (cost::op_cost_filled(op, rp, &profile.gpu, dtype, fill), fill.scale)
}

/// Whether [`simulate_plan`] may simulate a representative rank for a symmetric plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Symmetry {
    /// Simulate rank 0 alone when [`is_symmetric`] holds (the default).
    Exploit,
    /// Simulate every rank (to check the reduction, or for plans with few ranks).
    Ignore,
}

/// Simulate one step of `plan` on `profile` (its topology already shaped to the cluster).
pub fn simulate_plan(plan: &Plan, profile: &Profile, symmetry: Symmetry) -> Result<PlanSimulation, engine::SimError> {
    let dtype = match plan.spec.model.dtype {
        DType::Bf16 => GemmDtype::Bf16,
        DType::F32 => GemmDtype::F32,
    };
    let groups: Vec<Vec<u32>> = plan.groups.iter().map(|g| g.ranks.clone()).collect();
    // Unequal rank loads make the ranks' costs differ: every rank is simulated then.
    let equal_loads = plan.spec.run.rank_loads.as_deref().is_none_or(|l| busiest_rank_share(l) <= 1.0 + 1e-12);
    let symmetric = symmetry == Symmetry::Exploit && plan.world() > 1 && equal_loads && is_symmetric(plan, profile);
    let (ranks, coupling): (Vec<&RankPlan>, Coupling) = if symmetric {
        let r0 = &plan.ranks[0];
        // For each collective part of rank 0, the groups every rank uses for it at once.
        let images: Vec<Vec<Vec<GroupId>>> = r0
            .ops
            .iter()
            .enumerate()
            .map(|(i, op)| {
                let n_parts = cost::collective(op).map_or(0, |p| p.len());
                (0..n_parts)
                    .map(|p| {
                        let mut gs: Vec<GroupId> = plan
                            .ranks
                            .iter()
                            .filter_map(|r| cost::collective(&r.ops[i]).map(|parts| parts[p].group))
                            .collect();
                        gs.sort_unstable();
                        gs.dedup();
                        gs
                    })
                    .collect()
            })
            .collect();
        (vec![r0], Coupling::Symmetric { images: vec![images] })
    } else {
        (plan.ranks.iter().collect(), Coupling::Full)
    };
    let input = SimInput {
        ranks: ranks.iter().map(|rp| SimRankInput { rank: rp.rank, ops: sim_ops(rp, profile, dtype, &RoutingFill::of(&plan.spec, rp), plan.spec.run.host_copies.unwrap_or(true), &groups) }).collect(),
        groups,
        profile,
        coupling,
    };
    let timeline = engine::simulate(&input)?;
    Ok(PlanSimulation { simulated: ranks.iter().map(|r| r.rank).collect(), symmetric, timeline })
}

/// What the runtime keeps from the one simulation it runs.
struct Simulated {
    sim: PlanSimulation,
    /// (trace rank, index into `sim.simulated`) for every rank written to the trace.
    traced: Vec<(u32, usize)>,
    step_ns: u64,
    tracked: Vec<(u64, [u64; 7])>,
}

/// A plan loaded onto a simulated cluster: the same interface as the cpu runtime. The step
/// is simulated once (every step of a plan is the same to the model); each `step` call
/// appends it to the trace after the previous one.
pub struct SimRuntime {
    plan: Plan,
    opts: ExecOptions,
    state: Result<Simulated, BackendError>,
    trace: Trace,
    steps_done: usize,
    /// Seconds the simulation itself took (wall clock of this machine).
    pub simulate_s: f64,
    profile_note: String,
    /// A predicted peak above the profile's GPU memory; a spec setting that changes nothing.
    warnings: Vec<String>,
}

impl SimRuntime {
    /// Load the plan's profile (`run.profile` and cluster) and simulate one step.
    pub fn new(plan: Plan, opts: ExecOptions) -> Self {
        match spec_profile(&plan.spec) {
            Ok(p) => Self::with_profile(plan, &p, opts),
            Err(e) => {
                let state = Err(BackendError::OpFailed { rank: 0, op: "load profile".into(), message: e.to_string() });
                let profile_note = format!("sim: no profile: {e}");
                SimRuntime { plan, opts, state, trace: Trace { backend: "sim".into(), ..Default::default() }, steps_done: 0, simulate_s: 0.0, profile_note, warnings: Vec::new() }
            }
        }
    }

    /// Simulate one step of `plan` on `profile` (already shaped to the cluster).
    pub fn with_profile(plan: Plan, profile: &Profile, opts: ExecOptions) -> Self {
        let t0 = std::time::Instant::now();
        let state = simulate_plan(&plan, profile, Symmetry::Exploit)
            .map_err(|e| {
                let (rank, op) = match &e {
                    engine::SimError::Stuck { rank, op, .. } | engine::SimError::BadInput { rank, op, .. } | engine::SimError::MissingMember { rank, op, .. } => (*rank, *op),
                };
                let name = plan.ranks.get(rank as usize).and_then(|r| r.ops.get(op as usize)).map_or_else(|| format!("#{op}"), |o| o.name.clone());
                BackendError::OpFailed { rank, op: name, message: format!("simulation: {e}") }
            })
            .map(|sim| {
                let world = plan.world();
                let traced: Vec<(u32, usize)> = if sim.symmetric && world <= MAX_TRACED_RANKS {
                    (0..world as u32).map(|r| (r, 0)).collect()
                } else {
                    sim.simulated.iter().enumerate().map(|(i, r)| (*r, i)).collect()
                };
                let step_ns = (sim.timeline.makespan * 1e9).ceil() as u64;
                let mut s = Simulated { sim, traced, step_ns, tracked: Vec::new() };
                s.tracked = tracked_peaks(&plan, &s);
                s
            });
        let mut trace = Trace { backend: "sim".into(), ..Default::default() };
        if let Ok(s) = &state {
            trace.world = s.traced.len() as u32;
            for (rank, src) in &s.traced {
                let rp = &plan.ranks[s.sim.simulated[*src] as usize];
                trace.memory.extend(persistent_events(rp, *rank));
            }
        }
        let t = &profile.topology;
        let profile_note = format!(
            "sim: profile {} ({}, {}, {}), {} GPUs per node x {} nodes, {} within a node, {} ({} NICs per node) between nodes",
            profile.name, profile.device, profile.date,
            if profile.calibrated { "calibrated" } else { "not calibrated: datasheet numbers and assumptions" },
            t.gpus_per_node, t.nodes, t.intra.as_str(), t.inter.as_str(), t.nics_per_node
        );
        let gib = |b: f64| b / (1024.0 * 1024.0 * 1024.0);
        let memory_warning = state.as_ref().ok().and_then(|s| s.tracked.iter().map(|(p, _)| *p).max()).filter(|p| *p as f64 > profile.gpu.memory_bytes).map(|peak| {
            format!(
                "the predicted peak memory, {:.1} GiB on the busiest rank, exceeds the {:.0} GiB of one {}: this layout would run out of memory there",
                gib(peak as f64), gib(profile.gpu.memory_bytes), profile.device
            )
        });
        let warnings = memory_warning.into_iter().chain(idle_rank_loads(&plan.spec, profile)).collect();
        SimRuntime { plan, opts, state, trace, steps_done: 0, simulate_s: t0.elapsed().as_secs_f64(), profile_note, warnings }
    }

    /// What the run log should say: the profile and whether it is calibrated, the cluster,
    /// how many ranks were simulated, and how long that took.
    pub fn notes(&self) -> Vec<String> {
        let mut out = vec![self.profile_note.clone()];
        match &self.state {
            Ok(s) => out.push(format!(
                "sim: simulated {} of {} ranks{} in {:.3} s; predicted step {:.3} ms",
                s.sim.simulated.len(), self.plan.world(),
                if s.sim.symmetric { " (symmetric plan: rank 0 stands for every rank)" } else { "" },
                self.simulate_s, s.sim.timeline.makespan * 1e3
            )),
            Err(e) => out.push(format!("sim: {e}")),
        }
        out.extend(self.warnings().into_iter().map(|w| format!("sim: warning: {w}")));
        out
    }

    /// Warnings about the plan on this profile: a predicted peak above the GPU's memory, a
    /// `run.rank_loads` that cannot change the prediction.
    pub fn warnings(&self) -> Vec<String> {
        self.warnings.clone()
    }

    /// The plan being simulated.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The simulation, when it succeeded.
    pub fn simulation(&self) -> Option<&PlanSimulation> {
        self.state.as_ref().ok().map(|s| &s.sim)
    }

    /// Predicted seconds of one step (the latest end over ranks).
    pub fn step_seconds(&self) -> Option<f64> {
        self.simulation().map(|s| s.timeline.makespan)
    }

    /// Append one simulated step; `measured` steps add op events and step spans. The
    /// report's `wall_s` is the predicted step time; loss, aux loss and routing counts are
    /// NaN and 0 because the simulator does no math.
    pub fn step(&mut self, measured: bool, _data_step: Option<u64>) -> Result<StepReport, BackendError> {
        if self.opts.cancel.load(Ordering::Relaxed) {
            return Err(BackendError::Cancelled);
        }
        let s = self.state.as_ref().map_err(Clone::clone)?;
        let offset = self.steps_done as u64 * s.step_ns;
        // The run's step number (warmup included), as run.log and summary.json count them.
        let step = self.steps_done as u32;
        for (rank, src) in &s.traced {
            let rp = &self.plan.ranks[s.sim.simulated[*src] as usize];
            let times = &s.sim.timeline.times[*src];
            let mut live = vec![false; rp.buffers.len()];
            let mut last_end = offset;
            for (op, t) in rp.ops.iter().zip(times) {
                let start_ns = offset + (t.start * 1e9).round() as u64;
                let end_ns = (offset + (t.end * 1e9).round() as u64).max(start_ns + 1);
                last_end = last_end.max(end_ns);
                for w in &op.writes {
                    let b = rp.buffer(*w);
                    if !b.persistent && !live[w.0 as usize] {
                        live[w.0 as usize] = true;
                        self.trace.memory.push(MemEvent { rank: *rank, t_ns: start_ns, category: b.category, delta: b.bytes() as i64 });
                    }
                }
                for f in &op.frees {
                    let b = rp.buffer(*f);
                    if live[f.0 as usize] {
                        live[f.0 as usize] = false;
                        self.trace.memory.push(MemEvent { rank: *rank, t_ns: end_ns, category: b.category, delta: -(b.bytes() as i64) });
                    }
                }
                if measured {
                    self.trace.ops.push(OpEvent {
                        rank: *rank, step, stream: op.stream, stage: op.stage, pass: op.pass, name: op.name.clone(), layer: op.layer,
                        chunk: op.chunk, start_ns, end_ns, flops: op.flops, bytes: op.bytes, collective: op.collective, host_ns: None, issue_ns: None, gemm_calls: None,
                    });
                }
            }
            if measured {
                self.trace.steps.push(StepSpan { rank: *rank, step, start_ns: offset, end_ns: last_end });
            }
        }
        let report = StepReport {
            step: self.steps_done,
            measured,
            loss: f64::NAN,
            aux_loss: f64::NAN,
            dropped: 0,
            routed: 0,
            capacity: Vec::new(),
            wall_s: s.sim.timeline.makespan,
        };
        self.steps_done += 1;
        Ok(report)
    }

    /// Everything simulated so far, as the common trace format.
    pub fn trace(&self) -> Trace {
        Trace { group_sizes: self.plan.group_sizes(), ..self.trace.clone() }
    }

    /// Predicted peak bytes per rank (every rank of the world; images of a symmetric plan
    /// share their representative's), and the per-category bytes at that moment.
    pub fn tracked_peaks(&self) -> Vec<(u64, [u64; 7])> {
        self.state.as_ref().map(|s| s.tracked.clone()).unwrap_or_default()
    }
}

fn persistent_events(rp: &RankPlan, rank: u32) -> Vec<MemEvent> {
    rp.buffers
        .iter()
        .filter(|b| b.persistent)
        .map(|b| MemEvent { rank, t_ns: 0, category: b.category, delta: b.bytes() as i64 })
        .collect()
}

/// Replay one simulated step's allocations in time order for every simulated rank, and
/// give every rank of the world its representative's peak.
fn tracked_peaks(plan: &Plan, s: &Simulated) -> Vec<(u64, [u64; 7])> {
    let per_sim: Vec<(u64, [u64; 7])> = s
        .sim
        .simulated
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let rp = &plan.ranks[*r as usize];
            let times = &s.sim.timeline.times[i];
            let mut events: Vec<(u64, bool, usize, i64)> = Vec::new();
            let mut live = vec![false; rp.buffers.len()];
            for (op, t) in rp.ops.iter().zip(times) {
                let (a, e) = ((t.start * 1e9).round() as u64, (t.end * 1e9).round() as u64);
                for w in &op.writes {
                    let b = rp.buffer(*w);
                    if !b.persistent && !live[w.0 as usize] {
                        live[w.0 as usize] = true;
                        events.push((a, true, b.category.index(), b.bytes() as i64));
                    }
                }
                for f in &op.frees {
                    if live[f.0 as usize] {
                        live[f.0 as usize] = false;
                        let b = rp.buffer(*f);
                        events.push((e.max(a + 1), false, b.category.index(), -(b.bytes() as i64)));
                    }
                }
            }
            // Frees at a moment come before allocations at the same moment (a buffer released
            // by one op's end is reusable by the next op's start).
            events.sort_by_key(|(t, alloc, _, _)| (*t, *alloc));
            let mut cur = [0i64; 7];
            for b in rp.buffers.iter().filter(|b| b.persistent) {
                cur[b.category.index()] += b.bytes() as i64;
            }
            let total = |c: &[i64; 7]| c.iter().sum::<i64>().max(0) as u64;
            let snap = |c: &[i64; 7]| c.map(|v| v.max(0) as u64);
            let mut best = (total(&cur), snap(&cur));
            for (_, _, cat, d) in events {
                cur[cat] += d;
                if total(&cur) > best.0 {
                    best = (total(&cur), snap(&cur));
                }
            }
            best
        })
        .collect();
    if s.sim.symmetric {
        vec![per_sim[0]; plan.world()]
    } else {
        per_sim
    }
}
