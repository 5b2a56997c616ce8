//! Deterministic random streams keyed by what they fill, so that every rank draws exactly
//! the weights and data it owns and a 1-rank run draws the same global values.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A stream for `(seed, tag, a, b)`: e.g. `("expert.w1", layer, expert)`.
pub fn stream(seed: u64, tag: &str, a: u64, b: u64) -> ChaCha8Rng {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in tag.bytes() {
        h = (h ^ byte as u64).wrapping_mul(0x100_0000_01b3);
    }
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..16].copy_from_slice(&h.to_le_bytes());
    s[16..24].copy_from_slice(&a.to_le_bytes());
    s[24..].copy_from_slice(&b.to_le_bytes());
    ChaCha8Rng::from_seed(s)
}

/// Fill with N(0, std^2) samples (Box-Muller).
pub fn fill_normal(rng: &mut ChaCha8Rng, out: &mut [f32], std: f32) {
    for pair in out.chunks_mut(2) {
        let u1: f64 = rng.random::<f64>().max(1e-300);
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let th = std::f64::consts::TAU * u2;
        pair[0] = (r * th.cos()) as f32 * std;
        if pair.len() > 1 {
            pair[1] = (r * th.sin()) as f32 * std;
        }
    }
}
