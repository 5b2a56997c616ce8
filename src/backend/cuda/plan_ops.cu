// moelab cuda backend: the plan executor's kernels (f32 or bf16 storage, f32 arithmetic).
// Semantics are those of the cpu backend (src/backend/cpu/exec.rs, src/math/*); every kernel
// is checked against it by tests/cuda_plans.rs on a GPU. common.cuh is prepended by the
// compiler (warp_sum, warp_max, i64).

#define GRID_STRIDE(i, n) for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

// Storage-generic kernels: `T` is the activation storage (float, or bf16_t as raw bits),
// loaded and stored through common.cuh's load_f / store_f; arithmetic is f32. Each kernel is
// a __device__ template with one extern "C" entry per storage: the f32 names are the f32
// plans' kernels (unchanged), `<name>_bf16` the bf16 plans'. Parameters (gamma, beta,
// biases), routing weights, LayerNorm statistics and the loss stay float.

// dst[r, :] = map[r] >= 0 ? src[map[r], :] : 0
template <typename T>
__device__ void gather_rows_t(const T* src, const int* map, T* dst, i64 rows, int cols) {
    GRID_STRIDE(i, rows * cols) {
        i64 r = i / cols;
        int c = (int)(i % cols);
        int s = map[r];
        if (s >= 0) dst[i] = src[(i64)s * cols + c];
        else store_f(dst, i, 0.0f);
    }
}
extern "C" __global__ void gather_rows(const float* src, const int* map, float* dst, i64 rows, int cols) { gather_rows_t(src, map, dst, rows, cols); }

// Dispatch backward: dst[t, :] = sum_j (slots[t*k+j] >= 0 ? src[slots[t*k+j], :] : 0)
template <typename T>
__device__ void token_sum_rows_t(const T* src, const int* slots, T* dst, i64 tokens, int k, int cols) {
    GRID_STRIDE(i, tokens * cols) {
        i64 t = i / cols;
        int c = (int)(i % cols);
        float acc = 0.0f;
        for (int j = 0; j < k; j++) {
            int s = slots[t * k + j];
            if (s >= 0) acc += load_f(src, (i64)s * cols + c);
        }
        store_f(dst, i, acc);
    }
}
extern "C" __global__ void token_sum_rows(const float* src, const int* slots, float* dst, i64 tokens, int k, int cols) { token_sum_rows_t(src, slots, dst, tokens, k, cols); }

// Combine: out[t, :] = residual[t, :] (or 0) + sum_j w[t*k+j] * back[slots[t*k+j], :]
template <typename T>
__device__ void combine_fwd_t(const T* back, const int* slots, const float* w, const T* residual, T* out, i64 tokens, int k, int cols) {
    GRID_STRIDE(i, tokens * cols) {
        i64 t = i / cols;
        int c = (int)(i % cols);
        float acc = residual ? load_f(residual, i) : 0.0f;
        for (int j = 0; j < k; j++) {
            int s = slots[t * k + j];
            if (s >= 0) acc += w[t * k + j] * load_f(back, (i64)s * cols + c);
        }
        store_f(out, i, acc);
    }
}
extern "C" __global__ void combine_fwd(const float* back, const int* slots, const float* w, const float* residual, float* out, i64 tokens, int k, int cols) {
    combine_fwd_t(back, slots, w, residual, out, tokens, k, cols);
}

// Combine backward, rows: dback[slots[a], :] = w[a] * dout[a / k, :] for kept assignments a.
template <typename T>
__device__ void combine_bwd_rows_t(const T* dout, const int* slots, const float* w, T* dback, i64 assigns, int k, int cols) {
    GRID_STRIDE(i, assigns * cols) {
        i64 a = i / cols;
        int c = (int)(i % cols);
        int s = slots[a];
        if (s >= 0) store_f(dback, (i64)s * cols + c, w[a] * load_f(dout, (a / k) * cols + c));
    }
}
extern "C" __global__ void combine_bwd_rows(const float* dout, const int* slots, const float* w, float* dback, i64 assigns, int k, int cols) {
    combine_bwd_rows_t(dout, slots, w, dback, assigns, k, cols);
}

// Combine backward, weights: one warp per assignment, dw[a] = dout[a / k, :] . back[slots[a], :].
template <typename T>
__device__ void combine_bwd_weights_t(const T* dout, const T* back, const int* slots, float* dw, i64 assigns, int k, int cols) {
    i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    i64 warps = ((i64)gridDim.x * blockDim.x) / 32;
    for (i64 a = warp; a < assigns; a += warps) {
        int s = slots[a];
        float acc = 0.0f;
        if (s >= 0) {
            for (int c = lane; c < cols; c += 32) acc += load_f(dout, (a / k) * cols + c) * load_f(back, (i64)s * cols + c);
        }
        acc = warp_sum(acc);
        if (lane == 0) dw[a] = acc;
    }
}
extern "C" __global__ void combine_bwd_weights(const float* dout, const float* back, const int* slots, float* dw, i64 assigns, int k, int cols) {
    combine_bwd_weights_t(dout, back, slots, dw, assigns, k, cols);
}
extern "C" __global__ void combine_bwd_weights_bf16(const bf16_t* dout, const bf16_t* back, const int* slots, float* dw, i64 assigns, int k, int cols) {
    combine_bwd_weights_t(dout, back, slots, dw, assigns, k, cols);
}

