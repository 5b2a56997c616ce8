//! Deterministic random streams keyed by what they fill, so that every rank draws exactly
//! the weights and data it owns and a 1-rank run draws the same global values.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A stream for `(seed, tag, a, b)`: e.g. `("expert.w1", layer, expert)`.
pub fn stream(seed: u64, tag: &str, a: u64, b: u64) -> ChaCha8Rng {
    let mut s = [0u8; 32];
    for (chunk, w) in s.chunks_exact_mut(4).zip(stream_key(seed, tag, a, b)) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
    ChaCha8Rng::from_seed(s)
}

/// The ChaCha8 key of [`stream`]`(seed, tag, a, b)` as eight little-endian words: what a
/// device kernel needs to draw the same numbers at random access ([`normal_pair_at`]).
pub fn stream_key(seed: u64, tag: &str, a: u64, b: u64) -> [u32; 8] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in tag.bytes() {
        h = (h ^ byte as u64).wrapping_mul(0x100_0000_01b3);
    }
    let mut k = [0u32; 8];
    for (i, v) in [seed, h, a, b].into_iter().enumerate() {
        k[2 * i] = v as u32;
        k[2 * i + 1] = (v >> 32) as u32;
    }
    k
}

/// Block `counter` (16 words) of the ChaCha8 keystream with `key` and stream id 0: exactly
/// the words `ChaCha8Rng` yields from word `16 * counter` on (Bernstein's 64-bit counter
/// layout). Mirrored by `chacha8_block` in the cuda backend's plan_ops.cu (whose f64
/// log/sin/cos may differ from the host's by an ulp, so a device-drawn f32 can, rarely, be
/// one f32 ulp off; the cuda-vs-cpu cross-checks cover it).
pub fn chacha8_block(key: &[u32; 8], counter: u64) -> [u32; 16] {
    let mut x = [0u32; 16];
    x[..4].copy_from_slice(&[0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574]);
    x[4..12].copy_from_slice(key);
    x[12] = counter as u32;
    x[13] = (counter >> 32) as u32;
    let init = x;
    fn qr(x: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize) {
        x[a] = x[a].wrapping_add(x[b]);
        x[d] = (x[d] ^ x[a]).rotate_left(16);
        x[c] = x[c].wrapping_add(x[d]);
        x[b] = (x[b] ^ x[c]).rotate_left(12);
        x[a] = x[a].wrapping_add(x[b]);
        x[d] = (x[d] ^ x[a]).rotate_left(8);
        x[c] = x[c].wrapping_add(x[d]);
        x[b] = (x[b] ^ x[c]).rotate_left(7);
    }
    for _ in 0..4 {
        qr(&mut x, 0, 4, 8, 12);
        qr(&mut x, 1, 5, 9, 13);
        qr(&mut x, 2, 6, 10, 14);
        qr(&mut x, 3, 7, 11, 15);
        qr(&mut x, 0, 5, 10, 15);
        qr(&mut x, 1, 6, 11, 12);
        qr(&mut x, 2, 7, 8, 13);
        qr(&mut x, 3, 4, 9, 14);
    }
    for (o, i) in x.iter_mut().zip(init) {
        *o = o.wrapping_add(i);
    }
    x
}

/// Pair `p` of [`fill_normal`]`(stream with key, .., 1.0)`, computed without drawing the
/// pairs before it: pair p uses keystream words `4p..4p+4` (two `u64`s, low word first).
pub fn normal_pair_at(key: &[u32; 8], p: u64) -> (f32, f32) {
    let block = chacha8_block(key, p / 4);
    let w = &block[(p % 4) as usize * 4..][..4];
    let unit = |lo: u32, hi: u32| (((hi as u64) << 32 | lo as u64) >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    let (u1, u2) = (unit(w[0], w[1]).max(1e-300), unit(w[2], w[3]));
    let r = (-2.0 * u1.ln()).sqrt();
    let th = std::f64::consts::TAU * u2;
    ((r * th.cos()) as f32, (r * th.sin()) as f32)
}

/// [`fill_normal`] of the stream `(seed, tag, a, b)` from its start, drawn in parallel: the
/// output is cut into pieces and each piece's generator seeks to its own keystream position
/// (element i of the output uses words `2i..2i+2`), so the values are the sequential ones.
pub fn fill_normal_par(seed: u64, tag: &str, a: u64, b: u64, out: &mut [f32], std: f32) {
    use rayon::prelude::*;
    const PIECE: usize = 1 << 18; // even: pieces start on a pair
    if out.len() <= PIECE {
        return fill_normal(&mut stream(seed, tag, a, b), out, std);
    }
    let base = stream(seed, tag, a, b);
    out.par_chunks_mut(PIECE).enumerate().for_each(|(i, piece)| {
        let mut r = base.clone();
        r.set_word_pos(2 * (i * PIECE) as u128);
        fill_normal(&mut r, piece, std);
    });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_fill_equals_the_sequential_stream() {
        let n = (1 << 18) * 3 + 5;
        let (mut seq, mut par) = (vec![0.0f32; n], vec![0.0f32; n]);
        fill_normal(&mut stream(3, "expert.w1", 1, 2), &mut seq, 0.02);
        fill_normal_par(3, "expert.w1", 1, 2, &mut par, 0.02);
        assert!(seq.iter().zip(&par).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn random_access_normals_equal_the_sequential_stream() {
        for (seed, a, b) in [(0u64, 0u64, 0u64), (7, 3, 11), (u64::MAX, 1 << 40, 5)] {
            let n = 4 * 16 * 3 + 6; // crosses rand_chacha's 4-block buffer refills
            let mut seq = vec![0.0f32; n];
            fill_normal(&mut stream(seed, "data.x", a, b), &mut seq, 1.0);
            let key = stream_key(seed, "data.x", a, b);
            for p in 0..n / 2 {
                let (x, y) = normal_pair_at(&key, p as u64);
                assert_eq!((x.to_bits(), y.to_bits()), (seq[2 * p].to_bits(), seq[2 * p + 1].to_bits()), "pair {p} of {seed}/{a}/{b}");
            }
        }
    }
}
