// NF4: dequantization of the double-quantized scales and of the packed weights. Twin of src/nf4.rs.
// (The fused NF4 GEMM joins this file with the rest of the CUDA engine.)
#include "common.cuh"

__constant__ float NF4_TABLE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
    0.7229568362236023f, 1.0f};

// absmax[b] = dyn_map[qabsmax[b]] * absmax2[b / 256] + offset
// absmax: [nblocks] f32 (written); qabsmax: [nblocks] u8; absmax2: [ceil(nblocks / 256)] f32; dyn_map: [256] f32.
extern "C" __global__ void nf4_dequantize_absmax(float* absmax, const uint8_t* qabsmax, const float* absmax2,
                                                 const float* dyn_map, float offset, long nblocks) {
    const long b = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= nblocks) return;
    absmax[b] = dyn_map[qabsmax[b]] * absmax2[b / 256] + offset;
}

// out[i] = NF4_TABLE[code(i)] * absmax[i / 64], code(2j) = packed[j] >> 4, code(2j + 1) = packed[j] & 15
// out: [n] bf16 (written); packed: [ceil(n / 2)] u8; absmax: [ceil(n / 64)] f32. One thread per byte.
extern "C" __global__ void nf4_dequantize(bf16* out, const uint8_t* packed, const float* absmax, long n) {
    const long j = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (2 * j >= n) return;
    const uint8_t byte = packed[j];
    out[2 * j] = to_bf16(NF4_TABLE[byte >> 4] * absmax[(2 * j) / 64]);
    if (2 * j + 1 < n) out[2 * j + 1] = to_bf16(NF4_TABLE[byte & 15] * absmax[(2 * j + 1) / 64]);
}