// y[r, c] += bias[(r / group_rows) * cols + c]: one bias row per group of rows (per expert).
template <typename T>
__device__ void add_bias_rows_t(T* y, const float* bias, i64 rows, int cols, i64 group_rows) {
    GRID_STRIDE(i, rows * cols) {
        i64 r = i / cols;
        int c = (int)(i % cols);
        store_f(y, i, load_f(y, i) + bias[(r / group_rows) * cols + c]);
    }
}
extern "C" __global__ void add_bias_rows(float* y, const float* bias, i64 rows, int cols, i64 group_rows) { add_bias_rows_t(y, bias, rows, cols, group_rows); }
// add_bias_rows_bf16 (eight values per word) is with the other bf16 row kernels at the end.

// Column sums per group, stage 1: part[g, q, c] = sum of rows [q chunk, (q + 1) chunk) of
// x[g * rows + r, c], one thread per (g, q, c), rows in order (deterministic).
template <typename T>
__device__ void col_partials_t(const T* x, float* part, i64 rows, int cols, int groups, i64 chunk) {
    i64 chunks = (rows + chunk - 1) / chunk;
    GRID_STRIDE(i, (i64)groups * chunks * cols) {
        i64 g = i / (chunks * cols);
        i64 q = (i / cols) % chunks;
        int c = (int)(i % cols);
        float acc = 0.0f;
        i64 end = min(rows, (q + 1) * chunk);
        for (i64 r = q * chunk; r < end; r++) acc += load_f(x, (g * rows + r) * cols + c);
        part[i] = acc;
    }
}
extern "C" __global__ void col_partials(const float* x, float* part, i64 rows, int cols, int groups, i64 chunk) { col_partials_t(x, part, rows, cols, groups, chunk); }
extern "C" __global__ void col_partials_bf16(const bf16_t* x, float* part, i64 rows, int cols, int groups, i64 chunk) { col_partials_t(x, part, rows, cols, groups, chunk); }

// Stage 2 of the column sums: out[g, c] (+)= sum over chunks q of part[g, q, c], in order.
extern "C" __global__ void col_finish(const float* part, float* out, i64 chunks, int cols, int groups, int accumulate) {
    GRID_STRIDE(i, (i64)groups * cols) {
        i64 g = i / cols;
        int c = (int)(i % cols);
        float acc = 0.0f;
        for (i64 q = 0; q < chunks; q++) acc += part[(g * chunks + q) * cols + c];
        out[i] = accumulate ? out[i] + acc : acc;
    }
}

// a += b
template <typename T>
__device__ void add_inplace_t(T* a, const T* b, i64 n) {
    GRID_STRIDE(i, n) { store_f(a, i, load_f(a, i) + load_f(b, i)); }
}
extern "C" __global__ void add_inplace(float* a, const float* b, i64 n) { add_inplace_t(a, b, n); }
extern "C" __global__ void add_inplace_bf16(bf16_t* a, const bf16_t* b, i64 n) { add_inplace_t(a, b, n); }

// Storage conversions (a bf16 plan's mixed-precision seams: f32 routing and loss buffers
// meeting bf16 activations and GEMM operands); f32 -> bf16 is bench_ops.cu's
// f32_to_bf16_kernel.
extern "C" __global__ void cast_bf16_f32(const bf16_t* x, float* y, i64 n) {
    GRID_STRIDE(i, n) { y[i] = bf16_to_f32(x[i]); }
}

// Adam with bias corrections c1 = 1 - beta1^t, c2 = 1 - beta2^t.
__device__ __forceinline__ float adam_step(float* p, const float* g, float* m, float* v, i64 i, float lr, float b1, float b2, float eps, float c1, float c2) {
    float gi = g[i];
    float mi = b1 * m[i] + (1.0f - b1) * gi;
    float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    float pi = p[i] - lr * (mi / c1) / (sqrtf(vi / c2) + eps);
    p[i] = pi;
    return pi;
}
extern "C" __global__ void adam(float* p, const float* g, float* m, float* v, i64 n, float lr, float b1, float b2, float eps, float c1, float c2) {
    GRID_STRIDE(i, n) { adam_step(p, g, m, v, i, lr, b1, b2, eps, c1, c2); }
}
// Adam on the f32 master that also rewrites its bf16 shadow (the GEMMs' copy) in the same pass.
extern "C" __global__ void adam_shadow(float* p, const float* g, float* m, float* v, bf16_t* shadow, i64 n, float lr, float b1, float b2, float eps, float c1, float c2) {
    GRID_STRIDE(i, n) { shadow[i] = f32_to_bf16(adam_step(p, g, m, v, i, lr, b1, b2, eps, c1, c2)); }
}

