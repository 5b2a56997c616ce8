// GELU, tanh approximation, forward and backward; elementwise over n values with a grid-stride
// loop. Same constants and formulas as moelab::math::activation (Activation::Gelu).

#define GELU_SQRT_2_OVER_PI 0.7978846f
#define GELU_C 0.044715f

template <typename T>
__device__ __forceinline__ void gelu_fwd_impl(const T* h, T* out, i64 n) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float x = load_f(h, i);
        const float u = GELU_SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
        store_f(out, i, 0.5f * x * (1.0f + tanhf(u)));
    }
}

template <typename T>
__device__ __forceinline__ void gelu_bwd_impl(const T* h, const T* da, T* dh, i64 n) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float x = load_f(h, i);
        const float g = load_f(da, i);
        const float u = GELU_SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
        const float t = tanhf(u);
        const float du = GELU_SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_C * x * x);
        store_f(dh, i, g * (0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du));
    }
}

extern "C" __global__ void gelu_fwd_f32(const float* h, float* out, i64 n) {
    gelu_fwd_impl(h, out, n);
}

extern "C" __global__ void gelu_fwd_bf16(const bf16_t* h, bf16_t* out, i64 n) {
    gelu_fwd_impl(h, out, n);
}

extern "C" __global__ void gelu_bwd_f32(const float* h, const float* da, float* dh, i64 n) {
    gelu_bwd_impl(h, da, dh, n);
}

extern "C" __global__ void gelu_bwd_bf16(const bf16_t* h, const bf16_t* da, bf16_t* dh, i64 n) {
    gelu_bwd_impl(h, da, dh, n);
}
