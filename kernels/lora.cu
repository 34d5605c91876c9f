// The LoRA branch, forward and backward: y += s (x A^T) B^T. Twin of src/model/cpu/lora.rs.
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

// ---------------------------------------------------------------------------------------------
// Tiled variants (the default; the kernels above are `SQLORA_LORA=simple`). Same contracts.
//
// The two kinds of long sum above do one multiply-add per two shared-memory loads, so they run
// at the speed of shared memory, not of the math or of DRAM. Here each thread owns a 4 x 4 tile
// of outputs (4 rows of the block times 4 rank indices: 8 loads for 16 multiply-adds) and one
// slice of the long axis; at the end the slices' partial sums are added in slice order through
// shared memory. Deterministic (a fixed summation order for given sizes), no atomics, f32
// throughout; the order differs from the simple kernels', so results agree to rounding.
// lora_add and lora_dx stage the small operands in shared memory so that every global access
// is coalesced, and keep the simple kernels' arithmetic exactly (same products, same order).
#define LT_THREADS 256
#define LT_ROWS 16  // rows of the output (tokens, or columns of u) per block: 4 groups of 4
#define LT_CHUNK 64  // elements of the long axis staged per round
#define LT_MAX_R 64

// How a block's threads split: tx picks 4 rank indices (rg = ceil(r / 4) groups), ty 4 of its
// 16 rows, s the slice of the long axis; slices = 256 / (4 rg) (threads past slices * 4 * rg idle).
struct TileSplit {
    int rg, slices, tx, ty, s;
    __device__ TileSplit(int r) {
        rg = (r + 3) / 4;
        slices = LT_THREADS / (4 * rg);
        tx = threadIdx.x % rg;
        ty = (threadIdx.x / rg) % 4;
        s = threadIdx.x / (4 * rg);
    }
};

// Sum the slices' 4 x 4 tiles in slice order; returns through `emit(row, c, total)` for the
// block's rows < 16 and c < r. part: [slices, 16, 4 rg] f32 in shared memory (at most 4096).
template <typename Emit>
__device__ __forceinline__ void sum_slices(float* part, const float (&acc)[4][4], const TileSplit& sp, int r,
                                           Emit emit) {
    const int rp = 4 * sp.rg;
    if (sp.s < sp.slices) {
        for (int i = 0; i < 4; i++)
            for (int q = 0; q < 4; q++) part[(sp.s * LT_ROWS + sp.ty * 4 + i) * rp + sp.tx * 4 + q] = acc[i][q];
    }
    __syncthreads();
    for (int o = threadIdx.x; o < LT_ROWS * r; o += LT_THREADS) {
        const int row = o / r, c = o % r;
        float total = 0.0f;
        for (int s = 0; s < sp.slices; s++) total += part[(s * LT_ROWS + row) * rp + c];
        emit(row, c, total);
    }
}

// row_proj's contract: out[t, c] = sum_j u[t, j] m(c, j) for the block's 16 tokens and c < r.
// out: [T, r] f32 (written); u: [T, J] bf16; m: [r, J] (jr false) or [J, r] (jr true) bf16.
// Grid ceil(T / 16) blocks of 256; r <= 64.
__device__ __forceinline__ void row_proj_tiled(float* out, const bf16* u, const bf16* m, bool jr, int T, int J,
                                               int r) {
    __shared__ float us[LT_CHUNK][LT_ROWS + 1];   // [j][token]
    __shared__ float ms[LT_CHUNK][LT_MAX_R + 1];  // [j][rank]
    __shared__ float part[LT_THREADS * 16];
    const TileSplit sp(r);
    const int t0 = blockIdx.x * LT_ROWS, rp = 4 * sp.rg;
    float acc[4][4] = {};
    for (int j0 = 0; j0 < J; j0 += LT_CHUNK) {
        for (int i = threadIdx.x; i < LT_ROWS * LT_CHUNK; i += LT_THREADS) {
            const int row = i / LT_CHUNK, jj = i % LT_CHUNK, t = t0 + row, j = j0 + jj;
            us[jj][row] = (t < T && j < J) ? to_f32(u[(long)t * J + j]) : 0.0f;
        }
        for (int i = threadIdx.x; i < rp * LT_CHUNK; i += LT_THREADS) {
            // Consecutive threads read consecutive elements in either layout; ranks past r are 0.
            const int c = jr ? i % rp : i / LT_CHUNK, jj = jr ? i / rp : i % LT_CHUNK, j = j0 + jj;
            ms[jj][c] = (c < r && j < J) ? to_f32(jr ? m[(long)j * r + c] : m[(long)c * J + j]) : 0.0f;
        }
        __syncthreads();
        if (sp.s < sp.slices) {
            for (int jj = sp.s; jj < LT_CHUNK; jj += sp.slices) {
                float a[4], b[4];
                for (int i = 0; i < 4; i++) a[i] = us[jj][sp.ty * 4 + i];
                for (int q = 0; q < 4; q++) b[q] = ms[jj][sp.tx * 4 + q];
                for (int i = 0; i < 4; i++)
                    for (int q = 0; q < 4; q++) acc[i][q] += a[i] * b[q];
            }
        }
        __syncthreads();
    }
    sum_slices(part, acc, sp, r, [&](int row, int c, float total) {
        if (t0 + row < T) out[(long)(t0 + row) * r + c] = total;
    });
}

extern "C" __global__ void lora_xa_tiled(float* xa, const bf16* x, const bf16* a, int T, int K, int r) {
    row_proj_tiled(xa, x, a, false, T, K, r);
}

extern "C" __global__ void lora_g_tiled(float* g, const bf16* dy, const bf16* b, int T, int N, int r) {
    row_proj_tiled(g, dy, b, true, T, N, r);
}

