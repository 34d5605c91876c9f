// SwiGLU, forward and backward. Twin of src/model/cpu/swiglu.rs. One thread per element.
#include "common.cuh"

// out = silu(g) * u, silu(g) = g / (1 + exp(-g))
// out, gate, up: [n] bf16.
extern "C" __global__ void swiglu_fwd(bf16* out, const bf16* gate, const bf16* up, long n) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = to_f32(gate[i]);
    out[i] = to_bf16(g / (1.0f + __expf(-g)) * to_f32(up[i]));
}

// s = sigmoid(g): dg = dout * u * s * (1 + g (1 - s)),  du = dout * g * s
// dgate, dup: [n] bf16 (written); dout, gate, up: [n] bf16.
extern "C" __global__ void swiglu_bwd(bf16* dgate, bf16* dup, const bf16* dout, const bf16* gate, const bf16* up, long n) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float g = to_f32(gate[i]), u = to_f32(up[i]), d = to_f32(dout[i]);
    const float s = 1.0f / (1.0f + __expf(-g));
    dgate[i] = to_bf16(d * u * s * (1.0f + g * (1.0f - s)));
    dup[i] = to_bf16(d * g * s);
}
