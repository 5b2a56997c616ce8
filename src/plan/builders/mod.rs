//! Plan builders, one per variant. [`build`] picks the builder named by the spec.

mod blocks;
mod pipeline;
mod tensor;
mod mpmoe;
mod topk;
mod scmoe;
mod dgmoe;
mod tutel;
mod ted;
mod ppmoe;

use super::{Group, GroupId, Plan};
use crate::spec::{ExperimentSpec, Variant};

/// Why a plan could not be built from a (validated) spec.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The variant has no builder in this build.
    #[error("variant {0:?} has no plan builder yet; use variant = \"topk\"")]
    Unimplemented(&'static str),
    /// The spec breaks a structural rule of the variant (spec validation reports it first).
    #[error("{0}; check the experiment with `moelab validate`")]
    Invalid(String),
}

/// What a plan built directly from a spec with an automatic choice (MPMoE's `chunks` or
/// `reuse`, Tutel's `degree` or `parallelism` = "auto") runs in its place, for views that
/// plan or predict such a spec without running it (`moelab plan`, the workbench composer):
/// `None` when the spec asks for no choice. `moelab run` resolves the choice first.
pub fn auto_stand_in(spec: &ExperimentSpec) -> Option<String> {
    use crate::spec::{Degree, ParallelismChoice, Reuse};
    match spec.variant {
        Variant::Mpmoe => {
            let o = spec.mpmoe.as_ref().filter(|o| o.chunks == Degree::Auto || o.reuse == Reuse::Auto)?;
            let (chunks, reuse) = mpmoe::planned(o);
            Some(format!(
                "mpmoe auto: planned with chunks={chunks}, reuse={}; a run profiles the candidates first and runs the one it picks (its run log and summary.json name it)",
                reuse.as_str()
            ))
        }
        Variant::Tutel => {
            let o = spec.tutel.as_ref().filter(|o| o.degree == Degree::Auto || o.parallelism == ParallelismChoice::Auto)?;
            let degree = tutel::planned_degree(spec, o.degree);
            Some(format!(
                "tutel auto: planned with r={}, degree {degree}; a run times the candidates first and runs the fastest (its run log and summary.json name it)",
                o.r
            ))
        }
        _ => None,
    }
}

/// Build the plan for a validated spec.
pub fn build(spec: &ExperimentSpec) -> Result<Plan, PlanError> {
    match spec.variant {
        Variant::Topk => Ok(topk::build(spec)),
        Variant::Mpmoe => Ok(mpmoe::build(spec)),
        Variant::Scmoe => scmoe::build(spec),
        Variant::Dgmoe => dgmoe::build(spec),
        Variant::Tutel => Ok(tutel::build(spec)),
        Variant::Ted => Ok(ted::build(spec)),
        Variant::Ppmoe => Ok(ppmoe::build(spec)),
    }
}

/// Process groups of a `dp x ep` layout (tp = pp = 1): expert-parallel groups are
/// consecutive ranks, expert-data-parallel groups are strided by `ep`.
#[derive(Debug, Clone)]
pub struct DataExpertGroups {
    /// All groups, indexable by [`GroupId`].
    pub groups: Vec<Group>,
    ep: usize,
    dp: usize,
}

impl DataExpertGroups {
    /// Groups for `dp * ep` ranks.
    pub fn new(dp: usize, ep: usize) -> Self {
        let world = dp * ep;
        let mut groups = vec![Group { name: "world".into(), ranks: (0..world as u32).collect() }];
        for d in 0..dp {
            groups.push(Group { name: format!("ep{d}"), ranks: (d * ep..(d + 1) * ep).map(|r| r as u32).collect() });
        }
        for e in 0..ep {
            groups.push(Group { name: format!("edp{e}"), ranks: (0..dp).map(|d| (d * ep + e) as u32).collect() });
        }
        DataExpertGroups { groups, ep, dp }
    }
    /// The group of all ranks.
    pub fn world(&self) -> GroupId {
        GroupId(0)
    }
    /// The expert-parallel group of `rank`.
    pub fn ep_group(&self, rank: usize) -> GroupId {
        GroupId((1 + rank / self.ep) as u32)
    }
    /// The ranks holding the same experts as `rank`.
    pub fn edp_group(&self, rank: usize) -> GroupId {
        GroupId((1 + self.dp + rank % self.ep) as u32)
    }
    /// Members of a group.
    pub fn ranks(&self, g: GroupId) -> &[u32] {
        &self.groups[g.0 as usize].ranks
    }
}

