//! Causal multi-head self-attention core (between the projections), per sequence.
//! `qkv[T, 3M]` holds q, k, v side by side; `T = batch * seq`; heads split M into `M / H`.

/// Shape of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Heads.
    pub heads: usize,
    /// Model width M.
    pub d_model: usize,
}

impl AttnShape {
    fn dh(&self) -> usize {
        self.d_model / self.heads
    }
    /// Elements of the saved probabilities `[batch, heads, seq, seq]`.
    pub fn probs_len(&self) -> usize {
        self.batch * self.heads * self.seq * self.seq
    }
    /// FLOPs of scores and context (forward), causal half counted as full for simplicity.
    pub fn core_flops(&self) -> u64 {
        4 * (self.batch * self.heads * self.seq * self.seq * self.dh()) as u64
    }
}

/// `probs = softmax(causal(q k^T / sqrt(dh)))`, `ctx[T, M] = probs v`.
pub fn forward(s: AttnShape, qkv: &[f32], probs: &mut [f32], ctx: &mut [f32]) {
    forward_stored(s, qkv, probs, ctx, |v| v)
}

/// [`forward`] with `probs` passed through `store` (e.g. rounded to bf16) before `ctx` reads
/// them, as a backend that stores the probabilities in that type computes `ctx`.
pub fn forward_stored(s: AttnShape, qkv: &[f32], probs: &mut [f32], ctx: &mut [f32], store: fn(f32) -> f32) {
    let (m, dh, l) = (s.d_model, s.dh(), s.seq);
    let scale = 1.0 / (dh as f32).sqrt();
    ctx.fill(0.0);
    for b in 0..s.batch {
        for h in 0..s.heads {
            let p = &mut probs[((b * s.heads + h) * l) * l..((b * s.heads + h) * l + l) * l];
            for i in 0..l {
                let qi = &qkv[(b * l + i) * 3 * m + h * dh..][..dh];
                let row = &mut p[i * l..(i + 1) * l];
                let mut mx = f32::NEG_INFINITY;
                for j in 0..=i {
                    let kj = &qkv[(b * l + j) * 3 * m + m + h * dh..][..dh];
                    let sc = qi.iter().zip(kj).map(|(a, c)| a * c).sum::<f32>() * scale;
                    row[j] = sc;
                    mx = mx.max(sc);
                }
                let mut sum = 0.0;
                for v in row[..=i].iter_mut() {
                    *v = (*v - mx).exp();
                    sum += *v;
                }
                for v in row[..=i].iter_mut() {
                    *v = store(*v / sum);
                }
                row[i + 1..].fill(0.0);
                let out = &mut ctx[(b * l + i) * m + h * dh..][..dh];
                for j in 0..=i {
                    let vj = &qkv[(b * l + j) * 3 * m + 2 * m + h * dh..][..dh];
                    let pj = row[j];
                    for (o, v) in out.iter_mut().zip(vj) {
                        *o += pj * v;
                    }
                }
            }
        }
    }
}

/// Gradient of the core: `dqkv[T, 3M]` (overwritten) from `dctx[T, M]`.
pub fn backward(s: AttnShape, qkv: &[f32], probs: &[f32], dctx: &[f32], dqkv: &mut [f32]) {
    backward_stored(s, qkv, probs, dctx, dqkv, |v| v)
}

