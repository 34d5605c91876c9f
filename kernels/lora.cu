// The LoRA branch, forward and backward: y += s (x A^T) B^T. Twin of src/backend/cpu/lora.rs.
// A: [r, in] and B: [out, r] are bf16 copies of the f32 master weights; x A^T and every gradient
// are kept in f32. r is small (at most 64 here), so the sums that end in r outputs per token or per
// column stage their long operand in shared memory once per block instead of once per rank index.
#include "common.cuh"

// The two projections onto the rank (x A^T and dy B) have r outputs per token from long rows. A
// block owns 16 tokens and every rank index and walks the rows in chunks of 64 staged in shared
// memory (the token rows and the matching piece of A or B), so each row is read once, not once per
// rank index. Each output is summed by one thread in order.
#define RP_ROWS 16
#define RP_CHUNK 64
#define RP_MAX_R 64
#define RP_THREADS 256
#define RP_PER_THREAD (RP_ROWS * RP_MAX_R / RP_THREADS)

// out[t, c] = sum_j u[t, j] m(c, j) for the block's 16 tokens t and every c < r, with m(c, j) =
// m[c * J + j] (m: [r, J], A's layout) or m[j * r + c] (jr: m is [J, r], B's layout).
// out: [T, r] f32 (written); u: [T, J] bf16. Blocks of RP_THREADS; r <= RP_MAX_R.
__device__ __forceinline__ void row_proj(float* out, const bf16* u, const bf16* m, bool jr, int T, int J, int r) {
    __shared__ float us[RP_ROWS][RP_CHUNK + 1];
    __shared__ float ms[RP_MAX_R][RP_CHUNK + 1];
    const int t0 = blockIdx.x * RP_ROWS, n_out = RP_ROWS * r;
    float acc[RP_PER_THREAD];
    for (int q = 0; q < RP_PER_THREAD; q++) acc[q] = 0.0f;
    for (int j0 = 0; j0 < J; j0 += RP_CHUNK) {
        for (int i = threadIdx.x; i < RP_ROWS * RP_CHUNK; i += blockDim.x) {
            const int row = i / RP_CHUNK, jj = i % RP_CHUNK, t = t0 + row, j = j0 + jj;
            us[row][jj] = (t < T && j < J) ? to_f32(u[(long)t * J + j]) : 0.0f;
        }
        for (int i = threadIdx.x; i < r * RP_CHUNK; i += blockDim.x) {
            // Consecutive threads read consecutive elements in either layout.
            const int c = jr ? i % r : i / RP_CHUNK, jj = jr ? i / r : i % RP_CHUNK, j = j0 + jj;
            ms[c][jj] = j < J ? to_f32(jr ? m[(long)j * r + c] : m[(long)c * J + j]) : 0.0f;
        }
        __syncthreads();
        for (int q = 0; q < RP_PER_THREAD; q++) {
            const int o = threadIdx.x + q * RP_THREADS, row = o / r, c = o % r;
            if (o >= n_out) break;
            float s = acc[q];
            for (int jj = 0; jj < RP_CHUNK; jj++) s += us[row][jj] * ms[c][jj];
            acc[q] = s;
        }
        __syncthreads();
    }
    for (int q = 0; q < RP_PER_THREAD; q++) {
        const int o = threadIdx.x + q * RP_THREADS, row = o / r, c = o % r, t = t0 + row;
        if (o >= n_out) break;
        if (t < T) out[(long)t * r + c] = acc[q];
    }
}

