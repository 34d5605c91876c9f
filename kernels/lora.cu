// The LoRA branch, forward and backward: y += s (x A^T) B^T. Twin of src/backend/cpu/lora.rs.
// A: [r, in] and B: [out, r] are bf16 copies of the f32 master weights; x A^T and every gradient
// are kept in f32. Straightforward kernels (r is small): correctness first.
#include "common.cuh"

// xa[t, c] = sum_k x[t, k] A[c, k]; one warp per (t, c).
// xa: [T, r] f32 (written); x: [T, K] bf16; a: [r, K] bf16.
extern "C" __global__ void lora_xa(float* xa, const bf16* x, const bf16* a, int T, int K, int r) {
    const long w = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (w >= (long)T * r) return;
    const int t = w / r, c = w % r;
    float s = 0.0f;
    for (int k = lane; k < K; k += 32) s += to_f32(x[(long)t * K + k]) * to_f32(a[(long)c * K + k]);
    s = warp_sum(s);
    if (lane == 0) xa[w] = s;
}

// y[t, n] += scale * sum_c xa[t, c] B[n, c]; one thread per (t, n).
// y: [T, N] bf16 (updated); xa: [T, r] f32; b: [N, r] bf16.
extern "C" __global__ void lora_add(bf16* y, const float* xa, const bf16* b, int T, int N, int r, float scale) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)T * N) return;
    const int t = i / N, n = i % N;
    float s = 0.0f;
    for (int c = 0; c < r; c++) s += xa[(long)t * r + c] * to_f32(b[(long)n * r + c]);
    y[i] = to_bf16(to_f32(y[i]) + scale * s);
}

// g[t, c] = sum_n dy[t, n] B[n, c]; one warp per (t, c).
// g: [T, r] f32 (written); dy: [T, N] bf16; b: [N, r] bf16.
extern "C" __global__ void lora_g(float* g, const bf16* dy, const bf16* b, int T, int N, int r) {
    const long w = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (w >= (long)T * r) return;
    const int t = w / r, c = w % r;
    float s = 0.0f;
    for (int n = lane; n < N; n += 32) s += to_f32(dy[(long)t * N + n]) * to_f32(b[(long)n * r + c]);
    s = warp_sum(s);
    if (lane == 0) g[w] = s;
}

// The two sums over tokens (dB and dA) are long (T terms) and have few outputs (r per row or column),
// so each block takes 32 outputs, one per lane, and its 8 warps split the tokens (t = warp, warp + 8,
// ...); the partial sums meet in shared memory in a fixed order, so the result is deterministic.
#define SPLIT_T_WARPS 8

// out[o] += scale * sum_t f(t, o) for the block's 32 outputs o, f given per t by `term`.
template <class Term>
__device__ __forceinline__ void split_t_sum(float* out, long n_out, int T, float scale, Term term) {
    __shared__ float part[SPLIT_T_WARPS][32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const long o = (long)blockIdx.x * 32 + lane;
    float s = 0.0f;
    if (o < n_out)
        for (int t = warp; t < T; t += SPLIT_T_WARPS) s += term(t, o);
    part[warp][lane] = s;
    __syncthreads();
    if (warp == 0 && o < n_out) {
        float total = 0.0f;
        for (int w = 0; w < SPLIT_T_WARPS; w++) total += part[w][lane];
        out[o] += scale * total;
    }
}

// dB[n, c] += scale * sum_t dy[t, n] xa[t, c]; output o = n * r + c.
// db: [N, r] f32 (accumulated); dy: [T, N] bf16; xa: [T, r] f32.
// Grid ceil(N * r / 32) blocks of 256 threads.
extern "C" __global__ void lora_db(float* db, const bf16* dy, const float* xa, int T, int N, int r, float scale) {
    split_t_sum(db, (long)N * r, T, scale,
                [=](int t, long o) { return to_f32(dy[(long)t * N + o / r]) * xa[(long)t * r + o % r]; });
}

// dA[c, k] += scale * sum_t g[t, c] x[t, k]; output o = c * K + k.
// da: [r, K] f32 (accumulated); g: [T, r] f32; x: [T, K] bf16.
// Grid ceil(r * K / 32) blocks of 256 threads.
extern "C" __global__ void lora_da(float* da, const float* g, const bf16* x, int T, int K, int r, float scale) {
    split_t_sum(da, (long)r * K, T, scale,
                [=](int t, long o) { return g[(long)t * r + o / K] * to_f32(x[(long)t * K + o % K]); });
}

// dx[t, k] += scale * sum_c g[t, c] A[c, k]; one thread per (t, k).
// dx: [T, K] bf16 (updated: the frozen path's dx is already there); g: [T, r] f32; a: [r, K] bf16.
extern "C" __global__ void lora_dx(bf16* dx, const float* g, const bf16* a, int T, int K, int r, float scale) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)T * K) return;
    const int t = i / K, k = i % K;
    float s = 0.0f;
    for (int c = 0; c < r; c++) s += g[(long)t * r + c] * to_f32(a[(long)c * K + k]);
    dx[i] = to_bf16(to_f32(dx[i]) + scale * s);
}
