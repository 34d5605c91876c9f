//! Causal grouped-query attention.

use super::dot;
use rayon::prelude::*;

/// Causal grouped-query attention of T new queries against a key/value history.
/// out: [T, h, hd] (overwritten), q: [T, h, hd], k, v: [S, h_kv, hd] where the new tokens are the
/// last T of the S cached ones, so query t sits at position `S - T + t` and sees keys `0..=S-T+t`.
/// Scores are scaled by `1/sqrt(hd)`; softmax in f32 with the max subtracted.
pub fn attention_fwd(out: &mut [f32], q: &[f32], k: &[f32], v: &[f32], heads: usize, kv_heads: usize, hd: usize) {
    let t_new = q.len() / (heads * hd);
    let s_all = k.len() / (kv_heads * hd);
    assert!(t_new <= s_all && v.len() == k.len() && out.len() == q.len());
    let group = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    out.par_chunks_mut(hd).enumerate().for_each_init(
        || vec![0f32; s_all],
        |scores, (row, o)| {
            let (t, h) = (row / heads, row % heads);
            let kvh = h / group;
            let visible = s_all - t_new + t + 1;
            let qv = &q[row * hd..(row + 1) * hd];
            let mut max = f32::NEG_INFINITY;
            for (s, sc) in scores[..visible].iter_mut().enumerate() {
                let kr = &k[(s * kv_heads + kvh) * hd..][..hd];
                *sc = dot(qv, kr) * scale;
                max = max.max(*sc);
            }
            let mut sum = 0f32;
            for sc in &mut scores[..visible] {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            o.fill(0.0);
            for (s, &p) in scores[..visible].iter().enumerate() {
                let vr = &v[(s * kv_heads + kvh) * hd..][..hd];
                let p = p / sum;
                for (oi, &vi) in o.iter_mut().zip(vr) {
                    *oi += p * vi;
                }
            }
        },
    );
}

/// Causal self-attention backward for one sequence (S = T: every query is also a key).
/// Recomputes the probabilities `P = softmax(q k^T / sqrt(hd))` row by row, then, for query t and
/// visible key s, with `dP_s = dO_t . v_s` and `D_t = sum_s P_s dP_s = dO_t . O_t`:
///   dS_s = P_s (dP_s - D_t)
///   dq_t = scale sum_s dS_s k_s,   dk_s += scale dS_s q_t,   dv_s += P_s dO_t
/// dq: [T, h, hd], dk, dv: [T, h_kv, hd] (all overwritten); dout, q: [T, h, hd]; k, v: [T, h_kv, hd].
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    heads: usize,
    kv_heads: usize,
    hd: usize,
) {
    let t_len = q.len() / (heads * hd);
    assert!(k.len() == t_len * kv_heads * hd && v.len() == k.len() && dout.len() == q.len());
    assert!(dq.len() == q.len() && dk.len() == k.len() && dv.len() == v.len());
    let group = heads / kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    // One task per kv head: it owns dk, dv of that head and dq of the query heads that share it.
    let per_kv: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..kv_heads)
        .into_par_iter()
        .map(|kvh| {
            let mut dq_g = vec![0f32; group * t_len * hd]; // [group, T, hd]
            let mut dk_h = vec![0f32; t_len * hd]; // [T, hd]
            let mut dv_h = vec![0f32; t_len * hd]; // [T, hd]
            let mut p = vec![0f32; t_len];
            let mut dp = vec![0f32; t_len];
            let krow = |s: usize| &k[(s * kv_heads + kvh) * hd..][..hd];
            let vrow = |s: usize| &v[(s * kv_heads + kvh) * hd..][..hd];
            for gi in 0..group {
                let h = kvh * group + gi;
                for t in 0..t_len {
                    let qv = &q[(t * heads + h) * hd..][..hd];
                    let dov = &dout[(t * heads + h) * hd..][..hd];
                    let mut max = f32::NEG_INFINITY;
                    for (s, ps) in p[..=t].iter_mut().enumerate() {
                        *ps = super::dot(qv, krow(s)) * scale;
                        max = max.max(*ps);
                    }
                    let mut sum = 0f32;
                    for ps in &mut p[..=t] {
                        *ps = (*ps - max).exp();
                        sum += *ps;
                    }
                    let mut big_d = 0f32;
                    for s in 0..=t {
                        p[s] /= sum;
                        dp[s] = super::dot(dov, vrow(s));
                        big_d += p[s] * dp[s];
                    }
                    let dqv = &mut dq_g[(gi * t_len + t) * hd..][..hd];
                    for s in 0..=t {
                        let ds = p[s] * (dp[s] - big_d) * scale;
                        let (kr, dkr, dvr) = (krow(s), &mut dk_h[s * hd..][..hd], &mut dv_h[s * hd..][..hd]);
                        for i in 0..hd {
                            dqv[i] += ds * kr[i];
                            dkr[i] += ds * qv[i];
                            dvr[i] += p[s] * dov[i];
                        }
                    }
                }
            }
            (dq_g, dk_h, dv_h)
        })
        .collect();
    for (kvh, (dq_g, dk_h, dv_h)) in per_kv.iter().enumerate() {
        for t in 0..t_len {
            dk[(t * kv_heads + kvh) * hd..][..hd].copy_from_slice(&dk_h[t * hd..][..hd]);
            dv[(t * kv_heads + kvh) * hd..][..hd].copy_from_slice(&dv_h[t * hd..][..hd]);
            for gi in 0..group {
                let h = kvh * group + gi;
                dq[(t * heads + h) * hd..][..hd].copy_from_slice(&dq_g[(gi * t_len + t) * hd..][..hd]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::Rng;

    #[test]
    fn attention_single_key_returns_its_value_and_is_causal() {
        let mut rng = Rng::new(3);
        let (heads, kv_heads, hd) = (4, 2, 8);
        let (t, s) = (3, 5);
        let q = rng.normal_vec(t * heads * hd, 1.0);
        let k = rng.normal_vec(s * kv_heads * hd, 1.0);
        let mut v = rng.normal_vec(s * kv_heads * hd, 1.0);
        let mut out = vec![f32::NAN; q.len()];
        attention_fwd(&mut out, &q, &k, &v, heads, kv_heads, hd);
        // Changing the value of the last key must not change the first query's output (it cannot see it).
        let before = out[..heads * hd].to_vec();
        let last = (s - 1) * kv_heads * hd;
        v[last..].iter_mut().for_each(|x| *x += 10.0);
        attention_fwd(&mut out, &q, &k, &v, heads, kv_heads, hd);
        assert_eq!(before, out[..heads * hd].to_vec());
        // A query that sees exactly one key returns that key's value.
        let mut one = vec![f32::NAN; heads * hd];
        attention_fwd(
            &mut one,
            &q[..heads * hd],
            &k[..kv_heads * hd],
            &v[..kv_heads * hd],
            heads,
            kv_heads,
            hd,
        );
        for h in 0..heads {
            let kvh = h / (heads / kv_heads);
            assert_eq!(&one[h * hd..(h + 1) * hd], &v[kvh * hd..(kvh + 1) * hd]);
        }
    }
}
