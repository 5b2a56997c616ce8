//! Dense matrix products. Loops are ordered i-k-j so the inner loop streams rows.

/// `c[m,n] (+)= a[m,k] * b[k,n]`.
pub fn gemm(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, accumulate: bool) {
    debug_assert_eq!(a.len(), m * k);
    debug_assert_eq!(b.len(), k * n);
    debug_assert_eq!(c.len(), m * n);
    if !accumulate {
        c.fill(0.0);
    }
    for i in 0..m {
        let crow = &mut c[i * n..(i + 1) * n];
        let arow = &a[i * k..(i + 1) * k];
        for (p, &av) in arow.iter().enumerate() {
            if av == 0.0 {
                continue;
            }
            let brow = &b[p * n..(p + 1) * n];
            for (cv, &bv) in crow.iter_mut().zip(brow) {
                *cv += av * bv;
            }
        }
    }
}

/// `c[m,n] (+)= a[k,m]^T * b[k,n]` (weight gradients: `dW = X^T dY`).
pub fn gemm_tn(a: &[f32], b: &[f32], c: &mut [f32], k: usize, m: usize, n: usize, accumulate: bool) {
    debug_assert_eq!(a.len(), k * m);
    debug_assert_eq!(b.len(), k * n);
    debug_assert_eq!(c.len(), m * n);
    if !accumulate {
        c.fill(0.0);
    }
    for p in 0..k {
        let arow = &a[p * m..(p + 1) * m];
        let brow = &b[p * n..(p + 1) * n];
        for (i, &av) in arow.iter().enumerate() {
            if av == 0.0 {
                continue;
            }
            let crow = &mut c[i * n..(i + 1) * n];
            for (cv, &bv) in crow.iter_mut().zip(brow) {
                *cv += av * bv;
            }
        }
    }
}

/// `c[m,n] (+)= a[m,k] * b[n,k]^T` (input gradients: `dX = dY W^T`).
pub fn gemm_nt(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, accumulate: bool) {
    debug_assert_eq!(a.len(), m * k);
    debug_assert_eq!(b.len(), n * k);
    debug_assert_eq!(c.len(), m * n);
    for i in 0..m {
        let arow = &a[i * k..(i + 1) * k];
        for j in 0..n {
            let brow = &b[j * k..(j + 1) * k];
            let dot: f32 = arow.iter().zip(brow).map(|(x, y)| x * y).sum();
            if accumulate {
                c[i * n + j] += dot;
            } else {
                c[i * n + j] = dot;
            }
        }
    }
}

/// Add `bias[n]` to every row of `x[m,n]`.
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    let n = bias.len();
    for row in x.chunks_exact_mut(n) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b;
        }
    }
}

/// Column sums of `x[m,n]` into `out[n]` (bias gradients).
pub fn col_sums(x: &[f32], out: &mut [f32], accumulate: bool) {
    let n = out.len();
    if !accumulate {
        out.fill(0.0);
    }
    for row in x.chunks_exact(n) {
        for (o, v) in out.iter_mut().zip(row) {
            *o += v;
        }
    }
}

/// Floating-point operations of an `[m,k] x [k,n]` product.
pub fn gemm_flops(m: usize, k: usize, n: usize) -> u64 {
    2 * (m as u64) * (k as u64) * (n as u64)
}

/// Grouped forward of `n_local` experts: `y[e] = x[e] w[e]` with `x[e]` of `[rows, d_in]`,
/// rows = len(x) / (n_local d_in). Returns `y[n_local, rows, d_out]`; biases are added
/// apart ([`add_grouped_bias`]), after a bf16 plan has rounded the product.
pub fn grouped_linear(x: &[f32], w: &[f32], n_local: usize, d_in: usize, d_out: usize) -> Vec<f32> {
    let rows = x.len() / (n_local * d_in);
    let mut y = vec![0.0; n_local * rows * d_out];
    for i in 0..n_local {
        let yi = &mut y[i * rows * d_out..(i + 1) * rows * d_out];
        gemm(&x[i * rows * d_in..(i + 1) * rows * d_in], &w[i * d_in * d_out..(i + 1) * d_in * d_out], yi, rows, d_in, d_out, false);
    }
    y
}

/// Adds expert `i`'s bias row `bias[i, :]` to every row of its block of `y[n_local, rows, d_out]`.
pub fn add_grouped_bias(y: &mut [f32], bias: &[f32], n_local: usize, d_out: usize) {
    let rows = y.len() / (n_local * d_out).max(1);
    for i in 0..n_local {
        add_bias(&mut y[i * rows * d_out..(i + 1) * rows * d_out], &bias[i * d_out..(i + 1) * d_out]);
    }
}

/// Gradients of [`grouped_linear`]: returns `(dx, dw, dbias)`.
pub fn grouped_linear_bwd(x: &[f32], w: &[f32], dy: &[f32], n_local: usize, d_in: usize, d_out: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let rows = x.len() / (n_local * d_in);
    let mut dx = vec![0.0; x.len()];
    let mut dw = vec![0.0; w.len()];
    let mut db = vec![0.0; n_local * d_out];
    for i in 0..n_local {
        let xi = &x[i * rows * d_in..(i + 1) * rows * d_in];
        let dyi = &dy[i * rows * d_out..(i + 1) * rows * d_out];
        gemm_tn(xi, dyi, &mut dw[i * d_in * d_out..(i + 1) * d_in * d_out], rows, d_in, d_out, false);
        col_sums(dyi, &mut db[i * d_out..(i + 1) * d_out], false);
        gemm_nt(dyi, &w[i * d_in * d_out..(i + 1) * d_in * d_out], &mut dx[i * rows * d_in..(i + 1) * rows * d_in], rows, d_out, d_in, false);
    }
    (dx, dw, db)
}
