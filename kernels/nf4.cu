// NF4: dequantization of the double-quantized scales and of the packed weights, and the fused NF4
// GEMM in both orientations (Y = X W^T and dX = dY W) from the same packed bytes.
// Twin of src/nf4.rs and of linear_fwd / linear_bwd_input in src/backend/cpu/linear.rs.
//
// The GEMMs are shared-memory tiled with f32 accumulation (no tensor cores yet): the correct first
// version that the faster ones will be checked against.
#include "common.cuh"

__constant__ float NF4_TABLE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};

// absmax[b] = dyn_map[qabsmax[b]] * absmax2[b / 256] + offset
// absmax: [nblocks] f32 (written); qabsmax: [nblocks] u8; absmax2: [ceil(nblocks / 256)] f32; dyn_map: [256] f32.
extern "C" __global__ void nf4_dequantize_absmax(float* absmax, const uint8_t* qabsmax, const float* absmax2,
                                                 const float* dyn_map, float offset, long nblocks) {
    const long b = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= nblocks) return;
    absmax[b] = dyn_map[qabsmax[b]] * absmax2[b / 256] + offset;
}

// out[i] = NF4_TABLE[code(i)] * absmax[i / 64], code(2j) = packed[j] >> 4, code(2j + 1) = packed[j] & 15
// out: [n] bf16 (written); packed: [ceil(n / 2)] u8; absmax: [ceil(n / 64)] f32. One thread per byte.
extern "C" __global__ void nf4_dequantize(bf16* out, const uint8_t* packed, const float* absmax, long n) {
    const long j = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (2 * j >= n) return;
    const uint8_t byte = packed[j];
    out[2 * j] = to_bf16(NF4_TABLE[byte >> 4] * absmax[(2 * j) / 64]);
    if (2 * j + 1 < n) out[2 * j + 1] = to_bf16(NF4_TABLE[byte & 15] * absmax[(2 * j + 1) / 64]);
}

// Element e of the flattened [N, K] weight, dequantized.
__device__ __forceinline__ float nf4_at(const uint8_t* packed, const float* absmax, long e) {
    const uint8_t b = packed[e >> 1];
    return NF4_TABLE[(e & 1) ? (b & 15) : (b >> 4)] * absmax[e >> 6];
}

#define GEMM_TT 16  // rows of X (tokens) per block
#define GEMM_TN 64  // columns of the output per block (one per thread in x)
#define GEMM_TK 32  // reduction chunk held in shared memory

// y[t, n] = sum_k x[t, k] W[n, k] (+ bias[n])
// y: [T, N] bf16 (written); x: [T, K] bf16; W: NF4 [N, K]; bias: [N] bf16 or null.
// Grid (ceil(N / 64), ceil(T / 16)), block (64, 4): each thread owns column n and rows ty + 4j.
extern "C" __global__ void nf4_gemm_fwd(bf16* y, const bf16* x, const uint8_t* packed, const float* absmax,
                                        const bf16* bias, int T, int N, int K) {
    __shared__ float xs[GEMM_TT][GEMM_TK + 1];
    __shared__ float ws[GEMM_TN][GEMM_TK + 1];
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * GEMM_TN + tx;
    const int n = blockIdx.x * GEMM_TN + tx, t0 = blockIdx.y * GEMM_TT;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k0 = 0; k0 < K; k0 += GEMM_TK) {
        for (int i = tid; i < GEMM_TT * GEMM_TK; i += 256) {
            const int r = i / GEMM_TK, c = i % GEMM_TK, t = t0 + r, k = k0 + c;
            xs[r][c] = (t < T && k < K) ? to_f32(x[(long)t * K + k]) : 0.0f;
        }
        for (int i = tid; i < GEMM_TN * GEMM_TK; i += 256) {
            const int r = i / GEMM_TK, c = i % GEMM_TK, nn = blockIdx.x * GEMM_TN + r, k = k0 + c;
            ws[r][c] = (nn < N && k < K) ? nf4_at(packed, absmax, (long)nn * K + k) : 0.0f;
        }
        __syncthreads();
        for (int c = 0; c < GEMM_TK; c++) {
            const float w = ws[tx][c];
            for (int j = 0; j < 4; j++) acc[j] += xs[ty + 4 * j][c] * w;
        }
        __syncthreads();
    }
    if (n >= N) return;
    const float b = bias ? to_f32(bias[n]) : 0.0f;
    for (int j = 0; j < 4; j++) {
        const int t = t0 + ty + 4 * j;
        if (t < T) y[(long)t * N + n] = to_bf16(acc[j] + b);
    }
}

