// score.cuh: the objective's per-pair body, one copy shared by score.cu (one block per (image, pose) pair) and
// align.cu (one block per image, every simplex evaluation). The numpy reference is gpu_ali3d/score.py
// (_score_reference): for one image and one pose, over the image's kept Fourier samples, interpolate the prepared
// reference at R^T k, apply the shift phase and the CTF, and accumulate the two sums of the correlation.
#ifndef GPU_ALI3D_SCORE_CUH
#define GPU_ALI3D_SCORE_CUH
#include "portable.cuh"
#include "gridding.cuh"

// Per-thread accumulator of the two sums (block_sum then reduces across threads).
typedef double score_acc_t;
// Largest |kx|, |ky| (padded-grid units) of a kept sample: the per-pair table of shift phases has 3 K + 2 entries
// (the launch wrappers check K = k_index <= SCORE_MAX_K; 1024 is Nyquist of a 1024-pixel box at pad 2: a table
// of 24.6 KB, within the 48 KB of dynamic shared memory a launch may take without opting in).
#define SCORE_MAX_K 1024
// Entries of the phase table for K = k_index. A caller declares it as DYNAMIC_SHARED(cfloat, phase,
// score_phase_entries(k_index)); the launch wrappers give the GPU launch score_phase_entries(K) * sizeof(cfloat)
// bytes of dynamic shared memory (kernels.phase_table_bytes).
DEVICE int score_phase_entries(int k_index) { return 3 * k_index + 2; }

// The objective's inputs that do not change from pair to pair (the kernel arguments of score.cu, which documents
// each one: reference, its geometry and interpolation, the samples, the images' data and CTF). The kind of
// interpolation is not among them: the kernels are specialised on it (score_pair's KIND).
struct score_problem {
    const cfloat *ref;
    ref_layout g;
    kb_window w;
    int n, taps, kt;                   // N; taps per axis (2 for trilinear); k_index
    double reach2;                     // extent^2: samples with |k|^2 > extent^2 contribute P = 0
    const float *freqs, *weights;      // (S, 2), (S,)
    long long n_samples;               // S
    const cfloat *data;                // (n_images, S)
    const float *ctf;                  // (n_images, S), read only if has_ctf
    int has_ctf;
};

DEVICE score_problem make_score_problem(const cfloat *ref, int n, int halo, int extent, int taps,
                                        const float *window, int window_size, const float *freqs,
                                        const float *weights, int n_samples, int k_index, const cfloat *data,
                                        const float *ctf, int has_ctf) {
    score_problem sp;
    sp.ref = ref;
    sp.g = make_ref_layout(extent, halo);
    sp.w = make_kb_window(window, window_size, taps);
    sp.n = n;
    sp.taps = taps;
    sp.kt = k_index;
    sp.reach2 = (double)extent * (double)extent;
    sp.freqs = freqs;
    sp.weights = weights;
    sp.n_samples = n_samples;
    sp.data = data;
    sp.ctf = ctf;
    sp.has_ctf = has_ctf;
    return sp;
}

// cmul with each of its two sums of products one fmadd (rounded once where the target fuses).
DEVICE cfloat cmul_fused(cfloat a, cfloat b) {
    return cmake(fmadd(a.re, b.re, -(a.im * b.im)), fmadd(a.re, b.im, a.im * b.re));
}

// The two sums of one (image, pose) pair, reduced over the block and returned to EVERY thread (it calls
// block_sum twice: every thread of the block must call it, the same number of times):
//   *xy = sum_s w Re(conj(X) P),  *pp = sum_s w |P|^2,  P = F(R^T k) * exp(2 pi i (kx sx + ky sy) / N) * ctf.
// KIND: INTERP_KB or INTERP_TRILINEAR, the reference's interpolation (gridding.cuh interpolate_kind).
// q: the pose, float64 (5,): phi, theta, psi (degrees, SPIDER ZYZ), sx, sy (pixels), the same in every thread
// and read before the first barrier. img: the image, [0, n_images).
// rot: the caller's BLOCK_SHARED double[9]; phase: its DYNAMIC_SHARED table of score_phase_entries(k_index)
// cfloat. Both are rewritten here (rot by the leader, phase by all threads) and read by all after one barrier;
// block_sum's barriers keep the block's next call from rewriting them before every thread has read them.
// The rotation is computed once per pair, by the leader, from the angles in float64; interpolation and products
// in float32, the sums accumulated in float64 per thread (score_acc_t); the rotated coordinates (float64), the
// interpolation's two-tap sums and the complex products use explicit fmadd (portable.cuh), so score.cu and align.cu
// round alike on each target. The shift phase of a sample is the product
// of two per-axis factors (gridding.cuh axis_phase), tabulated once per pair for kx in [0, K] and ky in [-K, K]:
// 3 K + 2 sines and cosines per pair instead of one per sample.
template <int KIND>
DEVICE void score_pair(const score_problem *sp, const double *q, long long img, double *rot, cfloat *phase,
                       double *xy_out, double *pp_out) {
    const int kt = sp->kt;
    if (IS_LEADER) rotation_zyz(q[0], q[1], q[2], rot);
    const double sx_n = q[3] / sp->n, sy_n = q[4] / sp->n;
    FOR_THREADS(t, 3 * kt + 2) {        // [0, K]: kx = 0..K; [K + 1, 3K + 1]: ky = -K..K
        phase[t] = t <= kt ? axis_phase((double)t, sx_n) : axis_phase((double)(t - 2 * kt - 1), sy_n);
    }
    block_barrier();
    const double r0 = rot[0], r1 = rot[1], r2 = rot[2], r3 = rot[3], r4 = rot[4], r5 = rot[5];
    const long long n_samples = sp->n_samples;
    const cfloat *x = sp->data + img * n_samples;
    const float *c = sp->has_ctf ? sp->ctf + img * n_samples : 0;
    const float *freqs = sp->freqs, *weights = sp->weights;
    score_acc_t xy = 0, pp = 0;
    FOR_THREADS(s, n_samples) {
        const double kx = freqs[2 * s], ky = freqs[2 * s + 1];
        cfloat v = cmake(0.0f, 0.0f);
        if (kx * kx + ky * ky <= sp->reach2) {
            const double ux = fmadd(r0, kx, r3 * ky);    // u = R^T (kx, ky, 0)
            const double uy = fmadd(r1, kx, r4 * ky);
            const double uz = fmadd(r2, kx, r5 * ky);
            const cfloat ph = cmul_fused(phase[(int)kx], phase[2 * kt + 1 + (int)ky]);
            v = cmul_fused(interpolate_kind<KIND>(sp->ref, sp->g, sp->taps, &sp->w, ux, uy, uz), ph);
            if (sp->has_ctf) v = cscale(v, c[s]);
        }
        const cfloat xs = x[s];
        const float ws = weights[s];
        xy += (score_acc_t)(ws * fmadd(xs.re, v.re, xs.im * v.im));
        pp += (score_acc_t)(ws * fmadd(v.re, v.re, v.im * v.im));
    }
    *xy_out = block_sum(xy);      // its barriers also keep the next pair from rewriting phase[] too early
    *pp_out = block_sum(pp);
}

// The normalised correlation from the two sums, as the host forms it (kernels.score_kernel):
// xy / sqrt(power * pp), 0 where that denominator is not > 0. power: sum_s w |X|^2 of the image (float64).
DEVICE double score_value(double xy, double pp, double power) {
    const double den = sqrt(power * pp);
    return den > 0.0 ? xy / den : 0.0;
}

#endif  // GPU_ALI3D_SCORE_CUH
