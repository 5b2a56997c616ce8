// Token permutation for expert dispatch and combine.
// permute_rows: out[i, :] = x[idx[i], :] for i < n_out (a gather); an index outside [0, n_in)
//   (by convention -1, an empty slot) yields a zero row.
// combine_rows: out[idx[i], :] += w[i] * y[i, :] for i < n_in (a weighted scatter-add into an
//   f32 accumulator); an index outside [0, n_out) is skipped. Rows that share a destination add
//   through f32 atomics, so the summation order (and the last bits) may vary between runs.
// Both walk rows with a grid-stride loop over blockIdx.x and columns over threadIdx.x.

template <typename T>
__device__ __forceinline__ void permute_rows_impl(const T* x, const int* idx, T* out, int n_out, int n_in, int cols) {
    const i64 row_bytes = (i64)cols * sizeof(T);
    // 16-byte copies when every row starts on a 16-byte boundary; uniform over the grid.
    const bool wide = (row_bytes % 16 == 0) && (((unsigned long long)x | (unsigned long long)out) % 16 == 0);
    for (i64 r = blockIdx.x; r < n_out; r += gridDim.x) {
        const int src = idx[r];
        const bool valid = src >= 0 && src < n_in;
        if (wide) {
            const i64 nv = row_bytes / 16;
            v16_t* o = (v16_t*)(out + r * cols);
            const v16_t* s = (const v16_t*)(x + (valid ? (i64)src * cols : 0));
            for (i64 c = threadIdx.x; c < nv; c += blockDim.x) {
                v16_t v;
                if (valid) {
                    v = s[c];
                } else {
                    v.w[0] = 0u; v.w[1] = 0u; v.w[2] = 0u; v.w[3] = 0u;
                }
                o[c] = v;
            }
        } else {
            T* o = out + r * cols;
            const T* s = x + (valid ? (i64)src * cols : 0);
            for (i64 c = threadIdx.x; c < cols; c += blockDim.x) o[c] = valid ? s[c] : (T)0;
        }
    }
}

template <typename T>
__device__ __forceinline__ void combine_rows_impl(const T* y, const float* w, const int* idx, float* out,
                                                  int n_in, int n_out, int cols) {
    for (i64 r = blockIdx.x; r < n_in; r += gridDim.x) {
        const int dst = idx[r];
        if (dst < 0 || dst >= n_out) continue;  // uniform over the block
        const float wr = w[r];
        float* o = out + (i64)dst * cols;
        const i64 base = r * (i64)cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) atomicAdd(o + c, wr * load_f(y, base + c));
    }
}

extern "C" __global__ void permute_rows_f32(const float* x, const int* idx, float* out, int n_out, int n_in, int cols) {
    permute_rows_impl(x, idx, out, n_out, n_in, cols);
}

extern "C" __global__ void permute_rows_bf16(const bf16_t* x, const int* idx, bf16_t* out, int n_out, int n_in, int cols) {
    permute_rows_impl(x, idx, out, n_out, n_in, cols);
}

extern "C" __global__ void combine_rows_f32(const float* y, const float* w, const int* idx, float* out,
                                            int n_in, int n_out, int cols) {
    combine_rows_impl(y, w, idx, out, n_in, n_out, cols);
}

extern "C" __global__ void combine_rows_bf16(const bf16_t* y, const float* w, const int* idx, float* out,
                                             int n_in, int n_out, int cols) {
    combine_rows_impl(y, w, idx, out, n_in, n_out, cols);
}
