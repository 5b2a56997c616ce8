// LayerNorm over the last dimension of x [rows, cols], same semantics as moelab::math::norm:
// y = (x - mean) * rstd * gamma + beta with rstd = 1 / sqrt(var + eps) (biased variance),
// stats [rows, 2] = (mean, rstd) in f32. Parameter gradients dgamma, dbeta [cols] are f32 and
// overwritten, as in the reference.

// One block per row; two passes (mean, then centred variance) like the reference.
template <typename T>
__device__ __forceinline__ void layernorm_fwd_impl(const T* x, const T* gamma, const T* beta, T* y,
                                                   float* stats, int rows, int cols, float eps) {
    __shared__ float sh[32];
    const i64 row = blockIdx.x;
    if (row >= rows) return;  // uniform over the block
    const i64 base = row * (i64)cols;
    float s = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) s += load_f(x, base + c);
    const float mean = block_sum(s, sh) / (float)cols;
    float v = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float d = load_f(x, base + c) - mean;
        v += d * d;
    }
    const float var = block_sum(v, sh) / (float)cols;
    const float rstd = 1.0f / sqrtf(var + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float xhat = (load_f(x, base + c) - mean) * rstd;
        store_f(y, base + c, xhat * load_f(gamma, c) + load_f(beta, c));
    }
    if (threadIdx.x == 0) {
        stats[2 * row] = mean;
        stats[2 * row + 1] = rstd;
    }
}

// dx, one block per row: dx = rstd * (g - (sum(g) + xhat * sum(g * xhat)) / cols), g = dy * gamma.
template <typename T>
__device__ __forceinline__ void layernorm_bwd_dx_impl(const T* x, const T* gamma, const float* stats,
                                                      const T* dy, T* dx, int rows, int cols) {
    __shared__ float sh[32];
    const i64 row = blockIdx.x;
    if (row >= rows) return;  // uniform over the block
    const i64 base = row * (i64)cols;
    const float mean = stats[2 * row];
    const float rstd = stats[2 * row + 1];
    float sg = 0.0f;
    float sgx = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float xhat = (load_f(x, base + c) - mean) * rstd;
        const float g = load_f(dy, base + c) * load_f(gamma, c);
        sg += g;
        sgx += g * xhat;
    }
    sg = block_sum(sg, sh);
    sgx = block_sum(sgx, sh);
    const float inv_cols = 1.0f / (float)cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float xhat = (load_f(x, base + c) - mean) * rstd;
        const float g = load_f(dy, base + c) * load_f(gamma, c);
        store_f(dx, base + c, rstd * (g - (sg + xhat * sgx) * inv_cols));
    }
}

// dgamma = sum_rows dy * xhat, dbeta = sum_rows dy. Block (32, LN_PARAM_ROWS): 32 columns per
// block, the rows split over threadIdx.y, then summed in shared memory. Deterministic (no
// atomics); the launcher must use blockDim = (32, LN_PARAM_ROWS).
#define LN_PARAM_ROWS 8

template <typename T>
__device__ __forceinline__ void layernorm_bwd_params_impl(const T* x, const float* stats, const T* dy,
                                                          float* dgamma, float* dbeta, int rows, int cols) {
    __shared__ float sg[LN_PARAM_ROWS][33];
    __shared__ float sb[LN_PARAM_ROWS][33];
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int c = blockIdx.x * 32 + tx;
    float dg = 0.0f;
    float db = 0.0f;
    if (c < cols) {
        for (i64 r = ty; r < rows; r += LN_PARAM_ROWS) {
            const float mean = stats[2 * r];
            const float rstd = stats[2 * r + 1];
            const float d = load_f(dy, r * cols + c);
            dg += d * (load_f(x, r * cols + c) - mean) * rstd;
            db += d;
        }
    }
    sg[ty][tx] = dg;
    sb[ty][tx] = db;
    __syncthreads();
    if (ty == 0 && c < cols) {
        float tg = 0.0f;
        float tb = 0.0f;
        for (int k = 0; k < LN_PARAM_ROWS; ++k) {
            tg += sg[k][tx];
            tb += sb[k][tx];
        }
        dgamma[c] = tg;
        dbeta[c] = tb;
    }
}

extern "C" __global__ void layernorm_fwd_f32(const float* x, const float* gamma, const float* beta, float* y,
                                             float* stats, int rows, int cols, float eps) {
    layernorm_fwd_impl(x, gamma, beta, y, stats, rows, cols, eps);
}

extern "C" __global__ void layernorm_fwd_bf16(const bf16_t* x, const bf16_t* gamma, const bf16_t* beta, bf16_t* y,
                                              float* stats, int rows, int cols, float eps) {
    layernorm_fwd_impl(x, gamma, beta, y, stats, rows, cols, eps);
}

extern "C" __global__ void layernorm_bwd_dx_f32(const float* x, const float* gamma, const float* stats,
                                                const float* dy, float* dx, int rows, int cols) {
    layernorm_bwd_dx_impl(x, gamma, stats, dy, dx, rows, cols);
}

extern "C" __global__ void layernorm_bwd_dx_bf16(const bf16_t* x, const bf16_t* gamma, const float* stats,
                                                 const bf16_t* dy, bf16_t* dx, int rows, int cols) {
    layernorm_bwd_dx_impl(x, gamma, stats, dy, dx, rows, cols);
}

extern "C" __global__ void layernorm_bwd_params_f32(const float* x, const float* stats, const float* dy,
                                                    float* dgamma, float* dbeta, int rows, int cols) {
    layernorm_bwd_params_impl(x, stats, dy, dgamma, dbeta, rows, cols);
}

extern "C" __global__ void layernorm_bwd_params_bf16(const bf16_t* x, const float* stats, const bf16_t* dy,
                                                     float* dgamma, float* dbeta, int rows, int cols) {
    layernorm_bwd_params_impl(x, stats, dy, dgamma, dbeta, rows, cols);
}
