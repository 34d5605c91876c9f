// Elementwise glue of the training step: residual adds, f32 -> bf16 casts, adapter dropout, and
// gathering / scattering the labelled rows.
// Twin of src/model/cpu/elementwise.rs. One thread per value.
#include "common.cuh"

// x += y (a residual connection, or summing the input gradients of q, k and v).
// x, y: [n] bf16.
extern "C" __global__ void add_bf16(bf16* x, const bf16* y, long n) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    x[i] = to_bf16(to_f32(x[i]) + to_f32(y[i]));
}

// out = bf16(x), round to nearest even. out: [n] bf16 (written); x: [n] f32.
extern "C" __global__ void cast_f32_bf16(bf16* out, const float* x, long n) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = to_bf16(x[i]);
}

// The SplitMix64 output function (src/util/rng.rs): element i of the stream seeded with `seed` is
// mix(seed + (i + 1) * golden), so any element can be drawn without the ones before it.
__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Inverted dropout with the CPU reference's mask: element i is kept when u_i >= p, where u_i is the
// i-th uniform draw (53 bits, as f64, then rounded to f32) of SplitMix64 seeded with `seed`.
// out = kept ? x * keep : 0, keep = 1 / (1 - p). The backward is the same call on the gradient.
// out: [n] bf16 (written; may alias x); x: [n] bf16.
extern "C" __global__ void dropout_bf16(bf16* out, const bf16* x, unsigned long long seed, float p, float keep,
                                        long n) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const uint64_t z = splitmix64(seed + (uint64_t)(i + 1) * 0x9E3779B97F4A7C15ull);
    const double u = (double)(z >> 11) * (1.0 / 9007199254740992.0);
    out[i] = ((float)u >= p) ? to_bf16(to_f32(x[i]) * keep) : to_bf16(0.0f);
}

// out[i, :] = x[idx[i], :] for i < n (gather the labelled rows). out: [n, d]; x: [T, d]; idx: [n].
extern "C" __global__ void gather_rows(bf16* out, const bf16* x, const int* idx, int n, int d) {
    const long e = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (long)n * d) return;
    const long i = e / d, c = e % d;
    out[e] = x[(long)idx[i] * d + c];
}

// out[idx[i], :] = x[i, :] for i < n; other rows of out are left as they are. out: [T, d]; x: [n, d].
extern "C" __global__ void scatter_rows(bf16* out, const bf16* x, const int* idx, int n, int d) {
    const long e = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (long)n * d) return;
    const long i = e / d, c = e % d;
    out[(long)idx[i] * d + c] = x[e];
}

// y[t, n] += bias[n] for t < T. y: [T, N] bf16; bias: [N] bf16. (The bias of a cuBLAS projection.)
extern "C" __global__ void add_bias_rows(bf16* y, const bf16* bias, int T, int N) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)T * N) return;
    y[i] = to_bf16(to_f32(y[i]) + to_f32(bias[i % N]));
}