// xa[t, c] = sum_k x[t, k] A[c, k].
// xa: [T, r] f32 (written); x: [T, K] bf16; a: [r, K] bf16. Grid ceil(T / 16) blocks of 256; r <= 64.
extern "C" __global__ void lora_xa(float* xa, const bf16* x, const bf16* a, int T, int K, int r) {
    row_proj(xa, x, a, false, T, K, r);
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

// g[t, c] = sum_n dy[t, n] B[n, c].
// g: [T, r] f32 (written); dy: [T, N] bf16; b: [N, r] bf16. Grid ceil(T / 16) blocks of 256; r <= 64.
extern "C" __global__ void lora_g(float* g, const bf16* dy, const bf16* b, int T, int N, int r) {
    row_proj(g, dy, b, true, T, N, r);
}

// The two sums over tokens (dB and dA) are long (T terms) with few outputs per column (r). A block
// owns 16 consecutive columns of u (dy for dB, x for dA) and all r rank indices, and walks the tokens
// in chunks of 32 rows staged in shared memory, so each element of u is read once, in 32-byte row
// pieces. Each output is summed by one thread in token order: deterministic, no atomics.
#define TS_COLS 16
#define TS_ROWS 32
#define TS_MAX_R 64
#define TS_THREADS 256
#define TS_PER_THREAD (TS_COLS * TS_MAX_R / TS_THREADS)

// For the block's columns col and every c < r: out[at(col, c)] += scale * sum_t u[t, col] w[t, c],
// at(col, c) = c * U + col when rank_major, else col * r + c.
// out: f32 (accumulated); u: [T, U] bf16; w: [T, r] f32. Blocks of TS_THREADS; r <= TS_MAX_R.
__device__ __forceinline__ void token_sum(float* out, bool rank_major, const bf16* u, const float* w, int T, int U,
                                          int r, float scale) {
    __shared__ float us[TS_ROWS][TS_COLS];
    __shared__ float ws[TS_ROWS][TS_MAX_R];
    const int col0 = blockIdx.x * TS_COLS, n_out = TS_COLS * r;
    float acc[TS_PER_THREAD];
    for (int j = 0; j < TS_PER_THREAD; j++) acc[j] = 0.0f;
    for (int t0 = 0; t0 < T; t0 += TS_ROWS) {
        for (int i = threadIdx.x; i < TS_ROWS * TS_COLS; i += blockDim.x) {
            const int row = i / TS_COLS, cc = i % TS_COLS, t = t0 + row, col = col0 + cc;
            us[row][cc] = (t < T && col < U) ? to_f32(u[(long)t * U + col]) : 0.0f;
        }
        for (int i = threadIdx.x; i < TS_ROWS * r; i += blockDim.x) {
            const int row = i / r, c = i % r, t = t0 + row;
            ws[row][c] = t < T ? w[(long)t * r + c] : 0.0f;
        }
        __syncthreads();
        for (int j = 0; j < TS_PER_THREAD; j++) {
            const int o = threadIdx.x + j * TS_THREADS, cc = o % TS_COLS, c = o / TS_COLS;
            if (o >= n_out) break;
            float s = acc[j];
            for (int row = 0; row < TS_ROWS; row++) s += us[row][cc] * ws[row][c];
            acc[j] = s;
        }
        __syncthreads();
    }
    for (int j = 0; j < TS_PER_THREAD; j++) {
        const int o = threadIdx.x + j * TS_THREADS, cc = o % TS_COLS, c = o / TS_COLS, col = col0 + cc;
        if (o >= n_out) break;
        if (col < U) out[rank_major ? (long)c * U + col : (long)col * r + c] += scale * acc[j];
    }
}

// dB[n, c] += scale * sum_t dy[t, n] xa[t, c].
// db: [N, r] f32 (accumulated); dy: [T, N] bf16; xa: [T, r] f32.
// Grid ceil(N / 16) blocks of 256 threads; r <= 64.
extern "C" __global__ void lora_db(float* db, const bf16* dy, const float* xa, int T, int N, int r, float scale) {
    token_sum(db, false, dy, xa, T, N, r, scale);
}

// dA[c, k] += scale * sum_t g[t, c] x[t, k].
// da: [r, K] f32 (accumulated); g: [T, r] f32; x: [T, K] bf16.
// Grid ceil(K / 16) blocks of 256 threads; r <= 64.
extern "C" __global__ void lora_da(float* da, const float* g, const bf16* x, int T, int K, int r, float scale) {
    token_sum(da, true, x, g, T, K, r, scale);
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
