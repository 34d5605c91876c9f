// Causal grouped-query attention over packed sequences, tiled on tensor cores (flash-style): forward
// and backward. Same contract and CPU twin as attention.cu (src/model/cpu/attention.rs): the forward
// writes out and each row's log-sum-exp; the backward takes D = rowsum(dO * O) from
// attention_bwd_rowdot and writes dq, then dk and dv, each output owned by one block: no atomics, so
// results are deterministic. The simple kernels in attention.cu stay as the check and the fallback
// (head widths other than 32, 64, 128; SQLORA_ATTENTION=simple).
//
// Packing: token t attends to keys s with seq_start[t] <= s <= t. A block takes 64 consecutive
// tokens, which may span sequences; every element is masked by that rule, so the tiles need no
// alignment to sequence boundaries.
//
// Tensor-core fragments are those of mma.cuh (m16n8k16, g = lane / 4, c = lane % 4): a thread holds
// C elements (g, 2c), (g, 2c+1), (g+8, 2c), (g+8, 2c+1) of each 16 x 8 tile. Two neighbouring C tiles
// (16 x 16) are exactly one A fragment, so scores turn into the left operand of the next product
// without leaving registers. A "natural" B fragment reads a row-major [n][k] tile (K for Q K^T); a
// "transposed" one reads a row-major [k][n] tile (V for P V) two rows at a time.
//
// Softmax runs in base 2: scores are scaled by log2(e) / sqrt(hd) and exponentiated with exp2f; the
// stored log-sum-exp is converted back to natural log, as the simple kernels and the CPU keep it.
#include <limits.h>

#include "mma.cuh"

#define FA_ROWS 64  // queries (forward, dq) or keys (dk, dv) per block: 4 warps x 16 rows
#define FA_KEYS 64  // keys per tile (forward, dq)
#define FA_PAD 8    // shared rows stay 16-byte aligned and land on different banks
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

// Two floats as one bf16 pair, the first in the low half (an A fragment register).
__device__ __forceinline__ uint32_t fa_pack(float lo, float hi) {
    __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&p);
}

// p[0] and p[stride] as one bf16 pair: a column pair of a row-major tile.
__device__ __forceinline__ uint32_t fa_col_pair(const bf16* p, int stride) {
    return (uint32_t)__bfloat16_as_ushort(p[0]) | ((uint32_t)__bfloat16_as_ushort(p[stride]) << 16);
}

// tile[r][0..HD) = src[first + r, head, 0..HD) for first + r <= last, zero below (rows < rows).
// src: [tokens, nheads, HD] bf16, 16-byte aligned (HD is a multiple of 16).
template <int HD>
__device__ __forceinline__ void fa_stage(bf16 (*tile)[HD + FA_PAD], int rows, const bf16* src, int first, int last,
                                         int nheads, int head) {
    for (int i = threadIdx.x; i < rows * (HD / 8); i += blockDim.x) {
        const int r = i / (HD / 8), c = (i % (HD / 8)) * 8;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (first + r <= last) v = *reinterpret_cast<const uint4*>(src + ((long)(first + r) * nheads + head) * HD + c);
        *reinterpret_cast<uint4*>(&tile[r][c]) = v;
    }
}

// A fragments of a warp's 16 rows (tokens row0 and row0 + 8 for this thread) of a [tokens, nheads, HD]
// tensor, straight from global memory; rows at or past T read as zero.
template <int HD>
__device__ __forceinline__ void fa_load_a(uint32_t (*f)[4], const bf16* src, int row0, int T, int nheads, int head) {
    const int c = threadIdx.x % 4;
    const bf16* r0 = src + ((long)row0 * nheads + head) * HD;
    const bf16* r1 = src + ((long)(row0 + 8) * nheads + head) * HD;
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        const int col = kk * 16 + 2 * c;
        f[kk][0] = row0 < T ? ld_pair(r0 + col) : 0u;
        f[kk][1] = row0 + 8 < T ? ld_pair(r1 + col) : 0u;
        f[kk][2] = row0 < T ? ld_pair(r0 + col + 8) : 0u;
        f[kk][3] = row0 + 8 < T ? ld_pair(r1 + col + 8) : 0u;
    }
}

