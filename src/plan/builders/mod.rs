//! Plan builders, one per variant. [`build`] picks the builder named by the spec.

mod blocks;
mod mpmoe;
mod topk;
mod scmoe;
mod dgmoe;

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

/// Build the plan for a validated spec.
pub fn build(spec: &ExperimentSpec) -> Result<Plan, PlanError> {
    match spec.variant {
        Variant::Topk => Ok(topk::build(spec)),
        Variant::Mpmoe => Ok(mpmoe::build(spec)),
        Variant::Scmoe => scmoe::build(spec),
        Variant::Dgmoe => dgmoe::build(spec),
        other => Err(PlanError::Unimplemented(other.as_str())),
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