// Regression loss: dy = (y - t) / denom (when dy is not null); partial[block] = sum (y - t)^2
// over the block's elements, in f64. The target and dy are f32 in every plan.
template <typename T>
__device__ void mse_t(const T* y, const float* t, float* dy, double* partial, i64 n, double denom) {
    __shared__ double part[256];
    double acc = 0.0;
    GRID_STRIDE(i, n) {
        double d = (double)load_f(y, i) - (double)t[i];
        acc += d * d;
        if (dy) dy[i] = (float)(d / denom);
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = part[0];
}
extern "C" __global__ void mse(const float* y, const float* t, float* dy, double* partial, i64 n, double denom) { mse_t(y, t, dy, partial, n, denom); }
extern "C" __global__ void mse_bf16(const bf16_t* y, const float* t, float* dy, double* partial, i64 n, double denom) { mse_t(y, t, dy, partial, n, denom); }

// Gating: probs = softmax(logits) per row; top-k in descending probability, ties to the lower
// expert; weights renormalised over the k when asked. One warp per token: lanes stride over
// the experts (coalesced loads and stores), max and sum by warp reductions; round j of the
// top-k is a warp arg-max over the experts after round j-1's pick in (probability desc,
// expert asc) order, which is the order the choices are made in. Launch with 32 threads per
// token (any grid: warps stride over the tokens).
extern "C" __global__ void route_topk(const float* logits, float* probs, int* idx, float* w, i64 tokens, int e, int k, int renorm) {
    const int lane = threadIdx.x & 31;
    const i64 warps = ((i64)gridDim.x * blockDim.x) >> 5;
    for (i64 t = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; t < tokens; t += warps) {
        const float* l = logits + t * e;
        float* p = probs + t * e;
        float mx = neg_inf();
        for (int x = lane; x < e; x += 32) mx = fmaxf(mx, l[x]);
        mx = warp_max(mx);
        float sum = 0.0f;
        for (int x = lane; x < e; x += 32) sum += expf(l[x] - mx);
        sum = warp_sum(sum);
        for (int x = lane; x < e; x += 32) p[x] = expf(l[x] - mx) / sum;
        __syncwarp();
        float pv = 0.0f, chosen_sum = 0.0f;
        int px = -1;
        for (int j = 0; j < k; j++) {
            // This lane's best candidate after the previous pick; none: value -1.
            float bv = -1.0f;
            int bx = 0x7fffffff;
            for (int x = lane; x < e; x += 32) {
                float v = p[x];
                bool after = px < 0 || v < pv || (v == pv && x > px);
                if (after && (v > bv || (v == bv && x < bx))) {
                    bv = v;
                    bx = x;
                }
            }
            for (int o = 16; o > 0; o >>= 1) {
                float ov = __shfl_xor_sync(0xffffffffu, bv, o);
                int ox = __shfl_xor_sync(0xffffffffu, bx, o);
                if (ov > bv || (ov == bv && ox < bx)) {
                    bv = ov;
                    bx = ox;
                }
            }
            // No candidate (NaN probabilities): an in-range expert, so later kernels stay in bounds.
            if (bx == 0x7fffffff) {
                bx = j % e;
                bv = p[bx];
            }
            pv = bv;
            px = bx;
            chosen_sum += bv;
            if (lane == 0) {
                idx[t * k + j] = bx;
                w[t * k + j] = bv;
            }
        }
        if (renorm && lane == 0) {
            for (int j = 0; j < k; j++) w[t * k + j] = w[t * k + j] / chosen_sum;
        }
        __syncwarp();
    }
}

// Routing backward (softmax + top-k + aux loss): dlogits from dw; aux_grad[e] is the aux
// term's gradient with respect to each probability (computed on the host from the table).
// One warp per token, as route_topk: lanes stride over the experts (coalesced), the k
// choices' terms go in by lane 0 (k is small), the inner product by a warp reduction.
// Launch with 32 threads per token (any grid: warps stride over the tokens). (One thread per
// token walked its row four times, uncoalesced: 83 us at 16,384 tokens x 64 experts on H200.)
extern "C" __global__ void route_bwd(const float* probs, const int* idx, const float* dw, const float* aux_grad, float* dlogits, i64 tokens, int e, int k, int renorm) {
    const int lane = threadIdx.x & 31;
    const i64 warps = ((i64)gridDim.x * blockDim.x) >> 5;
    for (i64 t = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; t < tokens; t += warps) {
        const float* p = probs + t * e;
        float* dl = dlogits + t * e;
        const int* sel = idx + t * k;
        const float* g = dw + t * k;
        // dl holds dp until the last loop.
        for (int x = lane; x < e; x += 32) dl[x] = aux_grad[x];
        __syncwarp();
        if (lane == 0) {
            if (renorm) {
                float s = 0.0f;
                for (int j = 0; j < k; j++) s += p[sel[j]];
                float dot = 0.0f;
                for (int j = 0; j < k; j++) dot += g[j] * p[sel[j]] / s;
                for (int j = 0; j < k; j++) dl[sel[j]] += (g[j] - dot) / s;
            } else {
                for (int j = 0; j < k; j++) dl[sel[j]] += g[j];
            }
        }
        __syncwarp();
        float inner = 0.0f;
        for (int x = lane; x < e; x += 32) inner += p[x] * dl[x];
        inner = warp_sum(inner);
        for (int x = lane; x < e; x += 32) dl[x] = p[x] * (dl[x] - inner);
        __syncwarp();
    }
}

#define SQRT_2_OVER_PI 0.7978846f
#define GELU_C 0.044715f

// GELU (tanh form) as x * sigmoid(2u): 0.5 x (1 + tanh u) = x / (1 + e^(-2u)), one fast
// exponential and one fast division per value (relative error ~1e-6, far below bf16's 4e-3,
// and no cancellation where tanh u nears -1). The clamp at |u| = 40 keeps e^(-2u) finite
// (and below the 2^126 where __fdividef gives up) while s itself already rounds to 0 or 1
// there, so the gradient's s (1 - s) vanishes for large |x| as the exact one does.
__device__ __forceinline__ float gelu_sigmoid(float x) {
    float u = SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
    return __fdividef(1.0f, 1.0f + __expf(-2.0f * fminf(fmaxf(u, -40.0f), 40.0f)));
}

__device__ __forceinline__ float act_f(float x, int kind) {
    // ReLU as a compare, not fmaxf(x, 0), which turns a NaN into 0 and hides it from the loss.
    return kind == 0 ? x * gelu_sigmoid(x) : (x < 0.0f ? 0.0f : x);
}

// The gradient g at the output, taken back through the activation at x. GELU:
// d/dx [x s(2u)] = s + 2 x s (1 - s) u'; ReLU passes g where x > 0 (and a NaN x on).
__device__ __forceinline__ float act_back(float x, float g, int kind) {
    if (kind != 0) return x > 0.0f ? g : (x != x ? x : 0.0f);
    float s = gelu_sigmoid(x);
    float du = SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_C * x * x);
    return g * (s + 2.0f * x * s * (1.0f - s) * du);
}

