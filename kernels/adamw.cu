// AdamW on one page of f32 parameters. Twin of src/optim.rs (AdamW::update). One thread per value.
#include "common.cuh"

// m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
// p = p (1 - lr wd) - lr (m / bc1) / (sqrt(v) / bc2_sqrt + eps),  bc1 = 1 - b1^t, bc2_sqrt = sqrt(1 - b2^t)
// p, m, v: [n] f32 (updated); g: [n] f32.
extern "C" __global__ void adamw_step(float* p, float* m, float* v, const float* g, long n, float lr, float b1, float b2,
                                      float eps, float wd, float bc1, float bc2_sqrt) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float gi = g[i];
    const float mi = b1 * m[i] + (1.0f - b1) * gi;
    const float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * (1.0f - lr * wd) - lr * (mi / bc1) / (sqrtf(vi) / bc2_sqrt + eps);
}