/// Process groups of a DeepSpeed-TED `dp x ep x tp` layout: rank = shard * tp + tp index,
/// shard = d * ep + expert-parallel index. TP groups are consecutive ranks, the data-parallel
/// dimension (the `dp * ep` shards) is strided by `tp`, and expert-parallel groups are cut
/// from the data-parallel ranks of one TP index (DeepSpeed's convention).
#[derive(Debug, Clone)]
pub struct TensorExpertDataGroups {
    /// All groups, indexable by [`GroupId`].
    pub groups: Vec<Group>,
    dp: usize,
    ep: usize,
    tp: usize,
}

impl TensorExpertDataGroups {
    /// Groups for `dp * ep * tp` ranks: `world`, `tp{s}` per shard, `data.tp{i}` (every shard's
    /// rank with TP index i), `ep{d}.tp{i}` and `edp{p}.tp{i}`.
    pub fn new(dp: usize, ep: usize, tp: usize) -> Self {
        let shards = dp * ep;
        let rank = |shard: usize, i: usize| (shard * tp + i) as u32;
        let mut groups = vec![Group { name: "world".into(), ranks: (0..(shards * tp) as u32).collect() }];
        for s in 0..shards {
            groups.push(Group { name: format!("tp{s}"), ranks: (0..tp).map(|i| rank(s, i)).collect() });
        }
        for i in 0..tp {
            groups.push(Group { name: format!("data.tp{i}"), ranks: (0..shards).map(|s| rank(s, i)).collect() });
        }
        for i in 0..tp {
            for d in 0..dp {
                groups.push(Group { name: format!("ep{d}.tp{i}"), ranks: (0..ep).map(|p| rank(d * ep + p, i)).collect() });
            }
        }
        for i in 0..tp {
            for p in 0..ep {
                groups.push(Group { name: format!("edp{p}.tp{i}"), ranks: (0..dp).map(|d| rank(d * ep + p, i)).collect() });
            }
        }
        TensorExpertDataGroups { groups, dp, ep, tp }
    }
    /// Data shards (`dp * ep`): the data-parallel world for capacity.
    pub fn shards(&self) -> usize {
        self.dp * self.ep
    }
    /// The data shard `rank` holds (shared by its TP group).
    pub fn shard(&self, rank: usize) -> usize {
        rank / self.tp
    }
    /// `rank`'s index in its TP group.
    pub fn tp_index(&self, rank: usize) -> usize {
        rank % self.tp
    }
    /// The group of all ranks.
    pub fn world(&self) -> GroupId {
        GroupId(0)
    }
    /// The TP group of `rank` (consecutive ranks holding one shard).
    pub fn tp_group(&self, rank: usize) -> GroupId {
        GroupId((1 + self.shard(rank)) as u32)
    }
    /// The ranks with `rank`'s TP index, one per shard (routing stats, dense gradients).
    pub fn data_group(&self, rank: usize) -> GroupId {
        GroupId((1 + self.shards() + self.tp_index(rank)) as u32)
    }
    /// The expert-parallel group of `rank`: same TP index, consecutive shards.
    pub fn ep_group(&self, rank: usize) -> GroupId {
        let d = self.shard(rank) / self.ep;
        GroupId((1 + self.shards() + self.tp + self.tp_index(rank) * self.dp + d) as u32)
    }
    /// The ranks holding the same expert slices as `rank` (same TP and expert-parallel index).
    pub fn edp_group(&self, rank: usize) -> GroupId {
        let p = self.shard(rank) % self.ep;
        GroupId((1 + self.shards() + self.tp + self.tp * self.dp + self.tp_index(rank) * self.ep + p) as u32)
    }
    /// Members of a group.
    pub fn ranks(&self, g: GroupId) -> &[u32] {
        &self.groups[g.0 as usize].ranks
    }
}
