//! DGMoE: dual top-1 gating (Cai et al., arXiv 2404.05019), the paper's partial decoupling
//! step towards ScMoE. Instead of one top-2 gate on one representation, every token is routed
//! by two top-1 gates into the same experts: one over the shortcut `x_prev` (block `l-1`'s
//! `x_attn`, the block's own input for `l = 0`), whose all-to-all overlaps this block's
//! attention, and one over the current representation, whose dispatch cannot overlap.
//!
//! ```text
//! x_attn = x + Attn(LN(x))
//! x_cur  = x_attn (+ DenseMLP(LN(x_attn)) when the backbone has one)
//! out    = x_cur + MoE_sc(LN_sc(x_prev)) + MoE_cur(LN_cur(x_cur))    (shared experts)
//! ```
//!
//! Op order per layer: shortcut LN/gate/route/dispatch and its all-to-all; attention (and the
//! dense MLP); current LN/gate/route/dispatch and its all-to-all; shortcut experts (while the
//! current dispatch all-to-all is in flight) and the shortcut combine all-to-all; current
//! experts (while that is in flight) and the current combine all-to-all (exposed); the two
//! combines. `model.top_k = 2` counts both choices; each gate has capacity
//! `ceil(cf * 1 * T_global / E)`. The shared experts' weight gradients are the sum of both
//! branches' (the shortcut branch adds into what the current branch wrote).

use super::blocks::{self, AttnSaved, MlpSaved};
use super::scmoe::{
    combine, combine_bwd, experts, experts_bwd, load_batch, loss, route_bwd, route_dispatch, shortcut_ln_bwd, ExpertParams, ExpertsOut,
    Routed,
};
use super::{DataExpertGroups, PlanError};
use crate::plan::{BufId, Plan, RankBuilder, RankPlan};
use crate::spec::{ExperimentSpec, Mode};

/// Build the DGMoE plan for every rank.
pub fn build(spec: &ExperimentSpec) -> Result<Plan, PlanError> {
    let (heads, d_mlp) = spec.model.backbone.as_ref().map_or((0, 0), |bb| (bb.n_heads, bb.d_mlp));
    if heads == 0 {
        return Err(PlanError::Invalid("variant dgmoe needs attention in every block (model.backbone.n_heads = 0)".into()));
    }
    if spec.model.top_k != 2 {
        return Err(PlanError::Invalid(format!(
            "variant dgmoe routes every token with two top-1 gates, so model.top_k must be 2 (it is {})",
            spec.model.top_k
        )));
    }
    let groups = DataExpertGroups::new(spec.layout.dp, spec.layout.ep);
    let ranks = (0..spec.world()).map(|r| build_rank(spec, &groups, r, heads, d_mlp)).collect();
    Ok(Plan { spec: spec.clone(), groups: groups.groups.clone(), ranks })
}

/// What one DGMoE block's backward needs.
struct Layer {
    sc: Routed,
    cur: Routed,
    e_sc: ExpertsOut,
    e_cur: ExpertsOut,
    weights: ExpertParams,
    attn: AttnSaved,
    mlp: Option<MlpSaved>,
}

fn build_rank(spec: &ExperimentSpec, groups: &DataExpertGroups, rank: usize, heads: usize, d_mlp: usize) -> RankPlan {
    let training = spec.run.mode == Mode::Training;
    let mut b = RankBuilder::new(rank as u32, training, spec.model.dtype.size());
    let (x0, target) = load_batch(&mut b, spec, rank);
    let (t, m) = (spec.tokens_per_rank(), spec.model.d_model);

    let mut x = x0;
    let mut shortcut = x0;
    let mut layers: Vec<Layer> = Vec::new();
    for layer in 0..spec.model.n_layers {
        b.set_layer(Some(layer as u32));
        // The shortcut gate's dispatch all-to-all is issued before attention and overlaps it.
        let sc = route_dispatch(&mut b, spec, groups, rank, layer, "sc_", 1, shortcut);
        let (x_attn, attn) = blocks::attention(&mut b, spec, layer, x, heads);
        let (x_cur, mlp) = if d_mlp > 0 {
            let (out, s) = blocks::dense_mlp(&mut b, spec, layer, x_attn, d_mlp);
            (out, Some(s))
        } else {
            (x_attn, None)
        };
        // The current gate needs this block's output so far: its dispatch cannot overlap it.
        let cur = route_dispatch(&mut b, spec, groups, rank, layer, "cur_", 1, x_cur);
        let weights = ExpertParams::new(&mut b, spec, layer, &sc.dims);
        let e_sc = experts(&mut b, spec, groups, rank, layer, &sc, &weights);
        let e_cur = experts(&mut b, spec, groups, rank, layer, &cur, &weights);
        let mid = combine(&mut b, &sc, &e_sc, x_cur, format!("L{layer}.sc_moe.out"));
        x = combine(&mut b, &cur, &e_cur, mid, format!("L{layer}.moe.out"));
        shortcut = x_attn;
        layers.push(Layer { sc, cur, e_sc, e_cur, weights, attn, mlp });
    }
    let dy = loss(&mut b, spec, x, target);

    if let Some(mut grad) = dy {
        // As in ScMoE: the shortcut branch of layer l + 1 finishes its LayerNorm backward
        // inside layer l's, adding into d(x_attn).
        let mut pending: Option<(usize, BufId)> = None;
        for (layer, s) in layers.iter().enumerate().rev() {
            b.set_layer(Some(layer as u32));
            let cg_cur = combine_bwd(&mut b, groups, rank, layer, &s.cur, &s.e_cur, grad);
            let cg_sc = combine_bwd(&mut b, groups, rank, layer, &s.sc, &s.e_sc, grad);
            let dsend_cur = experts_bwd(&mut b, spec, groups, rank, layer, &s.cur, &s.e_cur, &s.weights, false, cg_cur.dback);
            let dsend_sc = experts_bwd(&mut b, spec, groups, rank, layer, &s.sc, &s.e_sc, &s.weights, true, cg_sc.dback);
            let dxm_cur = route_bwd(&mut b, spec, layer, &s.cur, dsend_cur, cg_cur.dweights);
            let mut d_attn = shortcut_ln_bwd(&mut b, layer, &s.cur, dxm_cur, grad, t, m);
            if let Some(mlp) = &s.mlp {
                d_attn = blocks::dense_mlp_bwd(&mut b, spec, layer, mlp, d_attn);
            }
            if let Some((next, dxm)) = pending.take() {
                d_attn = shortcut_ln_bwd(&mut b, next, &layers[next].sc, dxm, d_attn, t, m);
                b.set_layer(Some(layer as u32));
            }
            grad = blocks::attention_bwd(&mut b, spec, layer, &s.attn, d_attn);
            let dxm_sc = route_bwd(&mut b, spec, layer, &s.sc, dsend_sc, cg_sc.dweights);
            pending = Some((layer, dxm_sc));
        }
        if let Some((first, dxm)) = pending {
            shortcut_ln_bwd(&mut b, first, &layers[first].sc, dxm, grad, t, m);
        }
        let dense = (spec.world() > 1).then(|| groups.world());
        let expert = (spec.layout.dp > 1).then(|| groups.edp_group(rank));
        blocks::update(&mut b, spec, dense, expert);
    }
    b.finish()
}