// acc[j] += A(16 x HD) . Bs[j * 8 + n][0..HD)^T for the N / 8 column tiles j: A from registers, B
// natural from a row-major [N][HD] shared tile.
template <int HD, int N>
__device__ __forceinline__ void fa_mma_nt(float (*acc)[4], const uint32_t (*a)[4], const bf16 (*Bs)[HD + FA_PAD]) {
    const int g = threadIdx.x % 32 / 4, c = threadIdx.x % 4;
#pragma unroll
    for (int j = 0; j < N / 8; j++)
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            const uint32_t b[2] = {ld_pair(&Bs[j * 8 + g][kk * 16 + 2 * c]), ld_pair(&Bs[j * 8 + g][kk * 16 + 2 * c + 8])};
            mma_bf16(acc[j], a[kk], b);
        }
}

// acc[n] += P(16 x K) . Bs[0..K)[n * 8 ..]: P is K / 8 C tiles in registers (rounded to bf16), B
// transposed from a row-major [K][HD] shared tile; acc: HD / 8 C tiles.
template <int HD, int K>
__device__ __forceinline__ void fa_mma_pv(float (*acc)[4], const float (*p)[4], const bf16 (*Bs)[HD + FA_PAD]) {
    const int g = threadIdx.x % 32 / 4, c = threadIdx.x % 4;
    constexpr int S = HD + FA_PAD;
#pragma unroll
    for (int kb = 0; kb < K / 16; kb++) {
        const uint32_t a[4] = {fa_pack(p[2 * kb][0], p[2 * kb][1]), fa_pack(p[2 * kb][2], p[2 * kb][3]),
                               fa_pack(p[2 * kb + 1][0], p[2 * kb + 1][1]), fa_pack(p[2 * kb + 1][2], p[2 * kb + 1][3])};
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            const uint32_t b[2] = {fa_col_pair(&Bs[kb * 16 + 2 * c][n * 8 + g], S),
                                   fa_col_pair(&Bs[kb * 16 + 2 * c + 8][n * 8 + g], S)};
            mma_bf16(acc[n], a, b);
        }
    }
}

// out[t, h] = sum_s P_ts v[s, kvh] with P_t = softmax over s in seq_start[t]..=t of q[t, h] . k[s, kvh] / sqrt(hd);
// lse[t, h] = log sum_s exp(q[t, h] . k[s, kvh] / sqrt(hd)).
// out, q: [T, heads, HD] bf16; lse: [T, heads] f32; k, v: [T, kv_heads, HD] bf16; seq_start: [T] i32.
// Grid (ceil(T / 64), heads), block 128: each warp keeps 16 queries' running max, sum and output in
// registers while the block walks 64-key tiles of K and V through shared memory.
template <int HD>
__device__ void flash_fwd(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, const int* seq_start,
                          int T, int heads, int kv_heads) {
    __shared__ __align__(16) bf16 Ks[FA_KEYS][HD + FA_PAD];
    __shared__ __align__(16) bf16 Vs[FA_KEYS][HD + FA_PAD];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, c = lane % 4;
    const int h = blockIdx.y, kvh = h / (heads / kv_heads);
    const int q0 = blockIdx.x * FA_ROWS, q_last = min(q0 + FA_ROWS, T) - 1, row0 = q0 + warp * 16 + g;
    const int row[2] = {row0, row0 + 8};
    int start[2];  // a row past T starts at INT_MAX: every key is masked
#pragma unroll
    for (int i = 0; i < 2; i++) start[i] = row[i] < T ? seq_start[row[i]] : INT_MAX;
    uint32_t qf[HD / 16][4];
    fa_load_a<HD>(qf, q, row0, T, heads, h);
    float o[HD / 8][4] = {}, m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    const float scale2 = rsqrtf((float)HD) * LOG2E;
    for (int k0 = seq_start[q0]; k0 <= q_last; k0 += FA_KEYS) {
        const int k_last = min(k0 + FA_KEYS - 1, q_last);
        fa_stage<HD>(Ks, FA_KEYS, k, k0, k_last, kv_heads, kvh);
        fa_stage<HD>(Vs, FA_KEYS, v, k0, k_last, kv_heads, kvh);
        __syncthreads();
        float s[FA_KEYS / 8][4] = {};  // [16 queries x 64 keys] of this warp, as 8 C tiles
        fa_mma_nt<HD, FA_KEYS>(s, qf, Ks);
        float mx[2] = {m[0], m[1]};
#pragma unroll
        for (int j = 0; j < FA_KEYS / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int i = e / 2, key = k0 + j * 8 + 2 * c + (e & 1);
                s[j][e] = (key >= start[i] && key <= row[i]) ? s[j][e] * scale2 : -INFINITY;
                mx[i] = fmaxf(mx[i], s[j][e]);
            }
        float base[2];
#pragma unroll
        for (int i = 0; i < 2; i++) {  // the four threads of a quad hold one row
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffff, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffff, mx[i], 2));
            base[i] = mx[i] == -INFINITY ? 0.0f : mx[i];  // no valid key yet: keep everything at 0
            const float alpha = exp2f(m[i] - base[i]);
            l[i] *= alpha;
#pragma unroll
            for (int n = 0; n < HD / 8; n++) {
                o[n][2 * i] *= alpha;
                o[n][2 * i + 1] *= alpha;
            }
            m[i] = mx[i];
        }