__device__ __forceinline__ bool aligned16(const void* p) { return ((unsigned long long)p & 15) == 0; }

// Activation forward: kind 0 = GELU (tanh form), 1 = ReLU. bf16 storage takes eight values
// per 16-byte word when n and the pointers allow (the MoE benchmark times this kernel too).
template <typename T>
__device__ void act_fwd_t(const T* h, T* a, i64 n, int kind) {
    GRID_STRIDE(i, n) { store_f(a, i, act_f(load_f(h, i), kind)); }
}
extern "C" __global__ void act_fwd(const float* h, float* a, i64 n, int kind) { act_fwd_t(h, a, n, kind); }
extern "C" __global__ void act_fwd_bf16(const bf16_t* h, bf16_t* a, i64 n, int kind) {
    if (n % 8 == 0 && aligned16(h) && aligned16(a)) {
        GRID_STRIDE(i, n / 8) {
            float v[8];
            unpack8(((const uint4*)h)[i], v);
            for (int q = 0; q < 8; q++) v[q] = act_f(v[q], kind);
            ((uint4*)a)[i] = pack8(v);
        }
    } else {
        act_fwd_t(h, a, n, kind);
    }
}

template <typename T>
__device__ void act_bwd_t(const T* h, const T* da, T* dh, i64 n, int kind) {
    GRID_STRIDE(i, n) { store_f(dh, i, act_back(load_f(h, i), load_f(da, i), kind)); }
}
extern "C" __global__ void act_bwd(const float* h, const float* da, float* dh, i64 n, int kind) { act_bwd_t(h, da, dh, n, kind); }
extern "C" __global__ void act_bwd_bf16(const bf16_t* h, const bf16_t* da, bf16_t* dh, i64 n, int kind) {
    if (n % 8 == 0 && aligned16(h) && aligned16(da) && aligned16(dh)) {
        GRID_STRIDE(i, n / 8) {
            float x[8], g[8];
            unpack8(((const uint4*)h)[i], x);
            unpack8(((const uint4*)da)[i], g);
            for (int q = 0; q < 8; q++) x[q] = act_back(x[q], g[q], kind);
            ((uint4*)dh)[i] = pack8(x);
        }
    } else {
        act_bwd_t(h, da, dh, n, kind);
    }
}

// LayerNorm forward, one warp per row: y = (x - mean) * rstd * g + b; stats = (mean, rstd).
template <typename T>
__device__ void ln_fwd_t(const T* x, const float* g, const float* b, T* y, float* stats, i64 rows, int m) {
    i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    i64 warps = ((i64)gridDim.x * blockDim.x) / 32;
    for (i64 r = warp; r < rows; r += warps) {
        const T* xr = x + r * m;
        float s = 0.0f;
        for (int i = lane; i < m; i += 32) s += load_f(xr, i);
        float mean = warp_sum(s) / m;
        float v = 0.0f;
        for (int i = lane; i < m; i += 32) {
            float d = load_f(xr, i) - mean;
            v += d * d;
        }
        float rstd = rsqrtf(warp_sum(v) / m + 1e-5f);
        for (int i = lane; i < m; i += 32) store_f(y, r * m + i, (load_f(xr, i) - mean) * rstd * g[i] + b[i]);
        if (lane == 0) {
            stats[2 * r] = mean;
            stats[2 * r + 1] = rstd;
        }
    }
}
extern "C" __global__ void ln_fwd(const float* x, const float* g, const float* b, float* y, float* stats, i64 rows, int m) { ln_fwd_t(x, g, b, y, stats, rows, m); }

