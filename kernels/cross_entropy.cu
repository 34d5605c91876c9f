// Cross-entropy through the output head, fused: loss and dh of the labelled rows only, with the
// logits of a row recomputed rather than stored, so [T, vocab] is never materialised.
// Twin of src/backend/cpu/cross_entropy.rs. One block per row; correctness first.
#include "common.cuh"

// With p = softmax(h_t W^T):  loss_t = logsumexp - logit[target],  dh_t = inv_count (p - onehot) W
// dh: [T, d] bf16 (written; zero for rows without a target); loss: [T] f32 (written, 0 without target);
// h: [T, d] bf16; w: [V, d] bf16; targets: [T] i32 (-1: no loss). Dynamic shared memory: 2 d floats.
extern "C" __global__ void cross_entropy_fwd_bwd(bf16* dh, float* loss, const bf16* h, const bf16* w, const int* targets,
                                                 int d, int V, float inv_count) {
    extern __shared__ float sm[];
    float* hs = sm;       // [d] the row's hidden state
    float* acc = sm + d;  // [d] sum_v p_v W_v
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    const int target = targets[row];
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        hs[i] = to_f32(h[row * d + i]);
        acc[i] = 0.0f;
    }
    __syncthreads();
    if (target < 0 || target >= V) {
        for (int i = threadIdx.x; i < d; i += blockDim.x) dh[row * d + i] = to_bf16(0.0f);
        if (threadIdx.x == 0) loss[row] = 0.0f;
        return;
    }
    // Pass 1: the row's max logit and sum of exponentials (online, per thread, then merged).
    float m = -INFINITY, s = 0.0f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float z = 0.0f;
        for (int i = 0; i < d; i++) z += hs[i] * to_f32(w[(long)v * d + i]);
        if (z > m) {
            s = s * __expf(m - z) + 1.0f;
            m = z;
        } else {
            s += __expf(z - m);
        }
    }
    // Merge (m, s) across the block: the global max first, then the rescaled sums.
    __shared__ float mmax;
    float bm = warp_max(m);
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = bm;
    __syncthreads();
    if (threadIdx.x == 0) {
        float x = scratch[0];
        for (int k = 1; k < blockDim.x / 32; k++) x = fmaxf(x, scratch[k]);
        mmax = x;
    }
    __syncthreads();
    const float gmax = mmax;
    const float total = block_sum(m == -INFINITY ? 0.0f : s * __expf(m - gmax), scratch);
    const float lse = gmax + logf(total);
    // Pass 2: dh = inv_count (sum_v p_v W_v - W_target), accumulated in shared memory.
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float z = 0.0f;
        for (int i = 0; i < d; i++) z += hs[i] * to_f32(w[(long)v * d + i]);
        const float p = __expf(z - lse);
        for (int i = 0; i < d; i++) atomicAdd(&acc[i], p * to_f32(w[(long)v * d + i]));
        if (v == target) loss[row] = lse - z;  // exactly one thread holds the target's logit
    }
    __syncthreads();
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        dh[row * d + i] = to_bf16(inv_count * (acc[i] - to_f32(w[(long)target * d + i])));
}