/// [`backward`] with the score gradients `dS` passed through `store` (e.g. rounded to bf16)
/// before `dq` and `dk` read them, as a backend that keeps `dS` in that type computes them.
pub fn backward_stored(s: AttnShape, qkv: &[f32], probs: &[f32], dctx: &[f32], dqkv: &mut [f32], store: fn(f32) -> f32) {
    let (m, dh, l) = (s.d_model, s.dh(), s.seq);
    let scale = 1.0 / (dh as f32).sqrt();
    dqkv.fill(0.0);
    let mut ds = vec![0.0f32; l];
    for b in 0..s.batch {
        for h in 0..s.heads {
            let p = &probs[((b * s.heads + h) * l) * l..((b * s.heads + h) * l + l) * l];
            for i in 0..l {
                let row = &p[i * l..(i + 1) * l];
                let dci = &dctx[(b * l + i) * m + h * dh..][..dh];
                // dP_ij = dctx_i . v_j ; dv_j += P_ij dctx_i
                let mut dot = 0.0f32;
                for j in 0..=i {
                    let vj = &qkv[(b * l + j) * 3 * m + 2 * m + h * dh..][..dh];
                    let dp = dci.iter().zip(vj).map(|(a, c)| a * c).sum::<f32>();
                    ds[j] = dp;
                    dot += dp * row[j];
                    let dv = &mut dqkv[(b * l + j) * 3 * m + 2 * m + h * dh..][..dh];
                    for (d, g) in dv.iter_mut().zip(dci) {
                        *d += row[j] * g;
                    }
                }
                for j in 0..=i {
                    ds[j] = store(row[j] * (ds[j] - dot) * scale);
                }
                // dq_i = sum_j dS_ij k_j ; dk_j += dS_ij q_i
                for j in 0..=i {
                    let g = ds[j];
                    if g == 0.0 {
                        continue;
                    }
                    let base_i = (b * l + i) * 3 * m + h * dh;
                    let base_j = (b * l + j) * 3 * m + m + h * dh;
                    for d in 0..dh {
                        let kj = qkv[base_j + d];
                        let qi = qkv[base_i + d];
                        dqkv[base_i + d] += g * kj;
                        dqkv[base_j + d] += g * qi;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::bf16;

    fn inputs(s: AttnShape) -> Vec<f32> {
        (0..s.batch * s.seq * 3 * s.d_model).map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.7).collect()
    }

    #[test]
    fn stored_probabilities_feed_the_context_as_stored() {
        let s = AttnShape { batch: 1, seq: 5, heads: 2, d_model: 8 };
        let qkv = inputs(s);
        let (mut p, mut ctx) = (vec![0.0; s.probs_len()], vec![0.0; s.seq * s.d_model]);
        forward_stored(s, &qkv, &mut p, &mut ctx, bf16::round);
        assert!(p.iter().all(|&v| v == bf16::round(v)), "probabilities are stored bf16");
        // ctx = P v with the stored P, recomputed by hand.
        let (m, dh) = (s.d_model, s.d_model / s.heads);
        for h in 0..s.heads {
            for i in 0..s.seq {
                for d in 0..dh {
                    let want: f32 = (0..=i).map(|j| p[(h * s.seq + i) * s.seq + j] * qkv[j * 3 * m + 2 * m + h * dh + d]).sum();
                    assert!((ctx[i * m + h * dh + d] - want).abs() <= 1e-6, "ctx[{i}, {h}, {d}]");
                }
            }
        }
        // Rounding the probabilities moves the context: the store is not a no-op.
        let (mut p32, mut ctx32) = (vec![0.0; s.probs_len()], vec![0.0; s.seq * s.d_model]);
        forward(s, &qkv, &mut p32, &mut ctx32);
        assert!(ctx.iter().zip(&ctx32).any(|(a, b)| a != b));
    }

    #[test]
    fn stored_score_gradients_change_only_q_and_k_gradients() {
        let s = AttnShape { batch: 1, seq: 6, heads: 2, d_model: 8 };
        let qkv = inputs(s);
        let (mut p, mut ctx) = (vec![0.0; s.probs_len()], vec![0.0; s.seq * s.d_model]);
        forward(s, &qkv, &mut p, &mut ctx);
        let dctx: Vec<f32> = (0..ctx.len()).map(|i| ((i * 13 % 29) as f32 / 14.0 - 1.0) * 0.3).collect();
        let (mut d32, mut d16) = (vec![0.0; qkv.len()], vec![0.0; qkv.len()]);
        backward(s, &qkv, &p, &dctx, &mut d32);
        backward_stored(s, &qkv, &p, &dctx, &mut d16, bf16::round);
        let m = s.d_model;
        let (mut qk_moved, mut v_same, mut diff, mut norm) = (false, true, 0.0f64, 0.0f64);
        for t in 0..s.seq {
            for c in 0..3 * m {
                let (a, b) = (d32[t * 3 * m + c], d16[t * 3 * m + c]);
                if c < 2 * m {
                    qk_moved |= a != b;
                    diff += ((a - b) as f64).powi(2);
                    norm += (a as f64).powi(2);
                } else {
                    v_same &= a == b;
                }
            }
        }
        assert!(qk_moved && v_same);
        assert!((diff / norm).sqrt() < 1e-2, "dq/dk within bf16 rounding of f32: {}", (diff / norm).sqrt());
    }
}
