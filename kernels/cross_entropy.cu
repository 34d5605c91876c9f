// Cross-entropy through the output head, on the labelled rows only, in row chunks: for each chunk of
// rows, the logits [rows, V] come from one tensor-core GEMM, a block per row turns them into the
// loss and dlogits = inv_count (softmax - onehot), and a second GEMM gives dh = dlogits head. The
// full [T, V] logits never exist. Twin of src/model/cpu/cross_entropy.rs.
#include "common.cuh"
#include "mma.cuh"

// B[r, c] = head[c, r]: the head [V, d] read along its rows (the forward's orientation).
struct HeadRows {
    const bf16* head;
    int d;
    __device__ float operator()(int r, int c) const { return to_f32(head[(long)c * d + r]); }
    // A whole tile with 16-byte aligned rows (d a multiple of 8, the head 16-byte aligned): 16-byte
    // copies into Bs[c][r..r+8].
    __device__ bool stage(TileRow* Bs, int r0, int n0, int R, int N) const {
        if (n0 + MMA_BN > N || r0 + MMA_BR > R || d % 8 != 0 || reinterpret_cast<uintptr_t>(head) % 16 != 0)
            return false;
        for (int i = threadIdx.x; i < MMA_BN * MMA_BR / 8; i += blockDim.x) {
            const int c = i / (MMA_BR / 8), r = (i % (MMA_BR / 8)) * 8;
            *reinterpret_cast<uint4*>(&Bs[c][r]) = *reinterpret_cast<const uint4*>(head + (long)(n0 + c) * d + r0 + r);
        }
        return true;
    }
};

// B[r, c] = head[r, c] (the input gradient's orientation).
struct HeadCols {
    const bf16* head;
    int d;
    __device__ float operator()(int r, int c) const { return to_f32(head[(long)r * d + c]); }
    // A whole tile with 16-byte aligned rows (as above): 16-byte loads of a row r, stored down
    // Bs[c..c+8][r].
    __device__ bool stage(TileRow* Bs, int r0, int n0, int R, int N) const {
        if (n0 + MMA_BN > N || r0 + MMA_BR > R || d % 8 != 0 || reinterpret_cast<uintptr_t>(head) % 16 != 0)
            return false;
        for (int i = threadIdx.x; i < MMA_BR * MMA_BN / 8; i += blockDim.x) {
            const int r = i / (MMA_BN / 8), c = (i % (MMA_BN / 8)) * 8;
            const uint4 w = *reinterpret_cast<const uint4*>(head + (long)(r0 + r) * d + n0 + c);
            const bf16* v = reinterpret_cast<const bf16*>(&w);
            for (int j = 0; j < 8; j++) Bs[c + j][r] = v[j];
        }
        return true;
    }
};

struct StoreF32 {
    float* out;
    int N;
    __device__ void operator()(int m, int n, float v) const { out[(long)m * N + n] = v; }
};

struct StoreBf16 {
    bf16* out;
    int N;
    __device__ void operator()(int m, int n, float v) const { out[(long)m * N + n] = to_bf16(v); }
};

// logits[i, v] = sum_k h[row0 + i, k] head[v, k], i < rows.
// logits: [rows, V] f32 (written); h: [>= row0 + rows, d] bf16; head: [V, d] bf16.
// Grid (ceil(V / 64), ceil(rows / 64)), block 128.
extern "C" __global__ void head_logits(float* logits, const bf16* h, const bf16* head, int row0, int rows, int V,
                                       int d) {
    mma_gemm<false>(h + (long)row0 * d, HeadRows{head, d}, StoreF32{logits, V}, rows, V, d);
}

// dh[row0 + i, k] = sum_v dlogits[i, v] head[v, k], i < rows.
// dh: [>= row0 + rows, d] bf16 (written); dlogits: [rows, V] bf16; head: [V, d] bf16.
// Grid (ceil(d / 64), ceil(rows / 64)), block 128.
extern "C" __global__ void head_grad(bf16* dh, const bf16* dlogits, const bf16* head, int row0, int rows, int V,
                                     int d) {
    mma_gemm<true>(dlogits, HeadCols{head, d}, StoreBf16{dh + (long)row0 * d, d}, rows, d, V);
}

// With z = logits[i], lse = log sum_v exp(z_v), target = targets[row0 + i]:
//   loss[row0 + i] = lse - z[target];   dlogits[i, v] = inv_count (exp(z_v - lse) - [v == target])
// dlogits: [rows, V] bf16 (written); loss, targets: [>= row0 + rows]; logits: [rows, V] f32.
// One block of 256 threads per row.
extern "C" __global__ void ce_softmax_grad(bf16* dlogits, float* loss, const float* logits, const int* targets,
                                           int row0, int V, float inv_count) {
    __shared__ float scratch[32];
    const long i = blockIdx.x;
    const float* z = logits + i * V;
    const int target = targets[row0 + i];
    float m = -INFINITY;
    for (int v = threadIdx.x; v < V; v += blockDim.x) m = fmaxf(m, z[v]);
    m = block_max(m, scratch);
    float s = 0.0f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) s += __expf(z[v] - m);
    const float lse = m + logf(block_sum(s, scratch));
    for (int v = threadIdx.x; v < V; v += blockDim.x)
        dlogits[i * V + v] = to_bf16(inv_count * (__expf(z[v] - lse) - (v == target ? 1.0f : 0.0f)));
    if (threadIdx.x == 0) loss[row0 + i] = (target >= 0 && target < V) ? lse - z[target] : NAN;
}

// Greedy decoding's choice, as generate::argmax: out[i] = the first index of the largest value of
// logits[i] (NaN values are never chosen; a row that starts with NaN gives 0, as the CPU's scan does).
// out: [rows] int (written); logits: [rows, V] f32. One block of 256 threads per row.
extern "C" __global__ void argmax_rows(int* out, const float* logits, int rows, int V) {
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const float* x = logits + (long)row * V;
    float bv = -INFINITY;
    int bi = V;  // past the end: loses every comparison with a real index
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float v = x[i];
        if (v > bv || (v == bv && i < bi)) bv = v, bi = i;  // NaN compares false: never taken
    }
    // The winner of (bv, bi) pairs: larger value, then smaller index.
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffff, bv, o);
        const int oi = __shfl_xor_sync(0xffffffff, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) bv = ov, bi = oi;
    }
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) best_v[warp] = bv, best_i[warp] = bi;
    __syncthreads();
    if (threadIdx.x != 0) return;
    for (int w = 1; w < blockDim.x / 32; w++) {
        if (best_v[w] > bv || (best_v[w] == bv && best_i[w] < bi)) bv = best_v[w], bi = best_i[w];
    }
    out[row] = (isnan(x[0]) || bi >= V) ? 0 : bi;
}