// LayerNorm backward for dx (one warp per row), plus the residual gradient when given.
template <typename T>
__device__ void ln_bwd_dx_t(const T* x, const float* g, const float* stats, const T* dy, const T* residual, T* dx, i64 rows, int m) {
    i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    i64 warps = ((i64)gridDim.x * blockDim.x) / 32;
    for (i64 r = warp; r < rows; r += warps) {
        float mean = stats[2 * r], rstd = stats[2 * r + 1];
        float sg = 0.0f, sgx = 0.0f;
        for (int i = lane; i < m; i += 32) {
            float xh = (load_f(x, r * m + i) - mean) * rstd;
            float gg = load_f(dy, r * m + i) * g[i];
            sg += gg;
            sgx += gg * xh;
        }
        sg = warp_sum(sg);
        sgx = warp_sum(sgx);
        for (int i = lane; i < m; i += 32) {
            float xh = (load_f(x, r * m + i) - mean) * rstd;
            float gg = load_f(dy, r * m + i) * g[i];
            float d = rstd * (gg - (sg + xh * sgx) / m);
            store_f(dx, r * m + i, residual ? d + load_f(residual, r * m + i) : d);
        }
    }
}
extern "C" __global__ void ln_bwd_dx(const float* x, const float* g, const float* stats, const float* dy, const float* residual, float* dx, i64 rows, int m) {
    ln_bwd_dx_t(x, g, stats, dy, residual, dx, rows, m);
}

// LayerNorm parameter gradients, stage 1: partial sums over chunks of `chunk` rows, one
// thread per (chunk, column): pg[q, c], pb[q, c]. Stage 2 is col_finish (rows in order within
// a chunk and chunks in order: deterministic).
template <typename T>
__device__ void ln_bwd_partials_t(const T* x, const float* stats, const T* dy, float* pg, float* pb, i64 rows, int m, i64 chunk) {
    i64 chunks = (rows + chunk - 1) / chunk;
    GRID_STRIDE(i, chunks * m) {
        i64 q = i / m;
        int c = (int)(i % m);
        float ag = 0.0f, ab = 0.0f;
        i64 end = min(rows, (q + 1) * chunk);
        for (i64 r = q * chunk; r < end; r++) {
            float xh = (load_f(x, r * m + c) - stats[2 * r]) * stats[2 * r + 1];
            float d = load_f(dy, r * m + c);
            ag += d * xh;
            ab += d;
        }
        pg[i] = ag;
        pb[i] = ab;
    }
}
extern "C" __global__ void ln_bwd_partials(const float* x, const float* stats, const float* dy, float* pg, float* pb, i64 rows, int m, i64 chunk) {
    ln_bwd_partials_t(x, stats, dy, pg, pb, rows, m, chunk);
}
extern "C" __global__ void ln_bwd_partials_bf16(const bf16_t* x, const float* stats, const bf16_t* dy, float* pg, float* pb, i64 rows, int m, i64 chunk) {
    ln_bwd_partials_t(x, stats, dy, pg, pb, rows, m, chunk);
}

// Causal softmax of the attention scores, in place, one warp per row of `probs` (rows of
// length seq, row r is query r % seq): p[j] = exp(s[j] - max) / sum for j <= i, else 0.
// The scores (scaled) come from cuBLAS (src/backend/cuda/exec/attention.rs).
template <typename T>
__device__ __forceinline__ void attn_softmax_causal_t(const float* s, T* p, i64 rows, int seq) {
    i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    i64 warps = ((i64)gridDim.x * blockDim.x) / 32;
    for (i64 r = warp; r < rows; r += warps) {
        const float* row = s + r * seq;
        T* out = p + r * seq;
        int i = (int)(r % seq);
        float mx = neg_inf();
        for (int j = lane; j <= i; j += 32) mx = fmaxf(mx, row[j]);
        mx = warp_max(mx);
        float sum = 0.0f;
        for (int j = lane; j <= i; j += 32) sum += expf(row[j] - mx);
        float inv = 1.0f / warp_sum(sum);
        // Each lane reads row[j] before writing out[j]: in place (s == p) is safe.
        for (int j = lane; j < seq; j += 32) store_f(out, j, j <= i ? expf(row[j] - mx) * inv : 0.0f);
    }
}
extern "C" __global__ void attn_softmax_causal(float* p, i64 rows, int seq) { attn_softmax_causal_t(p, p, rows, seq); }

// The bf16 plans' causal softmax: f32 scores `s` (a scratch slice of heads from cuBLAS) in,
// bf16 probabilities `p` out, rows as in attn_softmax_causal.
extern "C" __global__ void attn_softmax_causal_bf16(const float* s, bf16_t* p, i64 rows, int seq) { attn_softmax_causal_t(s, p, rows, seq); }

// Its backward, in place on dp (one warp per row): ds[j] = p[j] (dp[j] - sum_k dp[k] p[k])
// * scale for j <= i, else 0.
extern "C" __global__ void attn_softmax_causal_bwd(const float* p, float* dp, i64 rows, int seq, float scale) {
    i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    i64 warps = ((i64)gridDim.x * blockDim.x) / 32;
    for (i64 r = warp; r < rows; r += warps) {
        const float* pr = p + r * seq;
        float* d = dp + r * seq;
        int i = (int)(r % seq);
        float dot = 0.0f;
        for (int j = lane; j <= i; j += 32) dot += d[j] * pr[j];
        dot = warp_sum(dot);
        for (int j = lane; j < seq; j += 32) d[j] = j <= i ? pr[j] * (d[j] - dot) * scale : 0.0f;
    }
}

