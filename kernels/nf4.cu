// NF4: dequantization of the double-quantized scales and of the packed weights, and the fused NF4
// GEMM in both orientations (Y = X W^T and dX = dY W) from the same packed bytes.
// Twin of src/model/nf4.rs and of linear_fwd / linear_bwd_input in src/model/cpu/linear.rs.
//
// Each GEMM comes twice: shared-memory tiles with f32 FMA (the first, plainest version), and on
// tensor cores through mma.cuh; SQLORA_NF4_GEMM picks one.
#include "common.cuh"
#include "mma.cuh"

__constant__ float NF4_TABLE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};

// Decision thresholds between neighbouring codes (src/model/nf4.rs NF4_MIDPOINTS, the same f32 values): a
// normalised value strictly above NF4_MID[i] takes code i + 1 or above; NaN takes code 0.
__constant__ float NF4_MID[15] = {
    -8.480963707e-1f, -6.106328964e-1f, -4.599952698e-1f, -3.396794200e-1f, -2.346074134e-1f,
    -1.379117370e-1f, -4.552501813e-2f, 3.979014978e-2f,  1.202552468e-1f,  2.035212517e-1f,
    2.920137644e-1f,  3.893125355e-1f,  5.016633868e-1f,  6.427869201e-1f,  8.614783883e-1f};

__device__ __forceinline__ uint8_t nf4_code(float v) {
    uint8_t c = 0;
    for (int i = 0; i < 15; i++) c += v > NF4_MID[i];
    return c;
}

// Quantization, byte for byte as Nf4Tensor::quantize (src/model/nf4.rs). The products x * (1 / absmax) use
// __fmul_rn so the compiler cannot fuse them into a following subtraction: every rounding is the CPU's.
//
// absmax[b] = max(0, max |x| over block b of 64);  code(i) = #{ m in NF4_MID : m < x[i] * (1 / absmax[b]) }
// packed[j] = code(2j) << 4 | code(2j + 1)   (0 in the low nibble past the end; an all-zero block: code 7)
// packed: [ceil(n / 2)] u8 (written); absmax: [ceil(n / 64)] f32 (written); x: [n] f32.
// One warp per block of 64 values: lane l takes values 2l and 2l + 1, i.e. byte l of the block.
extern "C" __global__ void nf4_quantize(uint8_t* packed, float* absmax, const float* x, long n) {
    const long blk = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (blk * 64 >= n) return;  // the same for the whole warp
    const long e = blk * 64 + 2 * lane;
    const float a = e < n ? x[e] : 0.0f, b = e + 1 < n ? x[e + 1] : 0.0f;
    // fmaxf drops NaN, as the CPU's fold from 0 does.
    const float m = warp_max(fmaxf(0.0f, fmaxf(fabsf(a), fabsf(b))));
    const float inv = m > 0.0f ? 1.0f / m : 0.0f;
    if (lane == 0) absmax[blk] = m;
    if (e >= n) return;
    const uint8_t hi = nf4_code(__fmul_rn(a, inv));
    const uint8_t lo = e + 1 < n ? nf4_code(__fmul_rn(b, inv)) : 0;
    packed[e / 2] = (uint8_t)((hi << 4) | lo);
}

// offset[0] = mean of absmax[0 .. nblocks): the sum in f64, divided, rounded once to f32 (0 when
// empty), as DoubleQuant::quantize. (For real weights the f64 sum of these f32 values is exact, so
// the order of summation does not change it.) One block of 1024 threads.
extern "C" __global__ void nf4_absmax_mean(float* offset, const float* absmax, long nblocks) {
    __shared__ double part[32];
    double s = 0.0;
    for (long i = threadIdx.x; i < nblocks; i += blockDim.x) s += (double)absmax[i];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = s;
    __syncthreads();
    if (threadIdx.x != 0) return;
    double total = 0.0;
    for (int w = 0; w < blockDim.x / 32; w++) total += part[w];
    offset[0] = nblocks > 0 ? (float)(total / (double)nblocks) : 0.0f;
}

