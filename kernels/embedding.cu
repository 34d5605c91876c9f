// Token embedding lookup. Twin of embedding_fwd in src/model/cpu/mod.rs. (The embedding is frozen:
// no backward is needed.)
#include "common.cuh"

// out[t, :] = table[tokens[t], :]; a token outside the table writes NaN, so the check downstream fails
// loudly instead of reading out of bounds.
// out: [T, d] bf16 (written); table: [vocab, d] bf16; tokens: [T] i32. One thread per output value.
extern "C" __global__ void embedding_fwd(bf16* out, const bf16* table, const int* tokens, int T, int d, int vocab) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)T * d) return;
    const int t = i / d, c = i % d, tok = tokens[t];
    out[i] = (tok >= 0 && tok < vocab) ? table[(long)tok * d + c] : to_bf16(__int_as_float(0x7fc00000));
}
