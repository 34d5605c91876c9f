// A block-tiled GEMM on tensor cores (mma.sync m16n8k16, bf16 in, f32 accumulate; sm_80 and newer),
// generic over where B comes from and where C goes, so the NF4 GEMMs and the dense head GEMMs of the
// loss share one tile loop:  C[M, N] = A[M, R] B[R, N],  A bf16 row-major.
//
// A block of 4 warps computes a 64 x 64 tile of C; each warp a 32 x 32 quarter as 2 x 4 mma tiles.
// Per 32-wide slice of R, the block stages A [64][32] and B, converted to bf16 and stored as
// Bs[n][r], in shared memory; both orientations of B then read the same fragments.
//
// Fragment layout of m16n8k16 (g = lane / 4, q = lane % 4; two bf16 per 32-bit register, the lower
// index in the low half):
//   A: a0 = (g, 2q..2q+1), a1 = (g+8, 2q..), a2 = (g, 2q+8..), a3 = (g+8, 2q+8..)
//   B: b0 = (r 2q..2q+1, n g), b1 = (r 2q+8.., n g)
//   C: c0, c1 = (g, 2q), (g, 2q+1); c2, c3 = (g+8, 2q), (g+8, 2q+1)
#pragma once
#include "common.cuh"

#define MMA_BM 64
#define MMA_BN 64
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

typedef bf16 TileRow[MMA_BR + MMA_PAD];

// Eight bf16 as one 16-byte word, the lower index in the low half of each 32-bit part.
__device__ __forceinline__ uint4 pack8(const bf16* v) {
    uint32_t w[4];
    for (int j = 0; j < 4; j++)
        w[j] = (uint32_t)__bfloat16_as_ushort(v[2 * j]) | ((uint32_t)__bfloat16_as_ushort(v[2 * j + 1]) << 16);
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// Stage A's [64][32] tile at (m0, r0): 16-byte loads when the tile is whole and its rows are 16-byte
// aligned, element by element (zero outside [M, R]) otherwise.
__device__ __forceinline__ void stage_a(TileRow* As, const bf16* a, int m0, int r0, int M, int R) {
    if (m0 + MMA_BM <= M && r0 + MMA_BR <= R && R % 8 == 0 && reinterpret_cast<uintptr_t>(a) % 16 == 0) {
        for (int i = threadIdx.x; i < MMA_BM * MMA_BR / 8; i += blockDim.x) {
            const int m = i / (MMA_BR / 8), c = (i % (MMA_BR / 8)) * 8;
            *reinterpret_cast<uint4*>(&As[m][c]) = *reinterpret_cast<const uint4*>(a + (long)(m0 + m) * R + r0 + c);
        }
        return;
    }
    for (int i = threadIdx.x; i < MMA_BM * MMA_BR; i += blockDim.x) {
        const int m = i / MMA_BR, r = i % MMA_BR;
        As[m][r] = (m0 + m < M && r0 + r < R) ? a[(long)(m0 + m) * R + r0 + r] : to_bf16(0.0f);
    }
}

// load_b(r, c) -> B[r, c] as float, called only inside [R, N]; load_b.stage(Bs, r0, n0, R, N) may
// stage a whole tile faster (returning false to decline). store(m, n, v) for every C element inside
// [M, N]. N_FAST: B is contiguous along n (consecutive threads then walk n when staging it element
// by element); otherwise along r. Grid (ceil(N / 64), ceil(M / 64)), block 128.
template <bool N_FAST, class LoadB, class Store>
__device__ void mma_gemm(const bf16* a, LoadB load_b, Store store, int M, int N, int R) {
    __shared__ __align__(16) bf16 As[MMA_BM][MMA_BR + MMA_PAD];
    __shared__ __align__(16) bf16 Bs[MMA_BN][MMA_BR + MMA_PAD];
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int g = lane / 4, q = lane % 4, wm = (warp / 2) * 32, wn = (warp % 2) * 32;
    const int m0 = blockIdx.y * MMA_BM, n0 = blockIdx.x * MMA_BN;
    float acc[2][4][4] = {};
    for (int r0 = 0; r0 < R; r0 += MMA_BR) {
        stage_a(As, a, m0, r0, M, R);
        if (!load_b.stage(Bs, r0, n0, R, N)) {
            for (int i = tid; i < MMA_BN * MMA_BR; i += blockDim.x) {
                const int n = N_FAST ? i % MMA_BN : i / MMA_BR, r = N_FAST ? i / MMA_BN : i % MMA_BR;
                Bs[n][r] = to_bf16((n0 + n < N && r0 + r < R) ? load_b(r0 + r, n0 + n) : 0.0f);
            }
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
            for (int ni = 0; ni < 4; ni++) {
                const int col = wn + ni * 8 + g;
                bfr[ni][0] = ld_pair(&Bs[col][k + 2 * q]);
                bfr[ni][1] = ld_pair(&Bs[col][k + 2 * q + 8]);
            }
            for (int mi = 0; mi < 2; mi++)
                for (int ni = 0; ni < 4; ni++) mma_bf16(acc[mi][ni], af[mi], bfr[ni]);
        }
        __syncthreads();
    }
    for (int mi = 0; mi < 2; mi++)
        for (int ni = 0; ni < 4; ni++)
            for (int h = 0; h < 4; h++) {
                const int m = m0 + wm + mi * 16 + g + (h >= 2 ? 8 : 0), n = n0 + wn + ni * 8 + 2 * q + (h & 1);
                if (m < M && n < N) store(m, n, acc[mi][ni][h]);
            }
}
