//! The plan alone predicts peak memory: the cpu backend's tracked peak (bytes really held)
//! equals the prediction for static-shape runs and stays under it for dropless ones.

mod common;
use common::*;
use moelab::plan::memory::predict;
use moelab::taxonomy::MemCategory;

fn check(model: &str, layout: &str, run: &str) {
    let s = spec(model, layout, run);
    let mut rt = runtime(&s, &[], false);
    for i in 0..2 {
        rt.step(i > 0, None).expect("step");
    }
    let preds: Vec<_> = rt.plan().ranks.iter().map(predict).collect();
    for (rank, (p, (peak, at_peak))) in preds.iter().zip(rt.tracked_peaks()).enumerate() {
        if p.upper_bound {
            assert!(peak <= p.peak_total, "rank {rank}: tracked {peak} over the bound {}", p.peak_total);
            assert!(peak > 0);
        } else {
            assert_eq!(peak, p.peak_total, "rank {rank}: tracked peak vs plan");
            assert_eq!(at_peak, p.at_peak, "rank {rank}: categories at peak");
        }
    }
}

#[test]
fn training_peak_matches_prediction() {
    check("tokens_per_rank = 32\nseq_len = 8\nn_layers = 2\n[model.backbone]\nn_heads = 2\nd_mlp = 16", "ep = 4", "");
}

#[test]
fn dp_ep_training_peak_matches_prediction() {
    check("tokens_per_rank = 32\nn_layers = 2\ncapacity_factor = 0.75", "dp = 2\nep = 2", "");
}

#[test]
fn inference_peak_matches_prediction() {
    check("tokens_per_rank = 32\nn_layers = 3", "ep = 2", "mode = \"inference\"");
}

#[test]
fn dropless_peak_is_bounded_by_prediction() {
    check("tokens_per_rank = 32\nn_layers = 2\ndropless = true", "ep = 2", "");
}

#[test]
fn inference_holds_no_grads_or_optimizer_state() {
    let s = spec("tokens_per_rank = 32\nn_layers = 2", "ep = 2", "mode = \"inference\"");
    let plan = moelab::plan::Plan::build(&s).unwrap();
    let p = predict(&plan.ranks[0]);
    assert_eq!(p.max_per_category[MemCategory::Grads.index()], 0);
    assert_eq!(p.max_per_category[MemCategory::OptimizerState.index()], 0);
    assert!(p.max_per_category[MemCategory::Params.index()] > 0);
    // Training adds a grad and two Adam moments per parameter: 3x the params.
    let t = spec("tokens_per_rank = 32\nn_layers = 2", "ep = 2", "");
    let tp = predict(&moelab::plan::Plan::build(&t).unwrap().ranks[0]);
    let params = tp.max_per_category[MemCategory::Params.index()];
    assert_eq!(tp.max_per_category[MemCategory::Grads.index()], params);
    assert_eq!(tp.max_per_category[MemCategory::OptimizerState.index()], 2 * params);
}

#[test]
fn expert_parallelism_splits_expert_params() {
    let one = spec("tokens_per_rank = 32", "", "");
    let four = spec("tokens_per_rank = 32", "ep = 4", "");
    let p1 = moelab::plan::Plan::build(&one).unwrap();
    let p4 = moelab::plan::Plan::build(&four).unwrap();
    let expert_bytes = |p: &moelab::plan::Plan| -> u64 {
        p.ranks[0].params.iter().filter(|x| x.expert).map(|x| p.ranks[0].buffer(x.value).bytes()).sum()
    };
    assert_eq!(expert_bytes(&p1), 4 * expert_bytes(&p4));
}
