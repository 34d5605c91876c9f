// Causal grouped-query attention over packed sequences, forward and backward.
// Twin of src/model/cpu/attention.rs. The forward keeps each row's log-sum-exp, so the backward
// recomputes probabilities instead of storing them, and splits into a pass per query (dq) and a pass
// per key (dk, dv): every output is written by one block, with no atomics, so it is deterministic.
// Correctness first: one block per (token, head) or (key, kv head); the flash-style tensor-core
// kernels will be checked against these.
#include "common.cuh"

#define MIX_MAX_HD 256

// a . b over hd <= 256 dimensions by one warp: lane l takes dims l, l + 32, ... (reads coalesced along
// the row); every lane gets the sum.
__device__ __forceinline__ float warp_dot(const bf16* a, const bf16* b, int hd) {
    float s = 0.0f;
#pragma unroll
    for (int c = 0; c < MIX_MAX_HD / 32; c++) {
        const int i = threadIdx.x % 32 + 32 * c;
        if (i < hd) s += to_f32(a[i]) * to_f32(b[i]);
    }
    return warp_sum(s);
}

// p[j] = softmax_j(qv . k[start + j, kvh] / sqrt(hd)) for j < n (a warp per key); returns the row's
// log-sum-exp of the scaled scores (to every thread). p: shared, >= n floats; qv: [hd] one query head.
__device__ float attention_probs(float* p, const bf16* qv, const bf16* k, int start, int n, int kvh, int kv_heads,
                                 int hd, float* scratch) {
    const float scale = rsqrtf((float)hd);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    for (int j = warp; j < n; j += warps) {
        const float s = warp_dot(qv, k + ((long)(start + j) * kv_heads + kvh) * hd, hd);
        if (lane == 0) p[j] = s * scale;
    }
    __syncthreads();
    float m = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, p[j]);
    const float mx = block_max(m, scratch);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        p[j] = __expf(p[j] - mx);
        sum += p[j];
    }
    sum = block_sum(sum, scratch);
    for (int j = threadIdx.x; j < n; j += blockDim.x) p[j] /= sum;
    __syncthreads();
    return mx + logf(sum);
}


// out[i] = sum_j w[j] m[start + j, kvh, i] over n rows: the block's warps split the rows, each lane
// keeps a few dimensions (hd <= 256) in registers, and the warps' partial sums meet in shared memory
// in a fixed order. w: [n] (shared, visible to all threads); m: [rows, kv_heads, hd].
__device__ void attention_mix(bf16* out, const float* w, const bf16* m, int start, int n, int kvh, int kv_heads,
                              int hd) {
    __shared__ float part[4][MIX_MAX_HD];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    float acc[MIX_MAX_HD / 32] = {};
    for (int j = warp; j < n; j += warps) {
        const bf16* row = m + ((long)(start + j) * kv_heads + kvh) * hd;
        const float wj = w[j];
#pragma unroll
        for (int c = 0; c < MIX_MAX_HD / 32; c++)
            if (lane + 32 * c < hd) acc[c] += wj * to_f32(row[lane + 32 * c]);
    }
#pragma unroll
    for (int c = 0; c < MIX_MAX_HD / 32; c++)
        if (lane + 32 * c < hd) part[warp][lane + 32 * c] = acc[c];
    __syncthreads();
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float s = 0.0f;
        for (int k = 0; k < warps; k++) s += part[k][i];
        out[i] = to_bf16(s);
    }
}

// out[t, h] = sum_s P[s] v[s, kvh],  P = softmax(q[t, h] . k[s, kvh] / sqrt(hd)) over s in start(t)..=t
// out, q: [T, heads, hd] bf16; lse: [T, heads] f32 (written); k, v: [T, kv_heads, hd] bf16;
// seq_start: [T] i32 (first token of t's sequence). Grid T * heads blocks; dynamic shared memory:
// (longest sequence) floats.
extern "C" __global__ void attention_fwd(bf16* out, float* lse, const bf16* q, const bf16* k, const bf16* v,
                                         const int* seq_start, int heads, int kv_heads, int hd) {
    extern __shared__ float p[];
    __shared__ float scratch[32];
    const int t = blockIdx.x / heads, h = blockIdx.x % heads, start = seq_start[t], n = t - start + 1;
    const int kvh = h / (heads / kv_heads);
    const float row_lse = attention_probs(p, q + (long)blockIdx.x * hd, k, start, n, kvh, kv_heads, hd, scratch);
    if (threadIdx.x == 0) lse[blockIdx.x] = row_lse;
    attention_mix(out + (long)blockIdx.x * hd, p, v, start, n, kvh, kv_heads, hd);
}

// Generation: query b (one new token of sequence b) against its cached keys
// key_start[b] .. key_start[b] + key_len[b] (its own key included).
// out, q: [B, heads, hd] bf16; k, v: [rows, kv_heads, hd] bf16 (the cache); key_start, key_len: [B].
// Grid B * heads blocks; dynamic shared memory: (longest key_len) floats.
extern "C" __global__ void attention_decode(bf16* out, const bf16* q, const bf16* k, const bf16* v,
                                            const int* key_start, const int* key_len, int heads, int kv_heads,
                                            int hd) {
    extern __shared__ float p[];
    __shared__ float scratch[32];
    const int b = blockIdx.x / heads, h = blockIdx.x % heads, start = key_start[b], n = key_len[b];
    const int kvh = h / (heads / kv_heads);
    attention_probs(p, q + (long)blockIdx.x * hd, k, start, n, kvh, kv_heads, hd, scratch);
    attention_mix(out + (long)blockIdx.x * hd, p, v, start, n, kvh, kv_heads, hd);
}

