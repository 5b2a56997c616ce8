//! Gating and routing: softmax, top-k choice, the global capacity rule and the GShard
//! load-balancing loss.
//!
//! Capacity is decided over the whole global batch: assignment (choice j, rank r, token t)
//! takes global position `offset(j, r, e) + ordinal`, ordered by choice first (every token's
//! first choice beats any second choice), then rank, then token. Positions at or past the
//! capacity C drop. Any layout and any chunking therefore drops exactly the tokens that the
//! single-rank run drops.

use crate::spec::Capacity;

/// Row-wise softmax of `logits[T, E]` into `probs`.
pub fn softmax_rows(logits: &[f32], probs: &mut [f32], e: usize) {
    for (lr, pr) in logits.chunks_exact(e).zip(probs.chunks_exact_mut(e)) {
        let mx = lr.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for (p, &l) in pr.iter_mut().zip(lr) {
            *p = (l - mx).exp();
            sum += *p;
        }
        for p in pr.iter_mut() {
            *p /= sum;
        }
    }
}

/// Top-k per row of `probs[T, E]`: indices `[T, k]` in descending probability (ties go to
/// the lower expert index) and their gate weights (renormalized to sum 1 when asked).
pub fn top_k(probs: &[f32], e: usize, k: usize, renormalize: bool, idx: &mut [i32], w: &mut [f32]) {
    for (t, pr) in probs.chunks_exact(e).enumerate() {
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|&a, &b| pr[b].partial_cmp(&pr[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
        for j in 0..k {
            idx[t * k + j] = order[j] as i32;
        }
    }
    weights_of(probs, idx, e, k, renormalize, w);
}

/// The gate weights of given choices `idx[T, k]` (as [`top_k`] computes them for its own):
/// the chosen probabilities, renormalized over the k choices when `renormalize`.
pub fn weights_of(probs: &[f32], idx: &[i32], e: usize, k: usize, renormalize: bool, w: &mut [f32]) {
    for (t, pr) in probs.chunks_exact(e).enumerate() {
        let ch = &idx[t * k..(t + 1) * k];
        let sum: f32 = ch.iter().map(|&x| pr[x as usize]).sum();
        for j in 0..k {
            let p = pr[ch[j] as usize];
            w[t * k + j] = if renormalize { p / sum } else { p };
        }
    }
}

/// Local routing statistics `[(k + 1) * E]`: counts per (choice j, expert e) as f32, then
/// the sum of probabilities per expert (for the aux loss).
pub fn local_stats(probs: &[f32], idx: &[i32], e: usize, k: usize, stats: &mut [f32]) {
    stats.fill(0.0);
    for (i, &x) in idx.iter().enumerate() {
        stats[(i % k) * e + x as usize] += 1.0;
    }
    for pr in probs.chunks_exact(e) {
        for (s, p) in stats[k * e..].iter_mut().zip(pr) {
            *s += p;
        }
    }
}

/// Everything a rank needs to know about every rank's routing for one MoE layer: built from
/// the all-gathered local stats, identical on every rank.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    world: usize,
    k: usize,
    e: usize,
    /// Capacity C per expert (global).
    pub capacity: usize,
    /// Tokens in the global batch.
    pub n_global: usize,
    count: Vec<usize>,
    kept: Vec<usize>,
    prob_sum: Vec<f64>,
}

impl RoutingTable {
    /// `gathered[W * (k+1) * E]` in rank order; `tokens_per_rank` per data rank.
    pub fn new(gathered: &[f32], world: usize, k: usize, e: usize, tokens_per_rank: usize, cap: Capacity) -> Self {
        let stride = (k + 1) * e;
        let mut count = vec![0usize; world * k * e];
        let mut prob_sum = vec![0.0f64; e];
        for r in 0..world {
            for j in 0..k {
                for x in 0..e {
                    count[(r * k + j) * e + x] = gathered[r * stride + j * e + x].round() as usize;
                }
            }
            for x in 0..e {
                prob_sum[x] += gathered[r * stride + k * e + x] as f64;
            }
        }
        let n_global = world * tokens_per_rank;
        let fixed = |cf: f64| ((cf * (k * n_global) as f64 / e as f64).ceil() as usize).max(1);
        let max_load = || (0..e).map(|x| (0..world * k).map(|rj| count[rj * e + x]).sum::<usize>()).max().unwrap_or(0).max(1);
        let capacity = match cap {
            Capacity::Factor(cf) => fixed(cf),
            Capacity::Dropless => max_load(),
            Capacity::Bounded(f) => fixed(f).min(max_load()),
        };
        let mut kept = vec![0usize; world * k * e];
        for x in 0..e {
            let mut offset = 0usize;
            for j in 0..k {
                for r in 0..world {
                    let c = count[(r * k + j) * e + x];
                    kept[(r * k + j) * e + x] = c.min(capacity.saturating_sub(offset));
                    offset += c;
                }
            }
        }
        RoutingTable { world, k, e, capacity, n_global, count, kept, prob_sum }
    }
    /// Experts in the table.
    pub fn fraction_len(&self) -> usize {
        self.e
    }
    /// Assignments of rank r's tokens, choice j, to expert e that stay (within capacity).
    pub fn kept(&self, r: usize, j: usize, e: usize) -> usize {
        self.kept[(r * self.k + j) * self.e + e]
    }
    /// Assignments of rank r's tokens, choice j, to expert e before dropping.
    pub fn count(&self, r: usize, j: usize, e: usize) -> usize {
        self.count[(r * self.k + j) * self.e + e]
    }
    /// Rows rank r sends to expert e (all choices).
    pub fn kept_rank_expert(&self, r: usize, e: usize) -> usize {
        (0..self.k).map(|j| self.kept(r, j, e)).sum()
    }
    /// Assignments routed to expert e before dropping, over the whole batch.
    pub fn load(&self, e: usize) -> usize {
        (0..self.world * self.k).map(|rj| self.count[rj * self.e + e]).sum()
    }
    /// Assignments dropped over the whole batch.
    pub fn dropped(&self) -> usize {
        self.count.iter().sum::<usize>() - self.kept.iter().sum::<usize>()
    }
    /// f_e: fraction of all k * N assignments routed to expert e (before dropping).
    pub fn fraction(&self, e: usize) -> f64 {
        self.load(e) as f64 / (self.k * self.n_global) as f64
    }
    /// P_e: mean gate probability of expert e over the global batch.
    pub fn mean_prob(&self, e: usize) -> f64 {
        self.prob_sum[e] / self.n_global as f64
    }
    /// GShard/Switch load-balancing loss `E * sum_e P_e f_e` (1.0 when perfectly balanced).
    pub fn aux_loss(&self) -> f64 {
        (0..self.e).map(|x| self.e as f64 * self.mean_prob(x) * self.fraction(x)).sum()
    }
}

/// What a device needs to place rank `r`'s kept assignments without seeing the others: per
/// expert x the kept rows of the experts before it (`tab[x]`), then per q = j * e + x the
/// assignments of x with choice < j, the kept ones among them and the kept ones of choice j
/// (`tab[e + 3 q ..]`); and the kept rows per expert. The cuda executor's `dispatch_slots`
/// kernel reads it; the slots it gives are Dispatch's (choice-major, then token order).
pub fn dispatch_table(table: &RoutingTable, r: usize) -> (Vec<i32>, Vec<usize>) {
    let (k, e) = (table.k, table.e);
    let mut tab = vec![0i32; e + 3 * k * e];
    let mut per_expert = vec![0usize; e];
    let mut base = 0usize;
    for x in 0..e {
        tab[x] = base as i32;
        let (mut before, mut kept_before) = (0usize, 0usize);
        for j in 0..k {
            let q = e + 3 * (j * e + x);
            let kept = table.kept(r, j, x);
            tab[q] = before as i32;
            tab[q + 1] = kept_before as i32;
            tab[q + 2] = kept as i32;
            before += table.count(r, j, x);
            kept_before += kept;
        }
        per_expert[x] = kept_before;
        base += kept_before;
    }
    (tab, per_expert)
}

/// Which assignments of one rank stay: `slot_keep[t * k + j]` is true when kept. Kept
/// assignments are, per (j, e), the first `kept(r, j, e)` tokens in token order.
pub fn keep_mask(table: &RoutingTable, rank: usize, idx: &[i32], k: usize, e: usize) -> Vec<bool> {
    let mut seen = vec![0usize; k * e];
    let mut keep = Vec::with_capacity(idx.len());
    for choices in idx.chunks(k.max(1)) {
        for (j, &x) in choices.iter().enumerate() {
            let slot = j * e + x as usize;
            let ord = seen[slot];
            seen[slot] += 1;
            keep.push(ord < table.kept(rank, j, x as usize));
        }
    }
    keep
}

/// Gradient of `aux_coef * aux_loss` with respect to each gate probability of any token:
/// `coef * E * f_e / N` (f_e, the routed fraction, is a count and carries no gradient).
pub fn aux_grad(table: &RoutingTable, aux_coef: f32) -> Vec<f32> {
    let e = table.fraction_len();
    (0..e).map(|x| (aux_coef as f64 * e as f64 * table.fraction(x) / table.n_global as f64) as f32).collect()
}

/// Backward of softmax + top-k + aux loss: `dlogits[T, E]` from `dw[T, k]`.
/// The aux term's gradient flows through P_e only (f_e counts are not differentiable).
#[allow(clippy::too_many_arguments)]
pub fn route_backward(
    probs: &[f32],
    idx: &[i32],
    dw: &[f32],
    e: usize,
    k: usize,
    renormalize: bool,
    aux_coef: f32,
    table: &RoutingTable,
    dlogits: &mut [f32],
) {
    route_backward_with(probs, idx, dw, e, k, renormalize, &aux_grad(table, aux_coef), dlogits);
}

/// [`route_backward`] with the aux term's gradient per probability given (`aux_grad[e]`, as
/// the cuda `route_bwd` kernel takes it).
#[allow(clippy::too_many_arguments)]
pub fn route_backward_with(probs: &[f32], idx: &[i32], dw: &[f32], e: usize, k: usize, renormalize: bool, aux_grad: &[f32], dlogits: &mut [f32]) {
    let mut dp = vec![0.0f32; e];
    for (t, (pr, dl)) in probs.chunks_exact(e).zip(dlogits.chunks_exact_mut(e)).enumerate() {
        dp.copy_from_slice(aux_grad);
        let sel = &idx[t * k..(t + 1) * k];
        let dws = &dw[t * k..(t + 1) * k];
        if renormalize {
            let s: f32 = sel.iter().map(|&x| pr[x as usize]).sum();
            let dot: f32 = sel.iter().zip(dws).map(|(&x, &g)| g * pr[x as usize] / s).sum();
            for (&x, &g) in sel.iter().zip(dws) {
                dp[x as usize] += (g - dot) / s;
            }
        } else {
            for (&x, &g) in sel.iter().zip(dws) {
                dp[x as usize] += g;
            }
        }
        let inner: f32 = pr.iter().zip(&dp).map(|(p, d)| p * d).sum();
        for ((d, p), g) in dl.iter_mut().zip(pr).zip(&dp) {
            *d = p * (g - inner);
        }
    }
}

/// Rows of chunk `g` of `n` within a block of `len` kept rows: `[len*g/n, len*(g+1)/n)`.
/// The chunks of a block tile it in order, and their sizes differ by at most one.
pub fn chunk_range(len: usize, g: usize, n: usize) -> std::ops::Range<usize> {
    len * g / n..len * (g + 1) / n
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slot of every assignment and the token of every slot as the cpu Dispatch places
    /// them: kept assignments grouped by expert, choice-major, then token order.
    fn host_slots(table: &RoutingTable, r: usize, idx: &[i32], k: usize, e: usize) -> (Vec<i32>, Vec<usize>) {
        let t = idx.len() / k;
        let keep = keep_mask(table, r, idx, k, e);
        let mut order: Vec<usize> = (0..idx.len()).filter(|&a| keep[a]).collect();
        order.sort_by_key(|&a| (idx[a], a % k, a / k));
        let mut slots = vec![-1i32; t * k];
        for (s, &a) in order.iter().enumerate() {
            slots[a] = s as i32;
        }
        (slots, order.iter().map(|&a| a / k).collect())
    }

    /// What the `dispatch_slots` kernel computes from `dispatch_table`, one expert at a time.
    fn table_slots(tab: &[i32], idx: &[i32], k: usize, e: usize, total: usize) -> (Vec<i32>, Vec<usize>) {
        let t = idx.len() / k;
        let (mut slots, mut map) = (vec![-1i32; t * k], vec![usize::MAX; total]);
        for x in 0..e {
            let mut rank = 0i32;
            for j in 0..k {
                for tok in 0..t {
                    let a = tok * k + j;
                    if idx[a] as usize != x {
                        continue;
                    }
                    let q = e + 3 * (j * e + x);
                    let r = rank - tab[q];
                    if r < tab[q + 2] {
                        let s = (tab[x] + tab[q + 1] + r) as usize;
                        slots[a] = s as i32;
                        map[s] = tok;
                    }
                    rank += 1;
                }
            }
        }
        (slots, map)
    }

    #[test]
    fn the_dispatch_table_places_every_rank_s_assignments_as_the_host_rule_does() {
        let (world, t, k, e) = (3usize, 37usize, 2usize, 5usize);
        let mut seed = 12345u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as usize
        };
        // Skewed choices (expert 0 popular), distinct experts per token.
        let idx: Vec<Vec<i32>> = (0..world)
            .map(|_| {
                let mut v = Vec::new();
                for _ in 0..t {
                    let a = if next() % 3 == 0 { 0 } else { next() % e };
                    let b = (a + 1 + next() % (e - 1)) % e;
                    v.extend([a as i32, b as i32]);
                }
                v
            })
            .collect();
        let mut gathered = Vec::new();
        for iv in &idx {
            let probs = vec![1.0 / e as f32; t * e];
            let mut st = vec![0.0; (k + 1) * e];
            local_stats(&probs, iv, e, k, &mut st);
            gathered.extend(st);
        }
        for cap in [Capacity::Factor(0.7), Capacity::Factor(1.5), Capacity::Dropless, Capacity::Bounded(0.9)] {
            let table = RoutingTable::new(&gathered, world, k, e, t, cap);
            let mut dropped = 0;
            for (r, iv) in idx.iter().enumerate() {
                let (tab, per_expert) = dispatch_table(&table, r);
                let total: usize = per_expert.iter().sum();
                let want = host_slots(&table, r, iv, k, e);
                assert_eq!(table_slots(&tab, iv, k, e, total), want, "rank {r}, {cap:?}");
                assert_eq!(per_expert, (0..e).map(|x| table.kept_rank_expert(r, x)).collect::<Vec<_>>());
                dropped += want.0.iter().filter(|&&s| s < 0).count();
            }
            assert_eq!(dropped, table.dropped(), "{cap:?}");
            if matches!(cap, Capacity::Factor(f) if f < 1.0) {
                assert!(dropped > 0, "the test must drop some assignments");
            }
        }
    }
}
