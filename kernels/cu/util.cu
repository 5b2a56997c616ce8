// Buffer fills: a constant (NaN poisoning before a check) and normal samples drawn on the
// device (large benchmark inputs without a host round trip). Grid-stride loops over n values.

template <typename T>
__device__ __forceinline__ void fill_impl(T* p, i64 n, float value) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) store_f(p, i, value);
}

// splitmix64: a counter-based generator, so each element's sample depends only on (seed, i).
__device__ __forceinline__ unsigned long long splitmix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// N(0, std^2) by Box-Muller on two 32-bit uniforms taken from one 64-bit draw.
template <typename T>
__device__ __forceinline__ void fill_normal_impl(T* p, i64 n, unsigned long long seed, float std) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const unsigned long long z = splitmix64(seed ^ splitmix64((unsigned long long)i));
        const float u1 = ((float)(unsigned int)(z >> 40) + 1.0f) * (1.0f / 16777216.0f);  // (0, 1]
        const float u2 = (float)(unsigned int)(z & 0xffffffu) * (1.0f / 16777216.0f);     // [0, 1)
        const float r = sqrtf(-2.0f * logf(u1));
        store_f(p, i, std * r * cospif(2.0f * u2));
    }
}

extern "C" __global__ void fill_f32(float* p, i64 n, float value) { fill_impl(p, n, value); }

extern "C" __global__ void fill_bf16(bf16_t* p, i64 n, float value) { fill_impl(p, n, value); }

extern "C" __global__ void fill_normal_f32(float* p, i64 n, unsigned long long seed, float std) {
    fill_normal_impl(p, n, seed, std);
}

extern "C" __global__ void fill_normal_bf16(bf16_t* p, i64 n, unsigned long long seed, float std) {
    fill_normal_impl(p, n, seed, std);
}
