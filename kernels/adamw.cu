// AdamW on f32 parameters and the gradient norm it clips by. Twin of src/model/optim.rs (AdamW::update,
// clip_grad_norm) and of the host device in src/engine/host.rs.
#include "common.cuh"

// With g' = gscale g (gscale: the clipping factor, 1 when not clipping):
// m = b1 m + (1 - b1) g';  v = b2 v + (1 - b2) g'^2
// p = p (1 - lr wd) - lr (m / bc1) / (sqrt(v) / bc2_sqrt + eps),  bc1 = 1 - b1^t, bc2_sqrt = sqrt(1 - b2^t)
// p, m, v: [n] f32 (updated); g: [n] f32. One thread per value.
extern "C" __global__ void adamw_step(float* p, float* m, float* v, const float* g, long n, float gscale, float lr,
                                      float b1, float b2, float eps, float wd, float bc1, float bc2_sqrt) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    // Every product and sum rounded on its own (the _rn intrinsics are never fused into an FMA), in
    // AdamStep::apply's order: the update is the CPU's bit for bit.
    const float gi = __fmul_rn(g[i], gscale);
    const float mi = __fadd_rn(__fmul_rn(b1, m[i]), __fmul_rn(1.0f - b1, gi));
    const float vi = __fadd_rn(__fmul_rn(b2, v[i]), __fmul_rn(__fmul_rn(1.0f - b2, gi), gi));
    m[i] = mi;
    v[i] = vi;
    const float decay = 1.0f - __fmul_rn(lr, wd);
    const float step = __fmul_rn(lr, mi / bc1) / __fadd_rn(sqrtf(vi) / bc2_sqrt, eps);
    p[i] = __fsub_rn(__fmul_rn(p[i], decay), step);
}

// parts[b] = sqrt(sum of x[i]^2 over the i that block b visits) (i = b * blockDim + tid, stepping by
// gridDim * blockDim): the block's partial norm. The squares and sums are f64, so no square of a
// finite f32 overflows (f32 squares would be infinite from |x| ~ 1.8e19, where the CPU's f64 norm is
// still finite); a part is infinite only when the whole norm exceeds f32's range, as on the CPU. The
// caller takes sqrt(sum of parts^2) in f64, in order: one fixed summation order for a given n, so the
// norm is the same from run to run.
// parts: [gridDim] f32; x: [n] f32.
extern "C" __global__ void partial_norms(float* parts, const float* x, long n) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const double v = x[i];
        acc = fma(v, v, acc);  // v * v is exact in f64: the same as acc + v * v
    }
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) parts[blockIdx.x] = (float)sqrt(acc);
}
