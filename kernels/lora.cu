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

// dB[n, c] += scale * sum_t dy[t, n] xa[t, c]; one thread per (n, c).
// db: [N, r] f32 (accumulated); dy: [T, N] bf16; xa: [T, r] f32.
extern "C" __global__ void lora_db(float* db, const bf16* dy, const float* xa, int T, int N, int r, float scale) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)N * r) return;
    const int n = i / r, c = i % r;
    float s = 0.0f;
    for (int t = 0; t < T; t++) s += to_f32(dy[(long)t * N + n]) * xa[(long)t * r + c];
    db[i] += scale * s;
}

// dA[c, k] += scale * sum_t g[t, c] x[t, k]; one thread per (c, k).
// da: [r, K] f32 (accumulated); g: [T, r] f32; x: [T, K] bf16.
extern "C" __global__ void lora_da(float* da, const float* g, const bf16* x, int T, int K, int r, float scale) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)r * K) return;
    const int c = i / K, k = i % K;
    float s = 0.0f;
    for (int t = 0; t < T; t++) s += g[(long)t * r + c] * to_f32(x[(long)t * K + k]);
    da[i] += scale * s;
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
