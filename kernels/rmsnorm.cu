// RMSNorm, forward and backward. Twin of src/model/cpu/rmsnorm.rs.
// One block per row; the row's inverse RMS is kept for the backward.
#include "common.cuh"

// y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps)
// y, x: [T, d] bf16; w: [d] bf16; rstd: [T] f32 (written).
extern "C" __global__ void rmsnorm_fwd(bf16* y, float* rstd, const bf16* x, const bf16* w, int d, float eps) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    const bf16* xr = x + row * d;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = to_f32(xr[i]);
        ss += v * v;
    }
    const float r = rsqrtf(block_sum(ss, scratch) / d + eps);
    if (threadIdx.x == 0) rstd[row] = r;
    for (int i = threadIdx.x; i < d; i += blockDim.x) y[row * d + i] = to_bf16(to_f32(xr[i]) * r * to_f32(w[i]));
}

// dx_j = r w_j dy_j - (r^3 / d) x_j sum_i (dy_i w_i x_i)   (the gain is frozen: no dw)
// dx: [T, d] bf16 (written); dy, x: [T, d] bf16; w: [d] bf16; rstd: [T] f32 from the forward.
extern "C" __global__ void rmsnorm_bwd(bf16* dx, const bf16* dy, const bf16* x, const bf16* w, const float* rstd, int d) {
    __shared__ float scratch[32];
    const long row = blockIdx.x;
    const bf16 *dyr = dy + row * d, *xr = x + row * d;
    float dot = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) dot += to_f32(dyr[i]) * to_f32(w[i]) * to_f32(xr[i]);
    dot = block_sum(dot, scratch);
    const float r = rstd[row], c = r * r * r / d * dot;
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        dx[row * d + i] = to_bf16(r * to_f32(w[i]) * to_f32(dyr[i]) - c * to_f32(xr[i]));
}