#pragma unroll
        for (int j = 0; j < FA_KEYS / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                s[j][e] = exp2f(s[j][e] - base[e / 2]);
                l[e / 2] += s[j][e];
            }
        fa_mma_pv<HD, FA_KEYS>(o, s, Vs);
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        l[i] += __shfl_xor_sync(0xffffffff, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffff, l[i], 2);
        if (row[i] >= T) continue;
        const long at = (long)row[i] * heads + h;
        const float inv = 1.0f / l[i];
#pragma unroll
        for (int n = 0; n < HD / 8; n++)
            *reinterpret_cast<uint32_t*>(out + at * HD + n * 8 + 2 * c) = fa_pack(o[n][2 * i] * inv, o[n][2 * i + 1] * inv);
        if (c == 0) lse[at] = (m[i] + log2f(l[i])) * LN2;
    }
}

// The backward (as attention.cu), with P_ts = exp(q_t . k_s / sqrt(hd) - lse_t), dP_ts = dO_t . v_s and
// D_t = dO_t . O_t:
//   dS_ts = P_ts (dP_ts - D_t) / sqrt(hd)
//   dq_t = sum_s dS_ts k_s,   dk_s = sum_(t, h in group) dS_ts q_t,   dv_s = sum_(t, h in group) P_ts dO_t

// dq for 64 queries of one head: the forward's tiling, recomputing P from lse and dP = dO V^T per
// key tile, then dq += dS K. dq: [T, heads, HD] bf16 (written); dout: like q; lse, dd: [T, heads] f32.
// Grid (ceil(T / 64), heads), block 128.
template <int HD>
__device__ void flash_bwd_dq(bf16* dq, const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const float* lse,
                             const float* dd, const int* seq_start, int T, int heads, int kv_heads) {
    __shared__ __align__(16) bf16 Ks[FA_KEYS][HD + FA_PAD];
    __shared__ __align__(16) bf16 Vs[FA_KEYS][HD + FA_PAD];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, c = lane % 4;
    const int h = blockIdx.y, kvh = h / (heads / kv_heads);
    const int q0 = blockIdx.x * FA_ROWS, q_last = min(q0 + FA_ROWS, T) - 1, row0 = q0 + warp * 16 + g;
    const int row[2] = {row0, row0 + 8};
    int start[2];
    float lse2[2], d[2];  // lse in base 2; D
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const bool in = row[i] < T;
        start[i] = in ? seq_start[row[i]] : INT_MAX;
        lse2[i] = in ? lse[(long)row[i] * heads + h] * LOG2E : 0.0f;
        d[i] = in ? dd[(long)row[i] * heads + h] : 0.0f;
    }
    uint32_t qf[HD / 16][4], df[HD / 16][4];
    fa_load_a<HD>(qf, q, row0, T, heads, h);
    fa_load_a<HD>(df, dout, row0, T, heads, h);
    float acc[HD / 8][4] = {};
    const float scale = rsqrtf((float)HD), scale2 = scale * LOG2E;
    for (int k0 = seq_start[q0]; k0 <= q_last; k0 += FA_KEYS) {
        const int k_last = min(k0 + FA_KEYS - 1, q_last);
        fa_stage<HD>(Ks, FA_KEYS, k, k0, k_last, kv_heads, kvh);
        fa_stage<HD>(Vs, FA_KEYS, v, k0, k_last, kv_heads, kvh);
        __syncthreads();
        float s[FA_KEYS / 8][4] = {}, dp[FA_KEYS / 8][4] = {};
        fa_mma_nt<HD, FA_KEYS>(s, qf, Ks);
        fa_mma_nt<HD, FA_KEYS>(dp, df, Vs);
#pragma unroll
        for (int j = 0; j < FA_KEYS / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int i = e / 2, key = k0 + j * 8 + 2 * c + (e & 1);
                const float p = (key >= start[i] && key <= row[i]) ? exp2f(s[j][e] * scale2 - lse2[i]) : 0.0f;
                s[j][e] = p * (dp[j][e] - d[i]) * scale;  // dS
            }
        fa_mma_pv<HD, FA_KEYS>(acc, s, Ks);
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (row[i] >= T) continue;
        const long at = ((long)row[i] * heads + h) * HD;
#pragma unroll
        for (int n = 0; n < HD / 8; n++)
            *reinterpret_cast<uint32_t*>(dq + at + n * 8 + 2 * c) = fa_pack(acc[n][2 * i], acc[n][2 * i + 1]);
    }
}

