// score.cu: the fused objective. For each (image, pose) pair, over the image's kept Fourier samples:
// interpolate the prepared reference at R^T k, apply CTF and shift phase, correlate with the data.
// The numpy reference is gpu_ali3d/score.py (_score_reference); this kernel returns its two sums, and the host
// forms score = xy / sqrt(power[image] * pp) (0 where the denominator is 0).
#include "portable.cuh"
#include "gridding.cuh"

// Per-thread accumulator of the two sums (block_sum then reduces across threads).
typedef double score_acc_t;
// Largest |kx|, |ky| (padded-grid units) of a kept sample: the per-pair table of shift phases has 3 K + 2 entries
// (the launch wrapper checks K = k_index <= SCORE_MAX_K; 1024 is Nyquist of a 1024-pixel box at pad 2).
#define SCORE_MAX_K 1024

// KERNEL score: one block per (image, pose) pair (FOR_BLOCKS), threads over samples (FOR_THREADS).
//
//   ref          complex64 (D, D, Dx), C-contiguous, D = 2 E + 2 halo + 1, Dx = E + 1 + 2 halo: PreparedReference.data
//                cropped to |u_a| <= E (gridding.cuh ref_layout; origin u = 0 at [E + halo, E + halo, halo]).
//   n            int32: N, side of the padded grid (even). halo: int32, h = taps // 2.
//   extent       int32: E <= N/2; every sample must have |k| <= E (the launch wrapper checks), as the taps of a
//                point beyond E would leave the array.
//   taps         int32: taps per axis (K = kb_width for Kaiser-Bessel, 2 for trilinear), <= 16.
//   kind         int32: 0 Kaiser-Bessel, 1 trilinear (PreparedReference.interpolation).
//   window       float32 (window_size + 1,): the KB window table (gridding.cuh kb_window; kernels.kb_window_table),
//                read only for Kaiser-Bessel. window_size: int32.
//   freqs        float32 (S, 2), C-contiguous: kept samples (kx, ky), padded-grid units (integers, kx >= 0),
//                PreparedImages.freqs.
//   weights      float32 (S,): Hermitian multiplicity (1 or 2), PreparedImages.weights.
//   n_samples    int32: S.
//   k_index      int32: K >= max |kx|, |ky| over the samples (<= SCORE_MAX_K); the size of the phase table.
//   data         complex64 (n_images, S), C-contiguous: image transforms at the kept samples, PreparedImages.data.
//   ctf          float32 (n_images, S), C-contiguous, PreparedImages.ctf; read only if has_ctf (else any array).
//   has_ctf      int32: 1 multiply by ctf[image, s], 0 no CTF.
//   poses        float64 (n_pairs, 5), C-contiguous: phi, theta, psi (degrees, SPIDER ZYZ), sx, sy (pixels).
//   image_index  int64 (n_pairs,): the image each pose is scored against, in [0, n_images).
//   n_pairs      int64: number of (image, pose) pairs = blocks.
//   out          float64 (n_pairs, 2), C-contiguous, written (every element): [sum_s w Re(conj(X) P),
//                sum_s w |P|^2] with P = F(R^T k) * exp(2 pi i (kx sx + ky sy) / N) * ctf; samples with
//                |k| > E (E <= N/2, so also those beyond Nyquist) contribute P = 0 (as gridding.sample_reference
//                for |k| > N/2).
// The rotation is computed per pair from the angles, in float64; interpolation and products in float32, the sums
// accumulated in float64 per thread (score_acc_t) and reduced with block_sum. The shift phase of a sample is the
// product of two per-axis factors (gridding.cuh axis_phase), tabulated once per pair for kx in [0, K] and ky in
// [-K, K]: 3 K + 2 sines and cosines per pair instead of one per sample.
KERNEL void score(const cfloat *ref, int n, int halo, int extent, int taps, int kind,
                  const float *window, int window_size,
                  const float *freqs, const float *weights, int n_samples, int k_index,
                  const cfloat *data, const float *ctf, int has_ctf,
                  const double *poses, const long long *image_index, long long n_pairs, double *out) {
    const kb_window w = make_kb_window(window, window_size, taps);
    const ref_layout g = make_ref_layout(extent, halo);
    const double reach2 = (double)extent * (double)extent;
    const int kt = k_index;
    FOR_BLOCKS(p, n_pairs) {
        BLOCK_SHARED(cfloat, phase, 3 * SCORE_MAX_K + 2);   // [0, K]: kx = 0..K; [K + 1, 3K + 1]: ky = -K..K
        const double *q = poses + 5 * p;
        double r[9];
        rotation_zyz(q[0], q[1], q[2], r);
        const double sx_n = q[3] / n, sy_n = q[4] / n;
        FOR_THREADS(t, 3 * kt + 2) {
            phase[t] = t <= kt ? axis_phase((double)t, sx_n) : axis_phase((double)(t - 2 * kt - 1), sy_n);
        }
        block_barrier();
        const long long img = image_index[p];
        const cfloat *x = data + img * (long long)n_samples;
        const float *c = has_ctf ? ctf + img * (long long)n_samples : 0;
        score_acc_t xy = 0, pp = 0;
        FOR_THREADS(s, n_samples) {
            const double kx = freqs[2 * s], ky = freqs[2 * s + 1];
            cfloat v = cmake(0.0f, 0.0f);
            if (kx * kx + ky * ky <= reach2) {
                const double ux = r[0] * kx + r[3] * ky;     // u = R^T (kx, ky, 0)
                const double uy = r[1] * kx + r[4] * ky;
                const double uz = r[2] * kx + r[5] * ky;
                const cfloat ph = cmul(phase[(int)kx], phase[2 * kt + 1 + (int)ky]);
                v = cmul(interpolate_any(ref, g, taps, kind, &w, ux, uy, uz), ph);
                if (has_ctf) v = cscale(v, c[s]);
            }
            const cfloat xs = x[s];
            const float ws = weights[s];
            xy += (score_acc_t)(ws * (xs.re * v.re + xs.im * v.im));
            pp += (score_acc_t)(ws * cabs2(v));
        }
        xy = block_sum(xy);      // its barriers also keep the next pair from rewriting phase[] too early
        pp = block_sum(pp);
        if (IS_LEADER) {
            out[2 * p] = xy;
            out[2 * p + 1] = pp;
        }
    }
}
