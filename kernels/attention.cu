// Causal grouped-query attention over packed sequences, forward and backward.
// Twin of src/backend/cpu/attention.rs. One block per (token, query head); the row of
// probabilities lives in dynamic shared memory (one float per key of the longest sequence).
// Correctness first: the flash-style kernel will be checked against this one.
#include "common.cuh"

// The probabilities of query (t, h) over keys start..=t, into p[0 .. t - start + 1].
// Returns the number of keys.
__device__ int attention_probs(float* p, const bf16* q, const bf16* k, int t, int start, int h, int heads, int kv_heads,
                               int hd, float* scratch) {
    const int kvh = h / (heads / kv_heads), n = t - start + 1;
    const float scale = rsqrtf((float)hd);
    const bf16* qv = q + ((long)t * heads + h) * hd;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const bf16* kv = k + ((long)(start + j) * kv_heads + kvh) * hd;
        float s = 0.0f;
        for (int i = 0; i < hd; i++) s += to_f32(qv[i]) * to_f32(kv[i]);
        p[j] = s * scale;
        m = fmaxf(m, p[j]);
    }
    // block max
    m = warp_max(m);
    __syncthreads();
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = m;
    __syncthreads();
    float mx = scratch[0];
    for (int w = 1; w < blockDim.x / 32; w++) mx = fmaxf(mx, scratch[w]);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        p[j] = __expf(p[j] - mx);
        sum += p[j];
    }
    sum = block_sum(sum, scratch);
    for (int j = threadIdx.x; j < n; j += blockDim.x) p[j] /= sum;
    __syncthreads();
    return n;
}

// out[t, h] = sum_s P[s] v[s, kvh],  P = softmax(q[t, h] . k[s, kvh] / sqrt(hd)) over s in start(t)..=t
// out, q: [T, heads, hd] bf16; k, v: [T, kv_heads, hd] bf16; seq_start: [T] i32 (first token of t's sequence).
// Grid T * heads blocks; dynamic shared memory: (longest sequence) floats.
extern "C" __global__ void attention_fwd(bf16* out, const bf16* q, const bf16* k, const bf16* v, const int* seq_start,
                                         int heads, int kv_heads, int hd) {
    extern __shared__ float p[];
    __shared__ float scratch[32];
    const int t = blockIdx.x / heads, h = blockIdx.x % heads, start = seq_start[t];
    const int n = attention_probs(p, q, k, t, start, h, heads, kv_heads, hd, scratch);
    const int kvh = h / (heads / kv_heads);
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float o = 0.0f;
        for (int j = 0; j < n; j++) o += p[j] * to_f32(v[((long)(start + j) * kv_heads + kvh) * hd + i]);
        out[((long)t * heads + h) * hd + i] = to_bf16(o);
    }
}

// With dP_s = dO . v_s and D = sum_s P_s dP_s:  dS_s = P_s (dP_s - D) / sqrt(hd)
//   dq = sum_s dS_s k_s,   dk_s += dS_s q,   dv_s += P_s dO
// dq: [T, heads, hd] bf16 (written); dk, dv: [T, kv_heads, hd] f32 (accumulated with atomics: zero them
// first); dout, q: [T, heads, hd] bf16; k, v: [T, kv_heads, hd] bf16; seq_start: [T] i32.
// Grid T * heads blocks; dynamic shared memory: 2 * (longest sequence) floats.
extern "C" __global__ void attention_bwd(bf16* dq, float* dk, float* dv, const bf16* dout, const bf16* q, const bf16* k,
                                         const bf16* v, const int* seq_start, int heads, int kv_heads, int hd,
                                         int max_len) {
    extern __shared__ float sm[];
    float* p = sm;
    float* ds = sm + max_len;
    __shared__ float scratch[32];
    const int t = blockIdx.x / heads, h = blockIdx.x % heads, start = seq_start[t];
    const int n = attention_probs(p, q, k, t, start, h, heads, kv_heads, hd, scratch);
    const int kvh = h / (heads / kv_heads);
    const float scale = rsqrtf((float)hd);
    const bf16* dov = dout + ((long)t * heads + h) * hd;
    const bf16* qv = q + ((long)t * heads + h) * hd;
    float dsum = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const bf16* vv = v + ((long)(start + j) * kv_heads + kvh) * hd;
        float dp = 0.0f;
        for (int i = 0; i < hd; i++) dp += to_f32(dov[i]) * to_f32(vv[i]);
        ds[j] = dp;
        dsum += p[j] * dp;
    }
    const float big_d = block_sum(dsum, scratch);
    for (int j = threadIdx.x; j < n; j += blockDim.x) ds[j] = p[j] * (ds[j] - big_d) * scale;
    __syncthreads();
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float g = 0.0f;
        for (int j = 0; j < n; j++) {
            const long kv_at = ((long)(start + j) * kv_heads + kvh) * hd + i;
            g += ds[j] * to_f32(k[kv_at]);
            atomicAdd(&dk[kv_at], ds[j] * to_f32(qv[i]));
            atomicAdd(&dv[kv_at], p[j] * to_f32(dov[i]));
        }
        dq[((long)t * heads + h) * hd + i] = to_bf16(g);
    }
}
