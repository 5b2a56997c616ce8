//! Gating, capacity dropping and the aux loss against a direct, loop-by-loop reference.

use moelab::math::routing::{keep_mask, local_stats, softmax_rows, top_k, RoutingTable};
use moelab::spec::Capacity;
use proptest::prelude::*;

/// Direct GShard reference over the global batch: positions assigned choice-major, then
/// token order (ranks concatenated), drop at capacity.
fn reference(probs: &[f32], e: usize, k: usize, cf: Option<f64>) -> (Vec<i32>, Vec<bool>, f64) {
    let n = probs.len() / e;
    let mut idx = vec![0i32; n * k];
    for t in 0..n {
        let row = &probs[t * e..(t + 1) * e];
        let mut taken = vec![false; e];
        for j in 0..k {
            let mut best = usize::MAX;
            for x in 0..e {
                if !taken[x] && (best == usize::MAX || row[x] > row[best]) {
                    best = x;
                }
            }
            taken[best] = true;
            idx[t * k + j] = best as i32;
        }
    }
    let mut load = vec![0usize; e];
    for &x in &idx {
        load[x as usize] += 1;
    }
    let cap = match cf {
        Some(cf) => ((cf * (k * n) as f64 / e as f64).ceil() as usize).max(1),
        None => *load.iter().max().unwrap(),
    };
    let mut fill = vec![0usize; e];
    let mut keep = vec![false; n * k];
    for j in 0..k {
        for t in 0..n {
            let x = idx[t * k + j] as usize;
            keep[t * k + j] = fill[x] < cap;
            fill[x] += 1;
        }
    }
    let aux: f64 = (0..e)
        .map(|x| {
            let p: f64 = (0..n).map(|t| probs[t * e + x] as f64).sum::<f64>() / n as f64;
            let f = load[x] as f64 / (n * k) as f64;
            e as f64 * p * f
        })
        .sum();
    (idx, keep, aux)
}

fn check(logits: &[f32], e: usize, k: usize, ranks: usize, cf: Option<f64>) {
    let n = logits.len() / e;
    let t = n / ranks;
    let mut probs = vec![0.0; logits.len()];
    softmax_rows(logits, &mut probs, e);
    let (ref_idx, ref_keep, ref_aux) = reference(&probs, e, k, cf);
    let mut gathered = Vec::new();
    let mut idx_all = Vec::new();
    for r in 0..ranks {
        let p = &probs[r * t * e..(r + 1) * t * e];
        let mut idx = vec![0; t * k];
        let mut w = vec![0.0; t * k];
        top_k(p, e, k, false, &mut idx, &mut w);
        let mut st = vec![0.0; (k + 1) * e];
        local_stats(p, &idx, e, k, &mut st);
        gathered.extend(st);
        idx_all.push(idx);
    }
    let cap = match cf { Some(c) => Capacity::Factor(c), None => Capacity::Dropless };
    let table = RoutingTable::new(&gathered, ranks, k, e, t, cap);
    let mut keep_all = Vec::new();
    for (r, idx) in idx_all.iter().enumerate() {
        keep_all.extend(keep_mask(&table, r, idx, k, e));
    }
    let idx_flat: Vec<i32> = idx_all.concat();
    assert_eq!(idx_flat, ref_idx, "top-k choice");
    assert_eq!(keep_all, ref_keep, "capacity drops");
    assert!((table.aux_loss() - ref_aux).abs() < 1e-5, "aux {} vs {}", table.aux_loss(), ref_aux);
    assert_eq!(table.dropped(), ref_keep.iter().filter(|k| !**k).count());
}

proptest! {
    #[test]
    fn routing_matches_direct_reference(
        logits in proptest::collection::vec(-3.0f32..3.0, 8 * 48),
        k in 1usize..4,
        ranks in prop::sample::select(vec![1usize, 2, 4]),
        cf in prop::sample::select(vec![Some(0.5), Some(1.0), Some(1.25), None]),
    ) {
        check(&logits, 8, k, ranks, cf);
    }
}

#[test]
fn balanced_routing_has_aux_loss_one_and_no_drops() {
    // Token t prefers expert t % 4 strongly: perfectly balanced with k = 1.
    let e = 4;
    let logits: Vec<f32> = (0..16).flat_map(|t| (0..e).map(move |x| if x == t % e { 10.0 } else { 0.0 })).collect();
    check(&logits, e, 1, 2, Some(1.0));
    let mut probs = vec![0.0; logits.len()];
    softmax_rows(&logits, &mut probs, e);
    let mut idx = vec![0; 16];
    let mut w = vec![0.0; 16];
    top_k(&probs, e, 1, false, &mut idx, &mut w);
    let mut st = vec![0.0; 2 * e];
    local_stats(&probs, &idx, e, 1, &mut st);
    let t = RoutingTable::new(&st, 1, 1, e, 16, Capacity::Factor(1.0));
    assert_eq!(t.dropped(), 0);
    assert!((t.aux_loss() - 1.0).abs() < 1e-3, "aux {}", t.aux_loss());
}

#[test]
fn skewed_routing_drops_second_choices_first() {
    // Every token's first choice is expert 0; capacity 1.0 with k = 2 over 4 experts and
    // 8 tokens gives C = 4: tokens 4..8 lose their first choice.
    let e = 4;
    let logits: Vec<f32> = (0..8).flat_map(|_| [5.0, 1.0, 0.0, -1.0]).collect();
    check(&logits, e, 2, 1, Some(1.0));
    let mut probs = vec![0.0; logits.len()];
    softmax_rows(&logits, &mut probs, e);
    let mut idx = vec![0; 16];
    let mut w = vec![0.0; 16];
    top_k(&probs, e, 2, false, &mut idx, &mut w);
    let mut st = vec![0.0; 3 * e];
    local_stats(&probs, &idx, e, 2, &mut st);
    let t = RoutingTable::new(&st, 1, 2, e, 8, Capacity::Factor(1.0));
    assert_eq!(t.capacity, 4);
    let keep = keep_mask(&t, 0, &idx, 2, e);
    assert_eq!(keep.iter().filter(|k| !**k).count(), 8, "4 first and 4 second choices drop");
    assert!(keep[0] && !keep[8], "token 0 keeps its first choice, token 4 loses it");
}