// The backward, with P_ts = exp(q_t . k_s / sqrt(hd) - lse_t), dP_ts = dO_t . v_s and
// D_t = sum_s P_ts dP_ts = dO_t . O_t:
//   dS_ts = P_ts (dP_ts - D_t) / sqrt(hd)
//   dq_t = sum_s dS_ts k_s,   dk_s = sum_(t, h in group) dS_ts q_t,   dv_s = sum_(t, h in group) P_ts dO_t

// dd[r] = dO[r] . O[r] for each of the T * heads rows; one warp per row.
// dd: [T * heads] f32 (written); dout, out: [T, heads, hd] bf16.
extern "C" __global__ void attention_bwd_rowdot(float* dd, const bf16* dout, const bf16* out, int rows, int hd) {
    const long w = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (w >= rows) return;
    float s = 0.0f;
    for (int i = lane; i < hd; i += 32) s += to_f32(dout[w * hd + i]) * to_f32(out[w * hd + i]);
    s = warp_sum(s);
    if (lane == 0) dd[w] = s;
}

// dq for query (t, h); one block per (t, h). dq: [T, heads, hd] bf16 (written); lse, dd: [T, heads];
// the rest as in the forward. Dynamic shared memory: (longest sequence) floats.
extern "C" __global__ void attention_bwd_dq(bf16* dq, const bf16* dout, const bf16* q, const bf16* k, const bf16* v,
                                            const float* lse, const float* dd, const int* seq_start, int heads,
                                            int kv_heads, int hd) {
    extern __shared__ float ds[];
    const int t = blockIdx.x / heads, h = blockIdx.x % heads, start = seq_start[t], n = t - start + 1;
    const int kvh = h / (heads / kv_heads);
    const float scale = rsqrtf((float)hd), row_lse = lse[blockIdx.x], row_d = dd[blockIdx.x];
    const bf16 *qv = q + (long)blockIdx.x * hd, *dov = dout + (long)blockIdx.x * hd;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    for (int j = warp; j < n; j += warps) {  // a warp per key
        const long kv_at = ((long)(start + j) * kv_heads + kvh) * hd;
        const float s = warp_dot(qv, k + kv_at, hd), dp = warp_dot(dov, v + kv_at, hd);
        if (lane == 0) ds[j] = __expf(s * scale - row_lse) * (dp - row_d) * scale;
    }
    __syncthreads();
    attention_mix(dq + (long)blockIdx.x * hd, ds, k, start, n, kvh, kv_heads, hd);  // dq = sum_j dS_j k_j
}

// dk, dv for key (s, kvh); one block of 4 warps per (s, kvh). Each warp takes queries t >= s of the
// same sequence, with every query head h of the group, and keeps its share of dk_s, dv_s in registers
// (lane l holds dims l, l + 32, ...: hd <= 256); the warps' partial sums meet in shared memory.
// dk, dv: [T, kv_heads, hd] bf16 (written); T: tokens in the batch; the rest as above.
#define BWD_KV_WARPS 4
#define MAX_HD_PER_LANE 8
extern "C" __global__ void attention_bwd_dkv(bf16* dk, bf16* dv, const bf16* dout, const bf16* q, const bf16* k,
                                             const bf16* v, const float* lse, const float* dd, const int* seq_start,
                                             int T, int heads, int kv_heads, int hd) {
    __shared__ float part[BWD_KV_WARPS][2][MAX_HD_PER_LANE * 32];
    const int s = blockIdx.x / kv_heads, kvh = blockIdx.x % kv_heads, start = seq_start[s];
    const int group = heads / kv_heads, lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const float scale = rsqrtf((float)hd);
    const bf16 *kv = k + (long)blockIdx.x * hd, *vv = v + (long)blockIdx.x * hd;
    float dk_acc[MAX_HD_PER_LANE] = {}, dv_acc[MAX_HD_PER_LANE] = {};
    // Pairs (t, g) with t = s, s+1, ... while t is in s's sequence (sequences are contiguous).
    for (long pair = warp;; pair += BWD_KV_WARPS) {
        const int t = s + (int)(pair / group), h = kvh * group + (int)(pair % group);
        if (t >= T || seq_start[t] != start) break;
        const long row = (long)t * heads + h;
        const bf16 *qv = q + row * hd, *dov = dout + row * hd;
        float sc = 0.0f, dp = 0.0f;
        for (int i = lane; i < hd; i += 32) {
            sc += to_f32(qv[i]) * to_f32(kv[i]);
            dp += to_f32(dov[i]) * to_f32(vv[i]);
        }
        sc = warp_sum(sc);
        dp = warp_sum(dp);
        const float p = __expf(sc * scale - lse[row]);
        const float dsv = p * (dp - dd[row]) * scale;
#pragma unroll
        for (int c = 0; c < MAX_HD_PER_LANE; c++) {
            const int i = lane + 32 * c;
            if (i < hd) {
                dk_acc[c] += dsv * to_f32(qv[i]);
                dv_acc[c] += p * to_f32(dov[i]);
            }
        }
    }
#pragma unroll
    for (int c = 0; c < MAX_HD_PER_LANE; c++) {
        const int i = lane + 32 * c;
        if (i < hd) {
            part[warp][0][i] = dk_acc[c];
            part[warp][1][i] = dv_acc[c];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float a = 0.0f, b = 0.0f;
        for (int w = 0; w < BWD_KV_WARPS; w++) {
            a += part[w][0][i];
            b += part[w][1][i];
        }
        dk[(long)blockIdx.x * hd + i] = to_bf16(a);
        dv[(long)blockIdx.x * hd + i] = to_bf16(b);
    }
}
