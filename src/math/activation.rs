//! Expert activations and their derivatives.

use crate::spec::Activation;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// `out = act(h)` elementwise.
pub fn forward(act: Activation, h: &[f32], out: &mut [f32]) {
    match act {
        Activation::Gelu => {
            for (o, &x) in out.iter_mut().zip(h) {
                let u = SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
                *o = 0.5 * x * (1.0 + u.tanh());
            }
        }
        Activation::Relu => {
            // Not `x.max(0.0)`, which turns a NaN into 0 and would hide it from the loss.
            for (o, &x) in out.iter_mut().zip(h) {
                *o = if x < 0.0 { 0.0 } else { x };
            }
        }
    }
}

/// `dh = da * act'(h)` elementwise.
pub fn backward(act: Activation, h: &[f32], da: &[f32], dh: &mut [f32]) {
    match act {
        Activation::Gelu => {
            for ((d, &x), &g) in dh.iter_mut().zip(h).zip(da) {
                let u = SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
                let t = u.tanh();
                let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * x * x);
                *d = g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du);
            }
        }
        Activation::Relu => {
            for ((d, &x), &g) in dh.iter_mut().zip(h).zip(da) {
                *d = if x > 0.0 { g } else if x.is_nan() { x } else { 0.0 };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relu_and_gelu_carry_nan_through_both_passes() {
        for act in [Activation::Relu, Activation::Gelu] {
            let h = [f32::NAN, -1.0, 2.0];
            let mut out = [0.0; 3];
            forward(act, &h, &mut out);
            assert!(out[0].is_nan() && out[2] > 0.0, "{act:?}: {out:?}");
            let mut dh = [0.0; 3];
            backward(act, &h, &[1.0; 3], &mut dh);
            assert!(dh[0].is_nan(), "{act:?}: {dh:?}");
        }
    }
}
