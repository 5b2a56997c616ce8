// moelab cuda backend: routing slots on the device. moelab's capacity rule: per expert, first
// choices before second choices, each in token order; assignments beyond the capacity drop.
// Kept assignments of expert x take consecutive slots after the kept rows of experts < x.
// Compiled together with plan_ops.cu.

// counts[x] += 1 for every assignment choosing x (counts zeroed by the caller). Each block
// counts into shared memory (e ints, dynamic shared memory) and adds its nonzero bins once:
// atomics on a few global addresses serialise (32,768 onto 8 took ~80 us on an H200).
extern "C" __global__ void route_hist(const int* idx, int* counts, i64 n, int e) {
    extern __shared__ int hist[];
    for (int i = threadIdx.x; i < e; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) atomicAdd(&hist[idx[i]], 1);
    __syncthreads();
    for (int i = threadIdx.x; i < e; i += blockDim.x)
        if (hist[i] != 0) atomicAdd(&counts[i], hist[i]);
}

// Walks expert x's assignments in choice-major order (position p: choice p / t of token p % t)
// with the whole block (blockDim a multiple of 32, at most 1024), in chunks of blockDim, and
// calls on_hit(a, j, rank) for each assignment a = token * k + j choosing x, with rank its
// position among x's assignments in that order: a block-wide prefix count, deterministic.
// Every thread of the block must call it.
template <class F>
__device__ void walk_expert(const int* idx, i64 t, int k, int x, F on_hit) {
    __shared__ int running, chunk_total;
    __shared__ int warp_off[32];
    const unsigned lane = threadIdx.x & 31, w = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (threadIdx.x == 0) running = 0;
    __syncthreads();
    const i64 n = t * k;
    for (i64 start = 0; start < n; start += blockDim.x) {
        const i64 p = start + threadIdx.x;
        i64 a = 0;
        int j = 0, hit = 0;
        if (p < n) {
            j = (int)(p / t);
            a = (p - (i64)j * t) * k + j;
            hit = idx[a] == x;
        }
        const unsigned mask = __ballot_sync(0xffffffffu, hit);
        const int before = __popc(mask & ((1u << lane) - 1u));
        if (lane == 0) warp_off[w] = __popc(mask);
        __syncthreads();
        if (w == 0) {
            int v = lane < warps ? warp_off[lane] : 0;
            int incl = v;
            for (int o = 1; o < 32; o <<= 1) {
                int u = __shfl_up_sync(0xffffffffu, incl, o);
                if ((int)lane >= o) incl += u;
            }
            if (lane < warps) warp_off[lane] = incl - v;
            if (lane == 31) chunk_total = incl;
        }
        __syncthreads();
        if (hit) on_hit(a, j, running + warp_off[w] + before);
        __syncthreads();
        if (threadIdx.x == 0) running += chunk_total;
        __syncthreads();
    }
}

// One block per expert x: the first `cap` of x's assignments (choice-major, token order; the
// host rule) stay. slots[a] = slot or -1 (dropped); map[slot] = token. cap < 0: no capacity.
extern "C" __global__ void route_slots(const int* idx, const int* counts, int* slots, int* map, i64 t, int k, int cap) {
    __shared__ int base;
    const int x = blockIdx.x;
    const int limit = cap < 0 ? 0x7fffffff : cap;
    if (threadIdx.x == 0) {
        int o = 0;
        for (int y = 0; y < x; y++) o += min(counts[y], limit);
        base = o;
    }
    __syncthreads();
    walk_expert(idx, t, k, x, [&](i64 a, int, int rank) {
        if (rank < limit) {
            const int s = base + rank;
            slots[a] = s;
            map[s] = (int)(a / k);
        } else {
            slots[a] = -1;
        }
    });
}

// Routing statistics on the device: stats[j * e + x] += 1 for every assignment of choice j to
// expert x (stats zeroed by the caller). Float adds of whole numbers are exact below 2^24, so
// the counts do not depend on the order of the atomics. Each block counts into shared memory
// (k * e floats, dynamic shared memory) and adds its nonzero bins once (see route_hist).
extern "C" __global__ void route_counts(const int* idx, float* stats, i64 n, int k, int e) {
    extern __shared__ float bins[];
    for (int i = threadIdx.x; i < k * e; i += blockDim.x) bins[i] = 0.0f;
    __syncthreads();
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        atomicAdd(&bins[(i % k) * e + idx[i]], 1.0f);
    __syncthreads();
    for (int i = threadIdx.x; i < k * e; i += blockDim.x)
        if (bins[i] != 0.0f) atomicAdd(&stats[i], bins[i]);
}

// A rank's dispatch slots under the global routing table (one block per expert x, blockDim a
// multiple of 32, at most 1024). tab: base[e] (kept rows of the experts before x), then for
// q = j * e + x the triple (assignments of x with choice < j, kept ones of them, kept of
// choice j). Walks x's assignments choice-major, each choice in token order (the host rule of
// Dispatch); the r-th of choice j is kept when r < kept(j, x) and takes slot
// base[x] + kept_before + r. slots[a] = slot or -1; map[slot] = token.
extern "C" __global__ void dispatch_slots(const int* idx, const int* tab, int* slots, int* map, i64 t, int k, int e) {
    const int x = blockIdx.x;
    walk_expert(idx, t, k, x, [&](i64 a, int j, int rank) {
        const int* q = tab + e + 3 * (j * e + x);
        const int r = rank - q[0];
        if (r < q[2]) {
            const int s = tab[x] + q[1] + r;
            slots[a] = s;
            map[s] = (int)(a / k);
        } else {
            slots[a] = -1;
        }
    });
}

// The row map of an expert layout from its blocks (dst, src, n), sorted by dst, without empty
// ones: map[r] = src row + 1 for an output row inside a block, 0 (a zero row) otherwise; the
// rows then move with gather2_rows. One thread per output row, a binary search over blocks.
extern "C" __global__ void block_row_map(const int* blocks, int nblocks, int* map, i64 rows) {
    for (i64 r = blockIdx.x * (i64)blockDim.x + threadIdx.x; r < rows; r += (i64)gridDim.x * blockDim.x) {
        int lo = 0, hi = nblocks - 1, b = -1;
        while (lo <= hi) {
            const int mid = (lo + hi) >> 1;
            if (blocks[3 * mid] <= r) { b = mid; lo = mid + 1; } else { hi = mid - 1; }
        }
        int code = 0;
        if (b >= 0) {
            const i64 off = r - blocks[3 * b];
            if (off < blocks[3 * b + 2]) code = blocks[3 * b + 1] + (int)off + 1;
        }
        map[r] = code;
    }
}
