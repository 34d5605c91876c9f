//! The SwiGLU activation of the MLP.

use rayon::prelude::*;

/// SiLU, `x * sigmoid(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// SwiGLU: `out = silu(gate) * up`.
/// out, gate, up: [T, f].
pub fn swiglu_fwd(out: &mut [f32], gate: &[f32], up: &[f32]) {
    assert!(out.len() == gate.len() && gate.len() == up.len());
    out.par_iter_mut()
        .zip(gate.par_iter().zip(up))
        .for_each(|(o, (&g, &u))| *o = silu(g) * u);
}

/// SwiGLU backward. With `out = silu(g) u` and `silu'(g) = s (1 + g (1 - s))`, `s = sigmoid(g)`:
///   dg = dout u silu'(g),   du = dout silu(g)
/// dgate, dup: [T, f] (overwritten), dout, gate, up: [T, f].
pub fn swiglu_bwd(dgate: &mut [f32], dup: &mut [f32], dout: &[f32], gate: &[f32], up: &[f32]) {
    assert!(dgate.len() == dout.len() && dup.len() == dout.len() && gate.len() == dout.len() && up.len() == dout.len());
    dgate
        .par_iter_mut()
        .zip(dup.par_iter_mut())
        .enumerate()
        .for_each(|(i, (dg, du))| {
            let (g, u, d) = (gate[i], up[i], dout[i]);
            let s = 1.0 / (1.0 + (-g).exp());
            *dg = d * u * s * (1.0 + g * (1.0 - s));
            *du = d * g * s;
        });
}
