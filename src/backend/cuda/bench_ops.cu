// moelab cuda backend: bf16 kernels of the MoE layer benchmark (`moelab bench`). Storage is
// bf16 (raw 16 bits, common.cuh), arithmetic f32. Compiled together with plan_ops.cu.

// One block per destination row: dst[r, :] = map[r] >= 0 ? src[map[r], :] : 0.
extern "C" __global__ void bf16_gather_rows(const bf16_t* src, const int* map, bf16_t* dst, i64 rows, int cols) {
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        int s = map[r];
        if (cols % 8 == 0) {
            int cv = cols / 8;
            uint4* d = (uint4*)(dst + r * cols);
            const uint4* sr = (const uint4*)(src + (i64)(s < 0 ? 0 : s) * cols);
            for (int c = threadIdx.x; c < cv; c += blockDim.x) d[c] = s >= 0 ? sr[c] : make_uint4(0, 0, 0, 0);
        } else {
            for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[r * cols + c] = s >= 0 ? src[(i64)s * cols + c] : (bf16_t)0;
        }
    }
}

// One block per token: out[t, :] = sum_j w[t*k+j] * back[slots[t*k+j], :].
extern "C" __global__ void bf16_combine(const bf16_t* back, const int* slots, const float* w, bf16_t* out, i64 tokens, int k, int cols) {
    for (i64 t = blockIdx.x; t < tokens; t += gridDim.x) {
        if (cols % 8 == 0) {
            for (int c = threadIdx.x; c < cols / 8; c += blockDim.x) {
                float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                for (int j = 0; j < k; j++) {
                    int s = slots[t * k + j];
                    if (s < 0) continue;
                    float v[8];
                    unpack8(((const uint4*)(back + (i64)s * cols))[c], v);
                    float wj = w[t * k + j];
                    for (int q = 0; q < 8; q++) acc[q] += wj * v[q];
                }
                ((uint4*)(out + t * cols))[c] = pack8(acc);
            }
        } else {
            for (int c = threadIdx.x; c < cols; c += blockDim.x) {
                float acc = 0.0f;
                for (int j = 0; j < k; j++) {
                    int s = slots[t * k + j];
                    if (s >= 0) acc += w[t * k + j] * load_f(back, (i64)s * cols + c);
                }
                store_f(out, t * cols + c, acc);
            }
        }
    }
}

// One block per assignment: dback[slots[a], :] = w[a] * dout[a / k, :].
extern "C" __global__ void bf16_combine_bwd_rows(const bf16_t* dout, const int* slots, const float* w, bf16_t* dback, i64 assigns, int k, int cols) {
    for (i64 a = blockIdx.x; a < assigns; a += gridDim.x) {
        int s = slots[a];
        if (s < 0) continue;
        float wa = w[a];
        if (cols % 8 == 0) {
            for (int c = threadIdx.x; c < cols / 8; c += blockDim.x) {
                float v[8];
                unpack8(((const uint4*)(dout + (a / k) * cols))[c], v);
                for (int q = 0; q < 8; q++) v[q] *= wa;
                ((uint4*)(dback + (i64)s * cols))[c] = pack8(v);
            }
        } else {
            for (int c = threadIdx.x; c < cols; c += blockDim.x) store_f(dback, (i64)s * cols + c, wa * load_f(dout, (a / k) * cols + c));
        }
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
            if (cols % 8 == 0) {
                for (int c = lane; c < cols / 8; c += 32) {
                    float x[8], y[8];
                    unpack8(((const uint4*)(dout + (a / k) * cols))[c], x);
                    unpack8(((const uint4*)(back + (i64)s * cols))[c], y);
                    for (int q = 0; q < 8; q++) acc += x[q] * y[q];
                }
            } else {
                for (int c = lane; c < cols; c += 32) acc += load_f(dout, (a / k) * cols + c) * load_f(back, (i64)s * cols + c);
            }
        }
        acc = warp_sum(acc);
        if (lane == 0) dw[a] = acc;
    }
}

// One block per token: dst[t, :] = sum_j src[slots[t*k+j], :].
extern "C" __global__ void bf16_token_sum(const bf16_t* src, const int* slots, bf16_t* dst, i64 tokens, int k, int cols) {
    for (i64 t = blockIdx.x; t < tokens; t += gridDim.x) {
        if (cols % 8 == 0) {
            for (int c = threadIdx.x; c < cols / 8; c += blockDim.x) {
                float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                for (int j = 0; j < k; j++) {
                    int s = slots[t * k + j];
                    if (s < 0) continue;
                    float v[8];
                    unpack8(((const uint4*)(src + (i64)s * cols))[c], v);
                    for (int q = 0; q < 8; q++) acc[q] += v[q];
                }
                ((uint4*)(dst + t * cols))[c] = pack8(acc);
            }
        } else {
            for (int c = threadIdx.x; c < cols; c += blockDim.x) {
                float acc = 0.0f;
                for (int j = 0; j < k; j++) {
                    int s = slots[t * k + j];
                    if (s >= 0) acc += load_f(src, (i64)s * cols + c);
                }
                store_f(dst, t * cols + c, acc);
            }
        }
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