// token_sum's contract: for the block's 16 columns col and c < r,
// out[at(col, c)] += scale * sum_t u[t, col] w[t, c], at(col, c) = c * U + col (rank_major) or col * r + c.
// out: f32 (accumulated); u: [T, U] bf16; w: [T, r] f32. Grid ceil(U / 16) blocks of 256; r <= 64.
__device__ __forceinline__ void token_sum_tiled(float* out, bool rank_major, const bf16* u, const float* w, int T,
                                                int U, int r, float scale) {
    __shared__ float us[LT_CHUNK][LT_ROWS + 1];   // [token][column]
    __shared__ float ws[LT_CHUNK][LT_MAX_R + 1];  // [token][rank]
    __shared__ float part[LT_THREADS * 16];
    const TileSplit sp(r);
    const int col0 = blockIdx.x * LT_ROWS, rp = 4 * sp.rg;
    float acc[4][4] = {};
    for (int t0 = 0; t0 < T; t0 += LT_CHUNK) {
        for (int i = threadIdx.x; i < LT_CHUNK * LT_ROWS; i += LT_THREADS) {
            const int tt = i / LT_ROWS, cc = i % LT_ROWS, t = t0 + tt, col = col0 + cc;
            us[tt][cc] = (t < T && col < U) ? to_f32(u[(long)t * U + col]) : 0.0f;
        }
        for (int i = threadIdx.x; i < LT_CHUNK * rp; i += LT_THREADS) {
            const int tt = i / rp, c = i % rp, t = t0 + tt;
            ws[tt][c] = (t < T && c < r) ? w[(long)t * r + c] : 0.0f;
        }
        __syncthreads();
        if (sp.s < sp.slices) {
            for (int tt = sp.s; tt < LT_CHUNK; tt += sp.slices) {
                float a[4], b[4];
                for (int i = 0; i < 4; i++) a[i] = us[tt][sp.ty * 4 + i];
                for (int q = 0; q < 4; q++) b[q] = ws[tt][sp.tx * 4 + q];
                for (int i = 0; i < 4; i++)
                    for (int q = 0; q < 4; q++) acc[i][q] += a[i] * b[q];
            }
        }
        __syncthreads();
    }
    sum_slices(part, acc, sp, r, [&](int row, int c, float total) {
        const int col = col0 + row;
        if (col < U) out[rank_major ? (long)c * U + col : (long)col * r + c] += scale * total;
    });
}

extern "C" __global__ void lora_db_tiled(float* db, const bf16* dy, const float* xa, int T, int N, int r,
                                         float scale) {
    token_sum_tiled(db, false, dy, xa, T, N, r, scale);
}

extern "C" __global__ void lora_da_tiled(float* da, const float* g, const bf16* x, int T, int K, int r,
                                         float scale) {
    token_sum_tiled(da, true, x, g, T, K, r, scale);
}

// lora_add's and lora_dx's contract, for a tile of 16 tokens (blockIdx.y) by 64 columns
// (blockIdx.x): y[t, n] += scale * sum_c p[t, c] m(n, c), m(n, c) = m[n * r + c] (B: [N, r]) or
// m[c * N + n] (A: [r, N], cn). The tile's rows of p and columns of m are staged in shared memory
// (read coalesced); each thread then sums 4 outputs exactly as the simple kernels do.
// y: [T, N] bf16 (updated); p: [T, r] f32; m: bf16. Grid (ceil(N / 64), ceil(T / 16)) of 256.
__device__ __forceinline__ void rank_expand_tiled(bf16* y, const float* p, const bf16* m, bool cn, int T, int N,
                                                  int r, float scale) {
    __shared__ float ps[LT_ROWS][LT_MAX_R];
    __shared__ float ms[LT_CHUNK][LT_MAX_R + 1];  // [column][rank]
    const int n0 = blockIdx.x * LT_CHUNK, t0 = blockIdx.y * LT_ROWS;
    for (int i = threadIdx.x; i < LT_ROWS * r; i += LT_THREADS) {
        const int tt = i / r, c = i % r, t = t0 + tt;
        ps[tt][c] = t < T ? p[(long)t * r + c] : 0.0f;
    }
    for (int i = threadIdx.x; i < LT_CHUNK * r; i += LT_THREADS) {
        // B's tile is one contiguous run of 64 r values; A's is r runs of 64.
        const int nn = cn ? i % LT_CHUNK : i / r, c = cn ? i / LT_CHUNK : i % r, n = n0 + nn;
        ms[nn][c] = n < N ? to_f32(cn ? m[(long)c * N + n] : m[(long)n * r + c]) : 0.0f;
    }
    __syncthreads();
    const int nn = threadIdx.x % LT_CHUNK, n = n0 + nn;
    if (n >= N) return;
    for (int tt = threadIdx.x / LT_CHUNK; tt < LT_ROWS; tt += LT_THREADS / LT_CHUNK) {
        const int t = t0 + tt;
        if (t >= T) break;
        float s = 0.0f;
        for (int c = 0; c < r; c++) s += ps[tt][c] * ms[nn][c];
        const long i = (long)t * N + n;
        y[i] = to_bf16(to_f32(y[i]) + scale * s);
    }
}

extern "C" __global__ void lora_add_tiled(bf16* y, const float* xa, const bf16* b, int T, int N, int r,
                                          float scale) {
    rank_expand_tiled(y, xa, b, false, T, N, r, scale);
}

extern "C" __global__ void lora_dx_tiled(bf16* dx, const float* g, const bf16* a, int T, int K, int r,
                                         float scale) {
    rank_expand_tiled(dx, g, a, true, T, K, r, scale);
}
