//! Tutel (Hwang et al., "Tutel: Adaptive Mixture-of-Experts at Scale", arXiv 2206.03382;
//! code: microsoft/tutel): the top-k MoE layer with an adaptive pipelining degree and a
//! choice of all-to-all algorithm.
//!
//! - Pipelining degree d (`[tutel] degree`): the kept rows of every (source rank, expert)
//!   block are split into d chunks, each a full all-to-all, and chunk i+1's all-to-all is
//!   issued before chunk i's expert compute (reversed roles in backward). This is MPMoE's
//!   chunked dispatch ([`super::mpmoe::build_with`]) without memory reuse: Tutel keeps every
//!   chunk's buffers. `degree = "auto"` is resolved by `crate::run`, which times the
//!   candidates on the real backend before the measured steps; a plan built directly from an
//!   `"auto"` spec uses [`AUTO_PLAN_DEGREE`].
//! - 2D hierarchical all-to-all (`a2a = "2d"`, `gpus_per_node`): each chunk all-to-all is one
//!   [`OpKind::AllToAllV2d`] over two sub-groups of the expert-parallel group, the ranks of one
//!   node and the same-local-index ranks of every node. When the group is one node or every
//!   node has one rank, Tutel falls back to the flat all-to-all, and so does this builder.
//!
//! - Parallelism r (`r = 0 | 1`): r = 1 is the expert-parallel execution above; r = 0 runs
//!   the same parameter layout data-parallel (`dp.rs`: all-gather the expert weights over the
//!   expert-parallel group, all experts local, reduce-scatter the expert gradients).
//!
//! - Per layer (`layers = [{ r, degree }, ...]`, `per_layer.rs`): each MoE layer runs its own
//!   r and degree over the same parameter layout; `parallelism = "auto"` picks them per layer
//!   from the timed candidates.
//!
//! - Expert-parallel world above the experts (`layout.ep = E * s`, `sharded.rs`): each expert
//!   is split over s members by hidden slices, one layout for every r in 1..=s (r | s): tokens
//!   travel r times, groups of s / r members all-gather their slices, the r partial outputs
//!   are summed after the return all-to-all; r = 0 all-gathers every slice (`dp.rs`).
//!
//! Parameters, names and init streams are top-k's, so every degree and algorithm computes
//! exactly the single-rank top-k function and drops the same tokens.

mod dp;
mod per_layer;
mod sharded;

use super::mpmoe::{build_with, Pipeline};
use super::DataExpertGroups;
use crate::plan::{BufId, Group, GroupId, OpKind, Plan, RankBuilder};
use crate::spec::{A2aKind, Degree, ExperimentSpec, Reuse};
use crate::taxonomy::{Pass, Stage};

/// The degree a plan uses when built directly from a `degree = "auto"` spec (outside `run`).
pub const AUTO_PLAN_DEGREE: usize = 2;

/// Build the Tutel plan for every rank.
pub fn build(spec: &ExperimentSpec) -> Plan {
    let opts = spec.tutel.clone().unwrap_or_default();
    if !opts.layers.is_empty() {
        let (dp, ep) = (spec.layout.dp, spec.layout.ep);
        let mut groups = DataExpertGroups::new(dp, ep);
        let gpn = opts.gpus_per_node;
        let two_d = opts.a2a == A2aKind::TwoD && gpn > 1 && gpn < ep && ep.is_multiple_of(gpn);
        if two_d {
            add_2d_groups(&mut groups, dp, ep, gpn);
        }
        return per_layer::build(spec, &groups, &opts.layers, two_d.then_some(gpn));
    }
    if opts.r == 0 {
        return dp::build(spec);
    }
    if spec.layout.ep > spec.model.n_experts {
        return sharded::build(spec, opts.r);
    }
    let (dp, ep) = (spec.layout.dp, spec.layout.ep);
    let mut groups = DataExpertGroups::new(dp, ep);
    let gpn = opts.gpus_per_node;
    let two_d = opts.a2a == A2aKind::TwoD && gpn > 1 && gpn < ep && ep.is_multiple_of(gpn);
    if two_d {
        add_2d_groups(&mut groups, dp, ep, gpn);
    }
    build_with(spec, &groups, Pipeline { chunks: planned_degree(spec, opts.degree), reuse: Reuse::None, gpus_per_node: two_d.then_some(gpn) })
}

/// The pipelining degree a plan built from `spec` runs: an unresolved `"auto"` is
/// [`AUTO_PLAN_DEGREE`] (at most the tokens per rank).
pub(super) fn planned_degree(spec: &ExperimentSpec, degree: Degree) -> usize {
    match degree {
        Degree::Fixed(d) => d.max(1),
        Degree::Auto => AUTO_PLAN_DEGREE.min(spec.tokens_per_rank()),
    }
}

fn node_group_name(d: usize, n: usize) -> String {
    format!("ep{d}.node{n}")
}

fn rail_group_name(d: usize, g: usize) -> String {
    format!("ep{d}.local{g}")
}

/// Append the 2D all-to-all's sub-groups of every expert-parallel group `ep{d}` (consecutive
/// ranks `d*ep ..`): `ep{d}.node{n}`, the `gpn` ranks of node n, and `ep{d}.local{g}`, the
/// ranks with local index g on every node, in node order.
pub(super) fn add_2d_groups(groups: &mut DataExpertGroups, dp: usize, ep: usize, gpn: usize) {
    let nodes = ep / gpn;
    for d in 0..dp {
        let base = d * ep;
        for n in 0..nodes {
            let ranks = (0..gpn).map(|g| (base + n * gpn + g) as u32).collect();
            groups.groups.push(Group { name: node_group_name(d, n), ranks });
        }
        for g in 0..gpn {
            let ranks = (0..nodes).map(|n| (base + n * gpn + g) as u32).collect();
            groups.groups.push(Group { name: rail_group_name(d, g), ranks });
        }
    }
}

fn group_id(groups: &DataExpertGroups, name: &str) -> GroupId {
    let i = groups.groups.iter().position(|g| g.name == name).expect("2D groups were added for this plan");
    GroupId(i as u32)
}

/// A 2D hierarchical all-to-all of `send` (per-peer row counts `counts`) into `recv` over
/// `rank`'s expert-parallel group; the planned bytes count both phases (each row crosses at
/// most two links).
#[allow(clippy::too_many_arguments)]
pub(super) fn a2a_2d(b: &mut RankBuilder, name: &str, pass: Pass, groups: &DataExpertGroups, rank: usize, gpn: usize, send: BufId,
    counts: BufId, recv: BufId, m: usize) {
    let group = groups.ep_group(rank);
    let ep_ranks = groups.ranks(group);
    let ep = ep_ranks.len();
    let d = rank / ep;
    let idx = rank % ep;
    let intra = group_id(groups, &node_group_name(d, idx / gpn));
    let inter = group_id(groups, &rail_group_name(d, idx % gpn));
    let bytes = 2 * b.f32_bytes_of(send);
    b.op(name, Stage::AllToAll, pass,
        OpKind::AllToAllV2d { group, intra, inter, send, send_counts: counts, recv, row_len: m, gpus_per_node: gpn }, 0, bytes);
}