// dk, dv for 64 keys of one kv head: K and V stay in shared memory while the block walks, for each
// query head of the group, the QT-query tiles from the first key on while they can see a key of the
// block (their sequence started at or before its last key). Per tile, transposed:
//   S^T = K Q^T, dP^T = V dO^T (16 keys x QT queries per warp), P^T from lse, dS^T,
//   dv += P^T dO, dk += dS^T Q.
// dk, dv: [T, kv_heads, HD] bf16 (written); the rest as in flash_bwd_dq. Grid (ceil(T / 64),
// kv_heads), block 128; dynamic shared memory: dkv_smem(hd) bytes (src/engine/cuda/attention.rs).
template <int HD, int QT>
__device__ void flash_bwd_dkv(bf16* dk, bf16* dv, const bf16* dout, const bf16* q, const bf16* k, const bf16* v,
                              const float* lse, const float* dd, const int* seq_start, int T, int heads, int kv_heads) {
    typedef bf16 Row[HD + FA_PAD];
    extern __shared__ __align__(16) unsigned char fa_smem[];
    Row* Ks = reinterpret_cast<Row*>(fa_smem);
    Row* Vs = Ks + FA_ROWS;
    Row* Qs = Vs + FA_ROWS;
    Row* Os = Qs + QT;  // dO
    float* lse_s = reinterpret_cast<float*>(Os + QT);  // [QT], base 2
    float* d_s = lse_s + QT;                           // [QT]
    int* start_s = reinterpret_cast<int*>(d_s + QT);   // [QT]
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, c = lane % 4;
    const int kvh = blockIdx.y, group = heads / kv_heads;
    const int k0 = blockIdx.x * FA_ROWS, k_last = min(k0 + FA_ROWS, T) - 1, wk = warp * 16;
    const int key[2] = {k0 + wk + g, k0 + wk + g + 8};
    fa_stage<HD>(Ks, FA_ROWS, k, k0, k_last, kv_heads, kvh);
    fa_stage<HD>(Vs, FA_ROWS, v, k0, k_last, kv_heads, kvh);
    float dka[HD / 8][4] = {}, dva[HD / 8][4] = {};
    const float scale = rsqrtf((float)HD), scale2 = scale * LOG2E;
    for (int h = kvh * group; h < (kvh + 1) * group; h++)
        for (int q0 = k0; q0 < T && seq_start[q0] <= k_last; q0 += QT) {
            const int q_last = min(q0 + QT, T) - 1;
            __syncthreads();  // the previous tile is read (and K, V are staged, on the first pass)
            fa_stage<HD>(Qs, QT, q, q0, q_last, heads, h);
            fa_stage<HD>(Os, QT, dout, q0, q_last, heads, h);
            for (int i = threadIdx.x; i < QT; i += blockDim.x) {
                const bool in = q0 + i <= q_last;
                lse_s[i] = in ? lse[(long)(q0 + i) * heads + h] * LOG2E : 0.0f;
                d_s[i] = in ? dd[(long)(q0 + i) * heads + h] : 0.0f;
                start_s[i] = in ? seq_start[q0 + i] : INT_MAX;
            }
            __syncthreads();
            float st[QT / 8][4] = {}, dpt[QT / 8][4] = {};  // [16 keys x QT queries] of this warp
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) {
                const int col = kk * 16 + 2 * c;
                const uint32_t ak[4] = {ld_pair(&Ks[wk + g][col]), ld_pair(&Ks[wk + g + 8][col]),
                                        ld_pair(&Ks[wk + g][col + 8]), ld_pair(&Ks[wk + g + 8][col + 8])};
                const uint32_t av[4] = {ld_pair(&Vs[wk + g][col]), ld_pair(&Vs[wk + g + 8][col]),
                                        ld_pair(&Vs[wk + g][col + 8]), ld_pair(&Vs[wk + g + 8][col + 8])};
#pragma unroll
                for (int j = 0; j < QT / 8; j++) {
                    const uint32_t bq[2] = {ld_pair(&Qs[j * 8 + g][col]), ld_pair(&Qs[j * 8 + g][col + 8])};
                    const uint32_t bo[2] = {ld_pair(&Os[j * 8 + g][col]), ld_pair(&Os[j * 8 + g][col + 8])};
                    mma_bf16(st[j], ak, bq);
                    mma_bf16(dpt[j], av, bo);
                }
            }
#pragma unroll
            for (int j = 0; j < QT / 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int qi = j * 8 + 2 * c + (e & 1), kt = key[e / 2];
                    // Past q_last, start_s is INT_MAX; a key past T is past every query.
                    const bool ok = start_s[qi] <= kt && kt <= q0 + qi;
                    const float p = ok ? exp2f(st[j][e] * scale2 - lse_s[qi]) : 0.0f;
                    st[j][e] = p;
                    dpt[j][e] = p * (dpt[j][e] - d_s[qi]) * scale;  // dS^T
                }
            fa_mma_pv<HD, QT>(dva, st, Os);
            fa_mma_pv<HD, QT>(dka, dpt, Qs);
        }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (key[i] >= T) continue;
        const long at = ((long)key[i] * kv_heads + kvh) * HD;
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            *reinterpret_cast<uint32_t*>(dk + at + n * 8 + 2 * c) = fa_pack(dka[n][2 * i], dka[n][2 * i + 1]);
            *reinterpret_cast<uint32_t*>(dv + at + n * 8 + 2 * c) = fa_pack(dva[n][2 * i], dva[n][2 * i + 1]);
        }
    }
}

