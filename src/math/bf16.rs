//! bf16 storage on the cpu: values rounded to the nearest bf16 (ties to even, NaN kept), the
//! rounding the GPU applies whenever a bf16 plan stores a value. With it the cpu backend runs
//! bf16 plans as f32 arithmetic with bf16 storage between ops, the reference for the cuda
//! backend's bf16 runs.

/// `x` rounded to bf16 and back.
pub fn round(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// Every value rounded to bf16.
pub fn rounded(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| round(x)).collect()
}

/// Every value rounded to bf16, in place.
pub fn round_in_place(v: &mut [f32]) {
    for x in v {
        *x = round(*x);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rounds_to_nearest_even_and_keeps_specials() {
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1).
        assert_eq!(super::round(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(super::round(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(super::round(-2.5), -2.5);
        assert!(super::round(f32::NAN).is_nan());
        assert_eq!(super::round(f32::INFINITY), f32::INFINITY);
        let mut v = vec![0.1f32, 3.0e-5];
        super::round_in_place(&mut v);
        assert!((v[0] - 0.1).abs() < 0.1 / 128.0 && v[0] != 0.1);
    }
}