// dx[t, k] = sum_n dy[t, n] W[n, k]   (the frozen weight gets no gradient)
// dx: [T, K] bf16 (written); dy: [T, N] bf16; W: NF4 [N, K].
// Grid (ceil(K / 64), ceil(T / 16)), block (64, 4): each thread owns column k and rows ty + 4j.
extern "C" __global__ void nf4_gemm_bwd_input(bf16* dx, const bf16* dy, const uint8_t* packed, const float* absmax,
                                              int T, int N, int K) {
    __shared__ float ds[GEMM_TT][GEMM_TK + 1];
    __shared__ float ws[GEMM_TK][GEMM_TN + 1];
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * GEMM_TN + tx;
    const int k = blockIdx.x * GEMM_TN + tx, t0 = blockIdx.y * GEMM_TT;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int n0 = 0; n0 < N; n0 += GEMM_TK) {
        for (int i = tid; i < GEMM_TT * GEMM_TK; i += 256) {
            const int r = i / GEMM_TK, c = i % GEMM_TK, t = t0 + r, nn = n0 + c;
            ds[r][c] = (t < T && nn < N) ? to_f32(dy[(long)t * N + nn]) : 0.0f;
        }
        for (int i = tid; i < GEMM_TK * GEMM_TN; i += 256) {
            const int r = i / GEMM_TN, c = i % GEMM_TN, nn = n0 + r, kk = blockIdx.x * GEMM_TN + c;
            ws[r][c] = (nn < N && kk < K) ? nf4_at(packed, absmax, (long)nn * K + kk) : 0.0f;
        }
        __syncthreads();
        for (int c = 0; c < GEMM_TK; c++) {
            const float w = ws[c][tx];
            for (int j = 0; j < 4; j++) acc[j] += ds[ty + 4 * j][c] * w;
        }
        __syncthreads();
    }
    if (k >= K) return;
    for (int j = 0; j < 4; j++) {
        const int t = t0 + ty + 4 * j;
        if (t < T) dx[(long)t * K + k] = to_bf16(acc[j]);
    }
}

// ---- Tensor-core versions (mma.sync m16n8k16, bf16 in, f32 accumulate; sm_80 and newer) ----
//
// C[M, C] = A[M, R] B[R, C] with A bf16 row-major and B an NF4 weight seen either as W^T (forward:
// R = K, C = N) or as W (input gradient: R = N, C = K). A block of 4 warps computes a 64 x 64 tile
// of C; each warp a 32 x 32 quarter as 2 x 4 mma tiles. Per 32-wide slice of R, the block stages
// A [64][32] and the dequantized B, stored as Bs[c][r] (so both orientations read the same
// fragments), in shared memory.
//
// Fragment layout of m16n8k16 (g = lane / 4, q = lane % 4; two bf16 per 32-bit register, the lower
// index in the low half):
//   A: a0 = (g, 2q..2q+1), a1 = (g+8, 2q..), a2 = (g, 2q+8..), a3 = (g+8, 2q+8..)
//   B: b0 = (r 2q..2q+1, c g), b1 = (r 2q+8.., c g)
//   C: c0, c1 = (g, 2q), (g, 2q+1); c2, c3 = (g+8, 2q), (g+8, 2q+1)
#define MMA_BM 64
#define MMA_BC 64
#define MMA_BR 32
#define MMA_PAD 8  // keeps rows 16-byte aligned and spreads them over banks

__device__ __forceinline__ uint32_t ld_pair(const bf16* p) { return *reinterpret_cast<const uint32_t*>(p); }

