// Gating softmax over the rows of logits [rows, cols]: one warp per row, f32 arithmetic.
// Same semantics as moelab::math::routing::softmax_rows (max-subtracted, exact expf).

template <typename T>
__device__ __forceinline__ void softmax_rows_impl(const T* x, T* y, int rows, int cols) {
    const int warps_per_block = blockDim.x >> 5;
    const i64 row = (i64)blockIdx.x * warps_per_block + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    // The whole warp leaves together, so the full-mask shuffles below stay valid.
    if (row >= rows) return;
    const i64 base = row * (i64)cols;
    float mx = neg_inf();
    for (int c = lane; c < cols; c += 32) mx = fmaxf(mx, load_f(x, base + c));
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int c = lane; c < cols; c += 32) sum += expf(load_f(x, base + c) - mx);
    sum = warp_sum(sum);
    const float inv = 1.0f / sum;
    for (int c = lane; c < cols; c += 32) store_f(y, base + c, expf(load_f(x, base + c) - mx) * inv);
}

extern "C" __global__ void softmax_rows_f32(const float* x, float* y, int rows, int cols) {
    softmax_rows_impl(x, y, rows, cols);
}

extern "C" __global__ void softmax_rows_bf16(const bf16_t* x, bf16_t* y, int rows, int cols) {
    softmax_rows_impl(x, y, rows, cols);
}