// The bf16 plans' softmax backward: bf16 probabilities p, f32 dp (cuBLAS, scratch) in, bf16
// ds out (the next GEMMs' operand), rows as in attn_softmax_causal_bwd.
extern "C" __global__ void attn_softmax_causal_bwd_bf16(const bf16_t* p, const float* dp, bf16_t* ds, i64 rows, int seq, float scale) {
    i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    i64 warps = ((i64)gridDim.x * blockDim.x) / 32;
    for (i64 r = warp; r < rows; r += warps) {
        const bf16_t* pr = p + r * seq;
        const float* d = dp + r * seq;
        bf16_t* out = ds + r * seq;
        int i = (int)(r % seq);
        float dot = 0.0f;
        for (int j = lane; j <= i; j += 32) dot += d[j] * bf16_to_f32(pr[j]);
        dot = warp_sum(dot);
        for (int j = lane; j < seq; j += 32) out[j] = f32_to_bf16(j <= i ? bf16_to_f32(pr[j]) * (d[j] - dot) * scale : 0.0f);
    }
}

// Two-source row gather for the expert layouts: code > 0 takes a[code - 1], code < 0 takes
// b[-code - 1], 0 writes zeros. `out` may be `b` when every negative code is the identity
// (rows kept in place), as the chunk merge does; those rows are left untouched.
template <typename T>
__device__ void gather2_rows_t(const T* a, const T* b, const int* code, T* out, i64 rows, int cols) {
    GRID_STRIDE(i, rows * cols) {
        i64 r = i / cols;
        int c = (int)(i % cols);
        int s = code[r];
        if (s > 0) out[i] = a[(i64)(s - 1) * cols + c];
        else if (s < 0) {
            if (out != b || (i64)(-s - 1) != r) out[i] = b[(i64)(-s - 1) * cols + c];
        } else store_f(out, i, 0.0f);
    }
}
extern "C" __global__ void gather2_rows(const float* a, const float* b, const int* code, float* out, i64 rows, int cols) { gather2_rows_t(a, b, code, out, rows, cols); }

// ---- LoadBatch: the cpu's data stream drawn on the device ----------------------------------
// rng::stream(seed, "data.x", step, global_seq) is ChaCha8 (rand_chacha: 64-bit block counter,
// stream id 0) keyed by (seed, tag hash, step, global_seq); fill_normal draws pair p from
// keystream words 4p..4p+3 (two u64s, low word first) by Box-Muller in f64. One thread makes
// one ChaCha block = 4 pairs. Mirrors src/math/rng.rs (chacha8_block, normal_pair_at).
__device__ __forceinline__ unsigned rotl32(unsigned v, int c) { return (v << c) | (v >> (32 - c)); }
#define CHACHA_QR(a, b, c, d) \
    x[a] += x[b]; x[d] = rotl32(x[d] ^ x[a], 16); x[c] += x[d]; x[b] = rotl32(x[b] ^ x[c], 12); \
    x[a] += x[b]; x[d] = rotl32(x[d] ^ x[a], 8);  x[c] += x[d]; x[b] = rotl32(x[b] ^ x[c], 7);

__device__ void chacha8_block(const unsigned key[8], unsigned long long counter, unsigned out[16]) {
    unsigned x[16] = {0x61707865u, 0x3320646eu, 0x79622d32u, 0x6b206574u,
                      key[0], key[1], key[2], key[3], key[4], key[5], key[6], key[7],
                      (unsigned)counter, (unsigned)(counter >> 32), 0u, 0u};
    unsigned init[16];
    for (int i = 0; i < 16; i++) init[i] = x[i];
    for (int r = 0; r < 4; r++) {
        CHACHA_QR(0, 4, 8, 12) CHACHA_QR(1, 5, 9, 13) CHACHA_QR(2, 6, 10, 14) CHACHA_QR(3, 7, 11, 15)
        CHACHA_QR(0, 5, 10, 15) CHACHA_QR(1, 6, 11, 12) CHACHA_QR(2, 7, 8, 13) CHACHA_QR(3, 4, 9, 14)
    }
    for (int i = 0; i < 16; i++) out[i] = x[i] + init[i];
}

// x[b * per_seq + i] for b < batch: normal draws of sequence first_seq + b.
// k0..k5: the key words of (seed, tag hash, step); words 6, 7 are the sequence number.
template <typename T>
__device__ void load_batch_x_t(T* x, i64 per_seq, int batch, unsigned k0, unsigned k1, unsigned k2,
                               unsigned k3, unsigned k4, unsigned k5, i64 first_seq) {
    i64 blocks_per_seq = (per_seq + 7) / 8;
    GRID_STRIDE(i, (i64)batch * blocks_per_seq) {
        i64 b = i / blocks_per_seq;
        i64 blk = i % blocks_per_seq;
        unsigned long long seq = (unsigned long long)(first_seq + b);
        unsigned key[8] = {k0, k1, k2, k3, k4, k5, (unsigned)seq, (unsigned)(seq >> 32)};
        unsigned w[16];
        chacha8_block(key, (unsigned long long)blk, w);
        T* xs = x + b * per_seq;
        for (int j = 0; j < 4; j++) {
            i64 at = (blk * 4 + j) * 2;
            if (at >= per_seq) break;
            unsigned long long a = ((unsigned long long)w[4 * j + 1] << 32) | w[4 * j];
            unsigned long long c = ((unsigned long long)w[4 * j + 3] << 32) | w[4 * j + 2];
            double u1 = fmax((double)(a >> 11) * (1.0 / 9007199254740992.0), 1e-300);
            double u2 = (double)(c >> 11) * (1.0 / 9007199254740992.0);
            double r = sqrt(-2.0 * log(u1));
            double th = 6.283185307179586 * u2;
            store_f(xs, at, (float)(r * cos(th)));
            if (at + 1 < per_seq) store_f(xs, at + 1, (float)(r * sin(th)));
        }
    }
}
extern "C" __global__ void load_batch_x(float* x, i64 per_seq, int batch, unsigned k0, unsigned k1, unsigned k2,
                                        unsigned k3, unsigned k4, unsigned k5, i64 first_seq) {
    load_batch_x_t(x, per_seq, batch, k0, k1, k2, k3, k4, k5, first_seq);
}
extern "C" __global__ void load_batch_x_bf16(bf16_t* x, i64 per_seq, int batch, unsigned k0, unsigned k1, unsigned k2,
                                             unsigned k3, unsigned k4, unsigned k5, i64 first_seq) {
    load_batch_x_t(x, per_seq, batch, k0, k1, k2, k3, k4, k5, first_seq);
}

