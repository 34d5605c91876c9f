//! RMSNorm.

use rayon::prelude::*;

/// RMSNorm: `y = x / sqrt(mean(x^2) + eps) * w`, per row.
/// y: [T, d] (overwritten), x: [T, d], w: [d].
pub fn rmsnorm_fwd(y: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let d = w.len();
    assert_eq!(x.len(), y.len());
    y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(yr, xr)| {
        rmsnorm_fwd_row(yr, xr, w, eps);
    });
}

/// One row of [`rmsnorm_fwd`]; returns its `r = 1 / sqrt(mean(x^2) + eps)` (what the device
/// kernel saves for the backward). y, x, w: [d].
pub fn rmsnorm_fwd_row(y: &mut [f32], x: &[f32], w: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, &v), &g) in y.iter_mut().zip(x).zip(w) {
        *o = v * inv * g;
    }
    inv
}

/// RMSNorm backward (the gain is frozen, so only the input gets a gradient).
/// With `r = (mean(x^2) + eps)^(-1/2)` and `y_i = x_i r g_i`:
///   dx_j = r g_j dy_j - (r^3 / d) x_j sum_i (dy_i g_i x_i)
/// dx: [T, d] (overwritten), dy: [T, d], x: [T, d] (the forward input), w: [d].
pub fn rmsnorm_bwd(dx: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], eps: f32) {
    let d = w.len();
    assert!(dx.len() == dy.len() && dy.len() == x.len());
    dx.par_chunks_mut(d)
        .zip(dy.par_chunks(d).zip(x.par_chunks(d)))
        .for_each(|(dxr, (dyr, xr))| {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (ms + eps).sqrt();
            let dot: f32 = dyr.iter().zip(w).zip(xr).map(|((&g, &wi), &xi)| g * wi * xi).sum();
            let c = r * r * r / d as f32 * dot;
            for (((o, &g), &wi), &xi) in dxr.iter_mut().zip(dyr).zip(w).zip(xr) {
                *o = r * wi * g - c * xi;
            }
        });
}
