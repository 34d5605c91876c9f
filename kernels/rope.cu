// Rotary position embedding ("rotate half" layout), forward and backward, in place.
// Twin of src/model/cpu/rope.rs. One thread per (token, head, pair).
#include "common.cuh"

// Pair (i, i + hd/2) of each head is rotated by sign * pos[t] * inv_freq[i].
// The backward is the rotation by the opposite angle (sign = -1).
// x: [T, heads, hd] bf16 (in place); pos: [T] i32; inv_freq: [hd/2] f32 (after rope scaling).
extern "C" __global__ void rope_rotate(bf16* x, const int* pos, const float* inv_freq, int T, int heads, int hd, float sign) {
    const int half = hd / 2;
    const long k = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= (long)T * heads * half) return;
    const int i = k % half;
    const long th = k / half;  // token * heads + head
    const int t = th / heads;
    // f32 angle as the reference computes it; sincosf at full precision.
    const float angle = (float)pos[t] * inv_freq[i];
    float s, c;
    sincosf(angle, &s, &c);
    s *= sign;
    bf16* h = x + th * hd;
    const float a = to_f32(h[i]), b = to_f32(h[i + half]);
    h[i] = to_bf16(a * c - b * s);
    h[i + half] = to_bf16(b * c + a * s);
}