// Regression target of LoadBatch: t[row, i] = x[row, (i + 1) % cols].
template <typename T, typename U>
__device__ void rotate_rows_left_t(const T* x, U* t, i64 rows, int cols) {
    GRID_STRIDE(i, rows * cols) {
        i64 r = i / cols;
        int c = (int)(i % cols);
        store_f(t, i, load_f(x, r * cols + (c + 1) % cols));
    }
}
extern "C" __global__ void rotate_rows_left(const float* x, float* t, i64 rows, int cols) { rotate_rows_left_t(x, t, rows, cols); }
// bf16 plans: the inputs are bf16, the target (read by the loss only) f32.
extern "C" __global__ void rotate_rows_left_bf16(const bf16_t* x, float* t, i64 rows, int cols) { rotate_rows_left_t(x, t, rows, cols); }

// ---------------------------------------------------------------------------------------------
// The bf16 forms of the row kernels above: eight values per 16-byte word when a row is a whole
// number of words and the pointers allow, one index division per word instead of two per
// value (the scalar forms ran at a quarter to a half of the copy rate on H100, the bias add at
// a third). Per value the math and its order are the scalar form's, so results are identical,
// except LayerNorm's row sums, which add in word order.

__device__ __forceinline__ bool rows_of_words(int cols, const void* a, const void* b, const void* c) {
    return cols % 8 == 0 && aligned16(a) && aligned16(b) && aligned16(c);
}

extern "C" __global__ void gather_rows_bf16(const bf16_t* src, const int* map, bf16_t* dst, i64 rows, int cols) {
    if (!rows_of_words(cols, src, dst, nullptr)) {
        gather_rows_t(src, map, dst, rows, cols);
        return;
    }
    const int wc = cols / 8;
    const uint4* s4 = (const uint4*)src;
    uint4* d4 = (uint4*)dst;
    GRID_STRIDE(i, rows * wc) {
        const i64 r = i / wc;
        const int s = map[r];
        d4[i] = s >= 0 ? s4[(i64)s * wc + (i - r * wc)] : make_uint4(0, 0, 0, 0);
    }
}

extern "C" __global__ void gather2_rows_bf16(const bf16_t* a, const bf16_t* b, const int* code, bf16_t* out, i64 rows, int cols) {
    if (!rows_of_words(cols, a, b, out)) {
        gather2_rows_t(a, b, code, out, rows, cols);
        return;
    }
    const int wc = cols / 8;
    const uint4 *a4 = (const uint4*)a, *b4 = (const uint4*)b;
    uint4* o4 = (uint4*)out;
    GRID_STRIDE(i, rows * wc) {
        const i64 r = i / wc, c = i - r * wc;
        const int s = code[r];
        if (s > 0) o4[i] = a4[(i64)(s - 1) * wc + c];
        else if (s < 0) {
            if (out != b || (i64)(-s - 1) != r) o4[i] = b4[(i64)(-s - 1) * wc + c];
        } else o4[i] = make_uint4(0, 0, 0, 0);
    }
}

extern "C" __global__ void token_sum_rows_bf16(const bf16_t* src, const int* slots, bf16_t* dst, i64 tokens, int k, int cols) {
    if (!rows_of_words(cols, src, dst, nullptr)) {
        token_sum_rows_t(src, slots, dst, tokens, k, cols);
        return;
    }
    const int wc = cols / 8;
    const uint4* s4 = (const uint4*)src;
    GRID_STRIDE(i, tokens * wc) {
        const i64 t = i / wc, c = i - t * wc;
        float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        for (int j = 0; j < k; j++) {
            const int s = slots[t * k + j];
            if (s >= 0) {
                float v[8];
                unpack8(s4[(i64)s * wc + c], v);
                for (int q = 0; q < 8; q++) acc[q] += v[q];
            }
        }
        ((uint4*)dst)[i] = pack8(acc);
    }
}

extern "C" __global__ void combine_fwd_bf16(const bf16_t* back, const int* slots, const float* w, const bf16_t* residual, bf16_t* out, i64 tokens, int k, int cols) {
    if (!rows_of_words(cols, back, residual, out)) {
        combine_fwd_t(back, slots, w, residual, out, tokens, k, cols);
        return;
    }
    const int wc = cols / 8;
    const uint4* b4 = (const uint4*)back;
    GRID_STRIDE(i, tokens * wc) {
        const i64 t = i / wc, c = i - t * wc;
        float acc[8];
        if (residual) unpack8(((const uint4*)residual)[i], acc);
        else for (int q = 0; q < 8; q++) acc[q] = 0.0f;
        for (int j = 0; j < k; j++) {
            const int s = slots[t * k + j];
            if (s >= 0) {
                const float wt = w[t * k + j];
                float v[8];
                unpack8(b4[(i64)s * wc + c], v);
                for (int q = 0; q < 8; q++) acc[q] += wt * v[q];
            }
        }
        ((uint4*)out)[i] = pack8(acc);
    }
}

