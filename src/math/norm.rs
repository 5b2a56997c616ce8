//! LayerNorm over the last dimension, saving mean and reciprocal std for backward.

const EPS: f32 = 1e-5;

/// `y[t,m] = (x - mean) * rstd * gamma + beta`; `stats[t,2]` holds (mean, rstd).
pub fn forward(x: &[f32], gamma: &[f32], beta: &[f32], y: &mut [f32], stats: &mut [f32]) {
    let m = gamma.len();
    for (t, (xr, yr)) in x.chunks_exact(m).zip(y.chunks_exact_mut(m)).enumerate() {
        let mean = xr.iter().sum::<f32>() / m as f32;
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / m as f32;
        let rstd = 1.0 / (var + EPS).sqrt();
        for i in 0..m {
            yr[i] = (xr[i] - mean) * rstd * gamma[i] + beta[i];
        }
        stats[2 * t] = mean;
        stats[2 * t + 1] = rstd;
    }
}

/// Gradients: `dx` is overwritten, `dgamma`/`dbeta` are overwritten.
pub fn backward(
    x: &[f32],
    gamma: &[f32],
    stats: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let m = gamma.len();
    dgamma.fill(0.0);
    dbeta.fill(0.0);
    for (t, ((xr, dyr), dxr)) in x.chunks_exact(m).zip(dy.chunks_exact(m)).zip(dx.chunks_exact_mut(m)).enumerate() {
        let (mean, rstd) = (stats[2 * t], stats[2 * t + 1]);
        let mut sum_g = 0.0f32;
        let mut sum_gx = 0.0f32;
        for i in 0..m {
            let xhat = (xr[i] - mean) * rstd;
            let g = dyr[i] * gamma[i];
            sum_g += g;
            sum_gx += g * xhat;
            dgamma[i] += dyr[i] * xhat;
            dbeta[i] += dyr[i];
        }
        for i in 0..m {
            let xhat = (xr[i] - mean) * rstd;
            let g = dyr[i] * gamma[i];
            dxr[i] = rstd * (g - (sum_g + xhat * sum_gx) / m as f32);
        }
    }
}