// Double quantization of the block scales, as DoubleQuant::quantize: with c_b = absmax[b] - offset,
// absmax2[g] = max(0, max |c_b| over group g of 256);  v = c_b * (1 / absmax2[g]);
// qabsmax[b] = the index of the dyn_map entry nearest v (the lower one on a tie; NaN: 0).
// qabsmax: [nblocks] u8 (written); absmax2: [ceil(nblocks / 256)] f32 (written); absmax: [nblocks];
// offset: [1]; dyn_map: [256] ascending. One block of 256 threads per group.
extern "C" __global__ void nf4_double_quantize(uint8_t* qabsmax, float* absmax2, const float* absmax,
                                               const float* offset, const float* dyn_map, long nblocks) {
    __shared__ float scratch[32];
    const long b = (long)blockIdx.x * 256 + threadIdx.x;
    const float c = b < nblocks ? absmax[b] - offset[0] : 0.0f;
    const float m = block_max(fmaxf(0.0f, fabsf(c)), scratch);
    if (threadIdx.x == 0) absmax2[blockIdx.x] = m;
    if (b >= nblocks) return;
    const float v = __fmul_rn(c, m > 0.0f ? 1.0f / m : 0.0f);
    int lo = 0, hi = 256;  // lo: how many entries are below v
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (dyn_map[mid] < v) lo = mid + 1;
        else hi = mid;
    }
    const int up = min(lo, 255), down = max(up - 1, 0);
    qabsmax[b] = (uint8_t)(fabsf(v - dyn_map[down]) <= fabsf(dyn_map[up] - v) ? down : up);
}

// absmax[b] = dyn_map[qabsmax[b]] * absmax2[b / 256] + offset
// absmax: [nblocks] f32 (written); qabsmax: [nblocks] u8; absmax2: [ceil(nblocks / 256)] f32; dyn_map: [256] f32.
extern "C" __global__ void nf4_dequantize_absmax(float* absmax, const uint8_t* qabsmax, const float* absmax2,
                                                 const float* dyn_map, float offset, long nblocks) {
    const long b = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= nblocks) return;
    // Rounded twice, as the CPU does (no fused multiply-add): the same f32 scale bit for bit.
    absmax[b] = __fadd_rn(__fmul_rn(dyn_map[qabsmax[b]], absmax2[b / 256]), offset);
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

// ---- Tensor-core versions (mma.cuh), bf16 in, f32 accumulate; sm_80 and newer ----

// The 16 weights from element e (a multiple of 16) as bf16: one 8-byte load, one scale (16 aligned
// elements never straddle a 64-block).
__device__ __forceinline__ void nf4_decode16(bf16* out, const uint8_t* packed, const float* absmax, long e) {
    const uint2 bytes = *reinterpret_cast<const uint2*>(packed + e / 2);
    const float s = absmax[e >> 6];
    for (int j = 0; j < 8; j++) {
        const uint32_t b = ((j < 4 ? bytes.x : bytes.y) >> (8 * (j % 4))) & 0xff;
        out[2 * j] = to_bf16(NF4_TABLE[b >> 4] * s);
        out[2 * j + 1] = to_bf16(NF4_TABLE[b & 15] * s);
    }
}

// B[r, c] = W[c, r]: the forward's weight, W [C, R], read along r (its rows are contiguous).
struct Nf4Rows {
    const uint8_t* packed;
    const float* absmax;
    int R;
    __device__ float operator()(int r, int c) const { return nf4_at(packed, absmax, (long)c * R + r); }
    // A whole tile with R % 32 == 0: each thread decodes 16 weights of a row into Bs[n][r..r+16].
    __device__ bool stage(TileRow* Bs, int r0, int n0, int R_, int N) const {
        if (n0 + MMA_BN > N || r0 + MMA_BR > R_ || R_ % 32 != 0) return false;
        for (int i = threadIdx.x; i < MMA_BN * 2; i += blockDim.x) {
            const int n = i / 2, h = (i % 2) * 16;
            bf16 v[16];
            nf4_decode16(v, packed, absmax, (long)(n0 + n) * R_ + r0 + h);
            *reinterpret_cast<uint4*>(&Bs[n][h]) = pack8(v);
            *reinterpret_cast<uint4*>(&Bs[n][h + 8]) = pack8(v + 8);
        }
        return true;
    }
};

// B[r, c] = W[r, c]: the input gradient's weight, W [R, C], read along c.
struct Nf4Cols {
    const uint8_t* packed;
    const float* absmax;
    int C;
    __device__ float operator()(int r, int c) const { return nf4_at(packed, absmax, (long)r * C + c); }
    // A whole tile with C % 16 == 0: each thread decodes 16 weights of a row r, stored down Bs[c][r].
    __device__ bool stage(TileRow* Bs, int r0, int n0, int R, int C_) const {
        if (n0 + MMA_BN > C_ || r0 + MMA_BR > R || C_ % 16 != 0) return false;
        for (int i = threadIdx.x; i < MMA_BR * 4; i += blockDim.x) {
            const int r = i / 4, c = (i % 4) * 16;
            bf16 v[16];
            nf4_decode16(v, packed, absmax, (long)(r0 + r) * C_ + n0 + c);
            for (int j = 0; j < 16; j++) Bs[c + j][r] = v[j];
        }
        return true;
    }
};