extern "C" __global__ void combine_bwd_rows_bf16(const bf16_t* dout, const int* slots, const float* w, bf16_t* dback, i64 assigns, int k, int cols) {
    if (!rows_of_words(cols, dout, dback, nullptr)) {
        combine_bwd_rows_t(dout, slots, w, dback, assigns, k, cols);
        return;
    }
    const int wc = cols / 8;
    GRID_STRIDE(i, assigns * wc) {
        const i64 a = i / wc, c = i - a * wc;
        const int s = slots[a];
        if (s >= 0) {
            float v[8];
            unpack8(((const uint4*)dout)[(a / k) * wc + c], v);
            for (int q = 0; q < 8; q++) v[q] = w[a] * v[q];
            ((uint4*)dback)[(i64)s * wc + c] = pack8(v);
        }
    }
}

extern "C" __global__ void ln_fwd_bf16(const bf16_t* x, const float* g, const float* b, bf16_t* y, float* stats, i64 rows, int m) {
    if (!rows_of_words(m, x, y, nullptr)) {
        ln_fwd_t(x, g, b, y, stats, rows, m);
        return;
    }
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32, wc = m / 8;
    const i64 warps = ((i64)gridDim.x * blockDim.x) / 32;
    for (i64 r = warp; r < rows; r += warps) {
        const uint4* xr = (const uint4*)(x + r * m);
        float v[8], s = 0.0f, var = 0.0f;
        for (int w = lane; w < wc; w += 32) {
            unpack8(xr[w], v);
            for (int q = 0; q < 8; q++) s += v[q];
        }
        const float mean = warp_sum(s) / m;
        for (int w = lane; w < wc; w += 32) {
            unpack8(xr[w], v);
            for (int q = 0; q < 8; q++) var += (v[q] - mean) * (v[q] - mean);
        }
        const float rstd = rsqrtf(warp_sum(var) / m + 1e-5f);
        uint4* yr = (uint4*)(y + r * m);
        for (int w = lane; w < wc; w += 32) {
            unpack8(xr[w], v);
            for (int q = 0; q < 8; q++) v[q] = (v[q] - mean) * rstd * g[w * 8 + q] + b[w * 8 + q];
            yr[w] = pack8(v);
        }
        if (lane == 0) {
            stats[2 * r] = mean;
            stats[2 * r + 1] = rstd;
        }
    }
}

extern "C" __global__ void ln_bwd_dx_bf16(const bf16_t* x, const float* g, const float* stats, const bf16_t* dy, const bf16_t* residual, bf16_t* dx, i64 rows, int m) {
    if (!rows_of_words(m, x, dy, dx) || !aligned16(residual)) {
        ln_bwd_dx_t(x, g, stats, dy, residual, dx, rows, m);
        return;
    }
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32, wc = m / 8;
    const i64 warps = ((i64)gridDim.x * blockDim.x) / 32;
    for (i64 r = warp; r < rows; r += warps) {
        const float mean = stats[2 * r], rstd = stats[2 * r + 1];
        const uint4 *xr = (const uint4*)(x + r * m), *dr = (const uint4*)(dy + r * m);
        float xv[8], dv[8], sg = 0.0f, sgx = 0.0f;
        for (int w = lane; w < wc; w += 32) {
            unpack8(xr[w], xv);
            unpack8(dr[w], dv);
            for (int q = 0; q < 8; q++) {
                const float xh = (xv[q] - mean) * rstd, gg = dv[q] * g[w * 8 + q];
                sg += gg;
                sgx += gg * xh;
            }
        }
        sg = warp_sum(sg);
        sgx = warp_sum(sgx);
        uint4* out = (uint4*)(dx + r * m);
        for (int w = lane; w < wc; w += 32) {
            float rv[8];
            unpack8(xr[w], xv);
            unpack8(dr[w], dv);
            if (residual) unpack8(((const uint4*)(residual + r * m))[w], rv);
            for (int q = 0; q < 8; q++) {
                const float xh = (xv[q] - mean) * rstd, gg = dv[q] * g[w * 8 + q];
                const float d = rstd * (gg - (sg + xh * sgx) / m);
                xv[q] = residual ? d + rv[q] : d;
            }
            out[w] = pack8(xv);
        }
    }
}

extern "C" __global__ void add_bias_rows_bf16(bf16_t* y, const float* bias, i64 rows, int cols, i64 group_rows) {
    if (!rows_of_words(cols, y, nullptr, nullptr)) {
        add_bias_rows_t(y, bias, rows, cols, group_rows);
        return;
    }
    const int wc = cols / 8;
    GRID_STRIDE(i, rows * wc) {
        const i64 r = i / wc;
        const float* b = bias + (r / group_rows) * cols + (i - r * wc) * 8;
        float v[8];
        unpack8(((const uint4*)y)[i], v);
        for (int q = 0; q < 8; q++) v[q] += b[q];
        ((uint4*)y)[i] = pack8(v);
    }
}
