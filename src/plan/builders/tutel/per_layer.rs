//! Tutel with a choice per MoE layer (`[tutel] layers`): every layer runs with its own
//! parallelism r (1: expert parallel with pipelining degree d, the MPMoE-style chunked
//! dispatch; 0: data parallel, `dp.rs`) over the one expert-parallel parameter layout, so
//! neighbouring layers may differ and switching between them moves no tensors. Parameter
//! names, init streams and the gradient reduction are those of every other Tutel plan.

use super::super::mpmoe::{self, Pipeline};
use super::super::{blocks, DataExpertGroups};
use super::dp;
use crate::plan::{BufId, Plan, RankBuilder, RankPlan};
use crate::spec::{ExperimentSpec, Reuse, TutelLayer};

/// Build the per-layer plan for every rank; `gpus_per_node` is `Some` when r = 1 layers use
/// the 2D all-to-all (its groups are in `groups`).
pub(super) fn build(spec: &ExperimentSpec, groups: &DataExpertGroups, layers: &[TutelLayer], gpus_per_node: Option<usize>) -> Plan {
    let ranks = (0..spec.world()).map(|r| build_rank(spec, groups, r, layers, gpus_per_node)).collect();
    Plan { spec: spec.clone(), groups: groups.groups.clone(), ranks }
}

/// What a layer's backward needs, by the execution its layer chose.
enum Saved {
    Ep(mpmoe::MoeSaved),
    Dp(dp::MoeSaved),
}

struct Sublayer<'a> {
    spec: &'a ExperimentSpec,
    groups: &'a DataExpertGroups,
    rank: usize,
    layers: &'a [TutelLayer],
    gpus_per_node: Option<usize>,
}

impl Sublayer<'_> {
    fn pipeline(&self, layer: usize) -> Pipeline {
        Pipeline { chunks: self.layers[layer].degree.max(1), reuse: Reuse::None, gpus_per_node: self.gpus_per_node }
    }
}

impl blocks::MoeSublayer for Sublayer<'_> {
    type Saved = Saved;
    fn forward(&mut self, b: &mut RankBuilder, layer: usize, x: BufId) -> (BufId, Saved) {
        if self.layers[layer].r == 0 {
            let (y, s) = dp::moe_forward(b, self.spec, self.groups, self.rank, layer, x);
            (y, Saved::Dp(s))
        } else {
            let (y, s) = mpmoe::moe_forward(b, self.spec, self.groups, self.rank, layer, x, self.pipeline(layer));
            (y, Saved::Ep(s))
        }
    }
    fn backward(&mut self, b: &mut RankBuilder, layer: usize, s: &Saved, dout: BufId) -> BufId {
        match s {
            Saved::Dp(s) => dp::moe_backward(b, self.spec, self.groups, self.rank, layer, s, dout),
            Saved::Ep(s) => mpmoe::moe_backward(b, self.spec, self.groups, self.rank, layer, s, dout, self.pipeline(layer)),
        }
    }
}

fn build_rank(spec: &ExperimentSpec, groups: &DataExpertGroups, rank: usize, layers: &[TutelLayer], gpus_per_node: Option<usize>) -> RankPlan {
    blocks::expert_parallel_rank(spec, groups, rank, &mut Sublayer { spec, groups, rank, layers, gpus_per_node })
}
