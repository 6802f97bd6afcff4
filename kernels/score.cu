// score.cu: the fused objective. For each (image, pose) pair, over the image's kept Fourier samples:
// interpolate the prepared reference at R^T k, apply CTF and shift phase, correlate with the data.
// The numpy reference is gpu_ali3d/score.py (_score_reference); this kernel returns its two sums, and the host
// forms score = xy / sqrt(power[image] * pp) (0 where the denominator is 0). The per-pair body is score.cuh's
// score_pair, shared with align.cu (the whole simplex of an image in one block).
#include "portable.cuh"
#include "gridding.cuh"
#include "score.cuh"

// KERNEL score_kb, score_trilinear: one block per (image, pose) pair (FOR_BLOCKS), threads over samples
// (FOR_THREADS); one entry point per interpolation (the reference's, PreparedReference.interpolation), the same
// arguments. Dynamic shared memory of a GPU launch: the phase table, score_phase_entries(k_index) cfloat
// (kernels.phase_table_bytes); static: the rotation (9 double) and block_sum's partial sums.
//
//   ref          complex64 (D, D, Dx), C-contiguous, D = 2 E + 2 halo + 1, Dx = E + 1 + 2 halo: PreparedReference.data
//                cropped to |u_a| <= E (gridding.cuh ref_layout; origin u = 0 at [E + halo, E + halo, halo]).
//   n            int32: N, side of the padded grid (even). halo: int32, h = taps // 2.
//   extent       int32: E <= N/2; every sample must have |k| <= E (the launch wrapper checks), as the taps of a
//                point beyond E would leave the array.
//   taps         int32: taps per axis (K = kb_width for Kaiser-Bessel, <= 16; 2 for trilinear).
//   window       float32 (window_size + 1,): the KB window table (gridding.cuh kb_window; kernels.kb_window_table),
//                read only by score_kb. window_size: int32.
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
// Precision and the phase table: score.cuh score_pair.
template <int KIND>
DEVICE void score_pairs(const cfloat *ref, int n, int halo, int extent, int taps,
                        const float *window, int window_size,
                        const float *freqs, const float *weights, int n_samples, int k_index,
                        const cfloat *data, const float *ctf, int has_ctf,
                        const double *poses, const long long *image_index, long long n_pairs, double *out) {
    const score_problem sp = make_score_problem(ref, n, halo, extent, taps, window, window_size, freqs,
                                                weights, n_samples, k_index, data, ctf, has_ctf);
    FOR_BLOCKS(p, n_pairs) {
        DYNAMIC_SHARED(cfloat, phase, score_phase_entries(k_index));  // [0, K]: kx = 0..K; [K + 1, 3K + 1]: ky
        BLOCK_SHARED(double, rot, 9);
        double xy, pp;
        score_pair<KIND>(&sp, poses + 5 * p, image_index[p], rot, phase, &xy, &pp);
        if (IS_LEADER) {
            out[2 * p] = xy;
            out[2 * p + 1] = pp;
        }
    }
}

#define SCORE_ARGS const cfloat *ref, int n, int halo, int extent, int taps, const float *window, \
    int window_size, const float *freqs, const float *weights, int n_samples, int k_index, const cfloat *data, \
    const float *ctf, int has_ctf, const double *poses, const long long *image_index, long long n_pairs, double *out
#define SCORE_PASS ref, n, halo, extent, taps, window, window_size, freqs, weights, n_samples, k_index, data, ctf, \
    has_ctf, poses, image_index, n_pairs, out

KERNEL void score_kb(SCORE_ARGS) { score_pairs<INTERP_KB>(SCORE_PASS); }
KERNEL void score_trilinear(SCORE_ARGS) { score_pairs<INTERP_TRILINEAR>(SCORE_PASS); }