// Entry points per head width. The dk/dv kernels' query tile QT: 64, or 32 at width 128 (registers).
#define FLASH_ENTRIES(HD, QT)                                                                                         \
    extern "C" __global__ void __launch_bounds__(128) flash_fwd_hd##HD(                                               \
        bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v, const int* seq_start, int T, int heads,   \
        int kv_heads) {                                                                                               \
        flash_fwd<HD>(out, lse, q, k, v, seq_start, T, heads, kv_heads);                                              \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(128) flash_bwd_dq_hd##HD(                                            \
        bf16* dq, const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const float* lse, const float* dd,   \
        const int* seq_start, int T, int heads, int kv_heads) {                                                       \
        flash_bwd_dq<HD>(dq, dout, q, k, v, lse, dd, seq_start, T, heads, kv_heads);                                  \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(128) flash_bwd_dkv_hd##HD(                                           \
        bf16* dk, bf16* dv, const bf16* dout, const bf16* q, const bf16* k, const bf16* v, const float* lse,          \
        const float* dd, const int* seq_start, int T, int heads, int kv_heads) {                                      \
        flash_bwd_dkv<HD, QT>(dk, dv, dout, q, k, v, lse, dd, seq_start, T, heads, kv_heads);                         \
    }

FLASH_ENTRIES(32, 64)
FLASH_ENTRIES(64, 64)
FLASH_ENTRIES(128, 32)
