// moelab cuda backend: bf16 kernels of the MoE layer benchmark (`moelab bench`). Storage is
// bf16 (raw 16 bits, common.cuh), arithmetic f32. Compiled together with plan_ops.cu.

// dst[r, :] = map[r] >= 0 ? src[map[r], :] : 0
extern "C" __global__ void bf16_gather_rows(const bf16_t* src, const int* map, bf16_t* dst, i64 rows, int cols) {
    GRID_STRIDE(i, rows * cols) {
        i64 r = i / cols;
        int c = (int)(i % cols);
        int s = map[r];
        dst[i] = s >= 0 ? src[(i64)s * cols + c] : (bf16_t)0;
    }
}

// out[t, :] = sum_j w[t*k+j] * back[slots[t*k+j], :]
extern "C" __global__ void bf16_combine(const bf16_t* back, const int* slots, const float* w, bf16_t* out, i64 tokens, int k, int cols) {
    GRID_STRIDE(i, tokens * cols) {
        i64 t = i / cols;
        int c = (int)(i % cols);
        float acc = 0.0f;
        for (int j = 0; j < k; j++) {
            int s = slots[t * k + j];
            if (s >= 0) acc += w[t * k + j] * load_f(back, (i64)s * cols + c);
        }
        store_f(out, i, acc);
    }
}

// dback[slots[a], :] = w[a] * dout[a / k, :]
extern "C" __global__ void bf16_combine_bwd_rows(const bf16_t* dout, const int* slots, const float* w, bf16_t* dback, i64 assigns, int k, int cols) {
    GRID_STRIDE(i, assigns * cols) {
        i64 a = i / cols;
        int c = (int)(i % cols);
        int s = slots[a];
        if (s >= 0) store_f(dback, (i64)s * cols + c, w[a] * load_f(dout, (a / k) * cols + c));
    }
}

// dw[a] = dout[a / k, :] . back[slots[a], :], one warp per assignment.
extern "C" __global__ void bf16_combine_bwd_weights(const bf16_t* dout, const bf16_t* back, const int* slots, float* dw, i64 assigns, int k, int cols) {
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

// dst[t, :] = sum_j src[slots[t*k+j], :]
extern "C" __global__ void bf16_token_sum(const bf16_t* src, const int* slots, bf16_t* dst, i64 tokens, int k, int cols) {
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

extern "C" __global__ void bf16_gelu_fwd(const bf16_t* h, bf16_t* a, i64 n) {
    GRID_STRIDE(i, n) {
        float x = load_f(h, i);
        float u = SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
        store_f(a, i, 0.5f * x * (1.0f + tanhf(u)));
    }
}

extern "C" __global__ void bf16_gelu_bwd(const bf16_t* h, const bf16_t* da, bf16_t* dh, i64 n) {
    GRID_STRIDE(i, n) {
        float x = load_f(h, i), g = load_f(da, i);
        float u = SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
        float t = tanhf(u);
        float du = SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_C * x * x);
        store_f(dh, i, g * (0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du));
    }
}

// f32 -> bf16
extern "C" __global__ void f32_to_bf16_kernel(const float* x, bf16_t* y, i64 n) {
    GRID_STRIDE(i, n) { store_f(y, i, x[i]); }
}

// Deterministic pseudo-random fill in [-scale, scale) (hash of the index and seed).
extern "C" __global__ void bf16_fill_hash(bf16_t* x, i64 n, unsigned int seed, float scale) {
    GRID_STRIDE(i, n) {
        unsigned int h = (unsigned int)i * 2654435761u ^ seed;
        h ^= h >> 16; h *= 0x7feb352du; h ^= h >> 15; h *= 0x846ca68bu; h ^= h >> 16;
        store_f(x, i, scale * ((float)(h & 0xffffff) / 8388608.0f - 1.0f));
    }
}
