// moelab-kernels: helpers shared by every op family. The Rust side prepends this file to each
// family's source before NVRTC compiles it, so the kernels need no headers (not even
// cuda_bf16.h): bf16 travels as its raw 16 bits and every kernel computes in f32.

typedef unsigned short bf16_t;
typedef long long i64;

// bf16 -> f32 is exact: the bf16 bits are the top half of the f32.
__device__ __forceinline__ float bf16_to_f32(bf16_t v) {
    return __uint_as_float(((unsigned int)v) << 16);
}

// f32 -> bf16 rounds to nearest, ties to even (what half::bf16::from_f32 does); NaN stays a
// NaN instead of rounding into infinity. sm_80 and later convert in one instruction (NaN
// becomes the canonical quiet NaN); older parts take the integer rule.
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
#if __CUDA_ARCH__ >= 800
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
#else
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (bf16_t)((u >> 16) | 0x0040u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
#endif
}

// Two f32 -> two bf16 packed in one word, `lo` in the low half (same rounding as f32_to_bf16).
__device__ __forceinline__ unsigned int f32x2_to_bf16x2(float lo, float hi) {
#if __CUDA_ARCH__ >= 800
    unsigned int r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return (unsigned int)f32_to_bf16(lo) | ((unsigned int)f32_to_bf16(hi) << 16);
#endif
}

// Typed loads and stores: storage is f32 or bf16, arithmetic is always f32.
__device__ __forceinline__ float load_f(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ float load_f(const bf16_t* p, i64 i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ void store_f(float* p, i64 i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f(bf16_t* p, i64 i, float v) { p[i] = f32_to_bf16(v); }

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block; every thread gets the result. blockDim.x must be a multiple of 32
// (at most 1024) and every thread of the block must call it. `sh` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* sh) {
    const int lane = threadIdx.x & 31;
    const int wid = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // an earlier call may still be reading sh[0]
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    if (wid == 0) {
        float w = lane < nwarps ? sh[lane] : 0.0f;
        w = warp_sum(w);
        if (lane == 0) sh[0] = w;
    }
    __syncthreads();
    return sh[0];
}

// 16 bytes, for vectorised row copies.
struct alignas(16) v16_t {
    unsigned int w[4];
};

// Eight bf16 values travel as one 16-byte word (rows whose width is a multiple of 8, at
// 16-byte aligned addresses): unpack to f32, and pack back with round-to-nearest-even.
__device__ __forceinline__ void unpack8(uint4 v, float* f) {
    unsigned int w[4] = {v.x, v.y, v.z, v.w};
    for (int q = 0; q < 4; q++) {
        f[2 * q] = __uint_as_float(w[q] << 16);
        f[2 * q + 1] = __uint_as_float(w[q] & 0xffff0000u);
    }
}

__device__ __forceinline__ uint4 pack8(const float* f) {
    unsigned int w[4];
    for (int q = 0; q < 4; q++) w[q] = f32x2_to_bf16x2(f[2 * q], f[2 * q + 1]);
    return make_uint4(w[0], w[1], w[2], w[3]);
}
