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
            for (o, &x) in out.iter_mut().zip(h) {
                *o = x.max(0.0);
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
                *d = if x > 0.0 { g } else { 0.0 };
            }
        }
    }
}