// out[m, c] = bf16(v + bias[c]).
struct StoreBias {
    bf16* out;
    const bf16* bias;
    int C;
    __device__ void operator()(int m, int c, float v) const {
        out[(long)m * C + c] = to_bf16(v + (bias ? to_f32(bias[c]) : 0.0f));
    }
};

// As nf4_gemm_fwd, on tensor cores. Grid (ceil(N / 64), ceil(T / 64)), block 128.
extern "C" __global__ void nf4_gemm_fwd_mma(bf16* y, const bf16* x, const uint8_t* packed, const float* absmax,
                                            const bf16* bias, int T, int N, int K) {
    mma_gemm<false>(x, Nf4Rows{packed, absmax, K}, StoreBias{y, bias, N}, T, N, K);
}

// As nf4_gemm_bwd_input, on tensor cores. Grid (ceil(K / 64), ceil(T / 64)), block 128.
extern "C" __global__ void nf4_gemm_bwd_input_mma(bf16* dx, const bf16* dy, const uint8_t* packed,
                                                  const float* absmax, int T, int N, int K) {
    mma_gemm<true>(dy, Nf4Cols{packed, absmax, K}, StoreBias{dx, nullptr, K}, T, K, N);
}

// ---- Decode shapes: M <= 16 rows of x against the whole weight ----

#define GEMV_MAX_M 16

// y[m, n] = sum_k x[m, k] W[n, k] (+ bias[n]) for m < M <= 16. One warp per output column n reads
// W's row n once: with K % 32 == 0 (and x and packed 16-byte aligned, as whole allocations are),
// each lane takes 32 weights at a time as one 16-byte load (and one scale: 32 aligned weights lie
// in one 64-block); otherwise element by element.
// y: [M, N] bf16 (written); x: [M, K] bf16; W: NF4 [N, K]; bias: [N] bf16 or null.
// Grid ceil(N * 32 / 256) blocks of 256 threads.
extern "C" __global__ void nf4_gemv(bf16* y, const bf16* x, const uint8_t* packed, const float* absmax,
                                    const bf16* bias, int M, int N, int K) {
    const long n = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (n >= N) return;
    const long row = n * K;
    float acc[GEMV_MAX_M] = {};
    if (K % 32 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(packed) % 16 == 0) {
        for (int k0 = lane * 32; k0 < K; k0 += 32 * 32) {
            const uint4 bytes = *reinterpret_cast<const uint4*>(packed + (row + k0) / 2);
            const float s = absmax[(row + k0) >> 6];
            const uint32_t words[4] = {bytes.x, bytes.y, bytes.z, bytes.w};
            float w[32];
#pragma unroll
            for (int j = 0; j < 16; j++) {
                const uint32_t b = (words[j / 4] >> (8 * (j % 4))) & 0xff;
                w[2 * j] = NF4_TABLE[b >> 4] * s;
                w[2 * j + 1] = NF4_TABLE[b & 15] * s;
            }
#pragma unroll
            for (int m = 0; m < GEMV_MAX_M; m++) {
                if (m < M) {
                    const uint4* xv = reinterpret_cast<const uint4*>(x + (long)m * K + k0);
                    float sum = 0.0f;
#pragma unroll
                    for (int q = 0; q < 4; q++) {
                        const uint4 v = xv[q];
                        const bf16* xs = reinterpret_cast<const bf16*>(&v);
#pragma unroll
                        for (int j = 0; j < 8; j++) sum += w[8 * q + j] * to_f32(xs[j]);
                    }
                    acc[m] += sum;
                }
            }
        }
    } else {
        for (int k = lane; k < K; k += 32) {
            const float w = nf4_at(packed, absmax, row + k);
#pragma unroll
            for (int m = 0; m < GEMV_MAX_M; m++)
                if (m < M) acc[m] += w * to_f32(x[(long)m * K + k]);
        }
    }
    const float b = bias ? to_f32(bias[n]) : 0.0f;
#pragma unroll
    for (int m = 0; m < GEMV_MAX_M; m++) {
        if (m < M) {
            const float v = warp_sum(acc[m]);
            if (lane == 0) y[(long)m * N + n] = to_bf16(v + b);
        }
    }
}