__device__ __forceinline__ void mma_bf16(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// TRANSPOSED = false: B[r, c] = W[c, r] (forward, W: [C, R]); true: B[r, c] = W[r, c] (W: [R, C]).
template <bool TRANSPOSED>
__device__ void nf4_gemm_mma(bf16* out, const bf16* a, const uint8_t* packed, const float* absmax, const bf16* bias,
                             int M, int C, int R) {
    __shared__ __align__(16) bf16 As[MMA_BM][MMA_BR + MMA_PAD];
    __shared__ __align__(16) bf16 Bs[MMA_BC][MMA_BR + MMA_PAD];
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int g = lane / 4, q = lane % 4, wm = (warp / 2) * 32, wc = (warp % 2) * 32;
    const int m0 = blockIdx.y * MMA_BM, c0 = blockIdx.x * MMA_BC;
    float acc[2][4][4] = {};
    for (int r0 = 0; r0 < R; r0 += MMA_BR) {
        for (int i = tid; i < MMA_BM * MMA_BR; i += blockDim.x) {
            const int m = i / MMA_BR, r = i % MMA_BR;
            As[m][r] = (m0 + m < M && r0 + r < R) ? a[(long)(m0 + m) * R + r0 + r] : to_bf16(0.0f);
        }
        for (int i = tid; i < MMA_BC * MMA_BR; i += blockDim.x) {
            // Consecutive threads read consecutive weight bytes in either orientation.
            const int c = TRANSPOSED ? i % MMA_BC : i / MMA_BR, r = TRANSPOSED ? i / MMA_BC : i % MMA_BR;
            const int cc = c0 + c, rr = r0 + r;
            float w = 0.0f;
            if (cc < C && rr < R) w = nf4_at(packed, absmax, TRANSPOSED ? (long)rr * C + cc : (long)cc * R + rr);
            Bs[c][r] = to_bf16(w);
        }
        __syncthreads();
        for (int k = 0; k < MMA_BR; k += 16) {
            uint32_t af[2][4], bfr[4][2];
            for (int mi = 0; mi < 2; mi++) {
                const int row = wm + mi * 16 + g;
                af[mi][0] = ld_pair(&As[row][k + 2 * q]);
                af[mi][1] = ld_pair(&As[row + 8][k + 2 * q]);
                af[mi][2] = ld_pair(&As[row][k + 2 * q + 8]);
                af[mi][3] = ld_pair(&As[row + 8][k + 2 * q + 8]);
            }
            for (int ci = 0; ci < 4; ci++) {
                const int col = wc + ci * 8 + g;
                bfr[ci][0] = ld_pair(&Bs[col][k + 2 * q]);
                bfr[ci][1] = ld_pair(&Bs[col][k + 2 * q + 8]);
            }
            for (int mi = 0; mi < 2; mi++)
                for (int ci = 0; ci < 4; ci++) mma_bf16(acc[mi][ci], af[mi], bfr[ci]);
        }
        __syncthreads();
    }
    for (int mi = 0; mi < 2; mi++)
        for (int ci = 0; ci < 4; ci++)
            for (int h = 0; h < 4; h++) {
                const int m = m0 + wm + mi * 16 + g + (h >= 2 ? 8 : 0), c = c0 + wc + ci * 8 + 2 * q + (h & 1);
                if (m < M && c < C) out[(long)m * C + c] = to_bf16(acc[mi][ci][h] + (bias ? to_f32(bias[c]) : 0.0f));
            }
}

// As nf4_gemm_fwd, on tensor cores. Grid (ceil(N / 64), ceil(T / 64)), block 128.
extern "C" __global__ void nf4_gemm_fwd_mma(bf16* y, const bf16* x, const uint8_t* packed, const float* absmax,
                                            const bf16* bias, int T, int N, int K) {
    nf4_gemm_mma<false>(y, x, packed, absmax, bias, T, N, K);
}

// As nf4_gemm_bwd_input, on tensor cores. Grid (ceil(K / 64), ceil(T / 64)), block 128.
extern "C" __global__ void nf4_gemm_bwd_input_mma(bf16* dx, const bf16* dy, const uint8_t* packed,
                                                  const float* absmax, int T, int N, int K) {
    nf4_gemm_mma<true>(dx, dy, packed, absmax, nullptr, T, K, N);
}
