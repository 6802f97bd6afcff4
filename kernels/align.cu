// align.cu: a batch of simplices in one launch. One block per image runs that image's whole SPARX amoeba over the
// five pose parameters (phi, theta, psi degrees; sx, sy pixels), every evaluation by the block's threads over the
// image's kept samples (score.cuh score_pair, the objective of score.cu). The reference is gpu_ali3d/simplex.py:
// its module docstring states the rules and amoeba_scalar / amoeba_batched implement them; this kernel follows
// them operation by operation in float64 (best and worst in one pass with ties to the lowest index, centroid in
// index order, relative f range and scaled x distance before every step, reflection 2c - w, expansion 3c - 2w,
// whole-simplex shrink towards the best, itmax), so that its decisions are those of amoeba_batched driven by
// score.cu (tests/test_alignment.py). The launch wrapper is gpu_ali3d/alignment.py align_kernel.
//
// Shape of the block's work: the simplex is a small state machine (amoeba_state, in BLOCK_SHARED memory) that the
// leader thread advances by one objective value at a time; every thread of the block evaluates the point the
// state names, in one loop with one call of the objective:
//     leader: start (first point = vertex 0); barrier
//     while (!state.done) { all: v = objective(state.x); leader: advance(v) (next point, or done); barrier }
// The loop condition is read after a barrier, so every thread takes the same number of turns and calls block_sum
// the same number of times (portable.cuh); the objective's value is the same in every thread (block_sum returns
// one sum to all), and only the leader reads it. One call site keeps the objective inlined once, and the simplex
// out of the evaluating threads' registers. The FOR_BLOCKS body neither breaks nor returns.
#include "portable.cuh"
#include "gridding.cuh"
#include "score.cuh"

// The simplex of local_ali3d: 5 parameters, 6 vertices.
#define ALIGN_D 5
#define ALIGN_NV (ALIGN_D + 1)

// What the next objective value is for.
#define STAGE_INIT 0        // initial vertex `index`
#define STAGE_REFLECT 1     // the reflection pnew
#define STAGE_EXPAND 2      // the expansion (in x), pnew holding the reflection and fnew its value
#define STAGE_SHRINK 3      // shrunk vertex `index`
#define STAGE_MIDPOINT 4    // the midpoint of best and worst (the shrink's new vertex)

struct amoeba_controls {
    double ftol, xtol;      // <= 0 switches a test off (not both: the wrapper checks)
    long long itmax;        // 0: no limit
};

// One image's simplex, written by the leader only (read by all threads: x and done).
struct amoeba_state {
    double s[ALIGN_NV][ALIGN_D], f[ALIGN_NV];   // vertices and their values
    double sc[ALIGN_D];                          // initial steps (the x test's units)
    double pavg[ALIGN_D], pw[ALIGN_D];           // centroid and worst vertex of the current step
    double pnew[ALIGN_D], fnew;                  // the candidate that replaces the worst vertex
    double x[ALIGN_D];                           // the point every thread evaluates next
    double f0;                                   // value at the start, vertex 0
    long long steps, evals;
    int best, worst, stage, index, done;
};

// The objective at x for image img: score.cuh's two sums and score_value (the host's formula).
template <int KIND>
DEVICE double align_objective(const score_problem *sp, const double *x, long long img, double power,
                              double *rot, cfloat *phase) {
    double xy, pp;
    score_pair<KIND>(sp, x, img, rot, phase, &xy, &pp);
    return score_value(xy, pp, power);
}

DEVICE void set_point(amoeba_state *a, const double *p) {
    for (int j = 0; j < ALIGN_D; ++j) a->x[j] = p[j];
}

// Initial simplex: vertex 0 = x0, vertex i + 1 = x0 with sc[i] added to coordinate i; evaluate vertex 0 first.
DEVICE void amoeba_start(amoeba_state *a, const double *x0, const double *sc) {
    for (int i = 0; i < ALIGN_NV; ++i)
        for (int j = 0; j < ALIGN_D; ++j) a->s[i][j] = x0[j];
    for (int j = 0; j < ALIGN_D; ++j) {
        a->s[j + 1][j] = x0[j] + sc[j];
        a->sc[j] = sc[j];
    }
    a->steps = 0;
    a->evals = 0;
    a->stage = STAGE_INIT;
    a->index = 0;
    a->done = 0;
    set_point(a, a->s[0]);
}

// The start of a step (simplex.py): best and worst, centroid, convergence test; then either done, or the
// reflection to evaluate.
DEVICE void amoeba_step(amoeba_state *a, amoeba_controls ctl) {
    const int d = ALIGN_D, nv = ALIGN_NV;
    int best = 0, worst = 0;
    for (int i = 1; i < nv; ++i) {            // strict comparisons: ties go to the lowest index
        if (a->f[i] > a->f[best]) best = i;
        if (a->f[i] < a->f[worst]) worst = i;
    }
    for (int j = 0; j < d; ++j) {
        a->pavg[j] = 0.0;
        a->pw[j] = a->s[worst][j];
    }
    for (int i = 0; i < nv; ++i)
        if (i != worst)
            for (int j = 0; j < d; ++j) a->pavg[j] = a->pavg[j] + a->s[i][j];
    for (int j = 0; j < d; ++j) a->pavg[j] = a->pavg[j] / (double)d;
    double simscale = 0.0;
    for (int j = 0; j < d; ++j) simscale = simscale + fabs(a->pavg[j] - a->pw[j]) / a->sc[j];
    simscale = simscale / (double)d;
    const double fb = a->f[best], fw = a->f[worst];
    const double fscale = (fabs(fb) + fabs(fw)) / 2.0;
    const double frange = fscale != 0.0 ? fabs(fb - fw) / fscale : 0.0;
    a->best = best;
    a->worst = worst;
    if (((ctl.ftol <= 0.0 || frange < ctl.ftol) && (ctl.xtol <= 0.0 || simscale < ctl.xtol))
        || (ctl.itmax > 0 && a->steps >= ctl.itmax)) {
        a->done = 1;
        return;
    }
    for (int j = 0; j < d; ++j) a->pnew[j] = 2.0 * a->pavg[j] - a->pw[j];           // reflection
    a->stage = STAGE_REFLECT;
    set_point(a, a->pnew);
}

// The candidate pnew (value fnew) replaces the worst vertex; the next step begins.
DEVICE void amoeba_accept(amoeba_state *a, amoeba_controls ctl) {
    for (int j = 0; j < ALIGN_D; ++j) a->s[a->worst][j] = a->pnew[j];
    a->f[a->worst] = a->fnew;
    a->steps += 1;
    amoeba_step(a, ctl);
}

// Shrink from vertex `from` on: move the next vertex other than the best and the worst halfway to the best and
// evaluate it; after the last, the midpoint of best and worst.
DEVICE void amoeba_shrink_next(amoeba_state *a, int from) {
    const int b = a->best;
    int i = from;
    while (i < ALIGN_NV && (i == b || i == a->worst)) ++i;
    if (i < ALIGN_NV) {
        for (int j = 0; j < ALIGN_D; ++j) a->s[i][j] = 0.5 * a->s[b][j] + 0.5 * a->s[i][j];
        a->stage = STAGE_SHRINK;
        a->index = i;
        set_point(a, a->s[i]);
    } else {
        for (int j = 0; j < ALIGN_D; ++j) a->pnew[j] = 0.5 * a->s[b][j] + 0.5 * a->pw[j];
        a->stage = STAGE_MIDPOINT;
        set_point(a, a->pnew);
    }
}

// The value v of the point x has arrived: record it and name the next point (or finish).
DEVICE void amoeba_advance(amoeba_state *a, double v, amoeba_controls ctl) {
    a->evals += 1;
    switch (a->stage) {
        case STAGE_INIT:
            a->f[a->index] = v;
            a->index += 1;
            if (a->index < ALIGN_NV) {
                set_point(a, a->s[a->index]);
            } else {
                a->f0 = a->f[0];
                amoeba_step(a, ctl);
            }
            break;
        case STAGE_REFLECT:
            a->fnew = v;
            if (v <= a->f[a->worst]) {                     // shrink every vertex but the best towards it
                amoeba_shrink_next(a, 0);
            } else if (v >= a->f[a->best]) {               // try the expansion
                for (int j = 0; j < ALIGN_D; ++j) a->x[j] = 3.0 * a->pavg[j] - 2.0 * a->pw[j];
                a->stage = STAGE_EXPAND;
            } else {
                amoeba_accept(a, ctl);
            }
            break;
        case STAGE_EXPAND:
            if (v > a->fnew) {
                for (int j = 0; j < ALIGN_D; ++j) a->pnew[j] = a->x[j];
                a->fnew = v;
            }
            amoeba_accept(a, ctl);
            break;
        case STAGE_SHRINK:
            a->f[a->index] = v;
            amoeba_shrink_next(a, a->index + 1);
            break;
        default:                                           // STAGE_MIDPOINT
            a->fnew = v;
            amoeba_accept(a, ctl);
            break;
    }
}

// The results of a finished simplex: the best vertex of the last convergence test, or the start where that
// scores worse than the start (a NaN best does not), its value, the value at the start and the counts.
DEVICE void amoeba_finish(const amoeba_state *a, const double *x0, double *x_out, double *f_out, double *f0_out,
                          long long *steps_out, long long *evals_out) {
    const bool keep = a->f[a->best] < a->f0;
    for (int j = 0; j < ALIGN_D; ++j) x_out[j] = keep ? x0[j] : a->s[a->best][j];
    *f_out = keep ? a->f0 : a->f[a->best];
    *f0_out = a->f0;
    *steps_out = a->steps;
    *evals_out = a->evals;
}

// KERNEL align_kb, align_trilinear: one block per image (FOR_BLOCKS over n_images), threads over its samples
// (FOR_THREADS) in every evaluation; one entry point per interpolation (as score.cu's), the same arguments.
// Blocks are independent: images may be aligned in any order or split over launches.
//
//   ref ... has_ctf   the reference, samples and images exactly as score.cu's arguments of the same names
//                     (complex64 reference (D, D, Dx), float32 (S, 2) freqs, float32 (S,) weights, complex64
//                     (n_images, S) data, float32 (n_images, S) ctf read only if has_ctf).
//   power        float64 (n_images,): sum_s w |X|^2 per image (KernelImages.power), the score's normalisation.
//   x0           float64 (n_images, 5), C-contiguous: start poses phi, theta, psi (degrees), sx, sy (pixels).
//   scales       float64 (n_images, 5), C-contiguous: initial simplex steps, same units, finite and nonzero
//                (simplex.local_ali3d_scales).
//   n_images     int64: images = blocks.
//   ftol, xtol   float64: the convergence tolerances (simplex.py; <= 0 switches a test off, not both).
//   itmax        int64: the most steps, 0 = no limit.
//   x_best       float64 (n_images, 5), written: the best pose (x0 where nothing better than the start was found).
//   f_best       float64 (n_images,), written: its score.
//   f0           float64 (n_images,), written: the score at x0.
//   steps        int64 (n_images,), written: completed simplex steps (== itmax: the limit was hit).
//   evals        int64 (n_images,), written: objective evaluations, the 6 initial vertices included.
// Shared memory per block: dynamic, the objective's phase table (score.cuh score_phase_entries(k_index) cfloat,
// kernels.phase_table_bytes); static, the simplex (amoeba_state, about 0.5 KB), the rotation and block_sum's sums.
template <int KIND>
DEVICE void align_images(const cfloat *ref, int n, int halo, int extent, int taps,
                         const float *window, int window_size,
                         const float *freqs, const float *weights, int n_samples, int k_index,
                         const cfloat *data, const float *ctf, int has_ctf, const double *power,
                         const double *x0, const double *scales, long long n_images,
                         double ftol, double xtol, long long itmax,
                         double *x_best, double *f_best, double *f0, long long *steps, long long *evals) {
    const score_problem sp = make_score_problem(ref, n, halo, extent, taps, window, window_size, freqs,
                                                weights, n_samples, k_index, data, ctf, has_ctf);
    amoeba_controls ctl;
    ctl.ftol = ftol;
    ctl.xtol = xtol;
    ctl.itmax = itmax;
    FOR_BLOCKS(i, n_images) {
        DYNAMIC_SHARED(cfloat, phase, score_phase_entries(k_index));
        BLOCK_SHARED(double, rot, 9);
        BLOCK_SHARED(amoeba_state, state, 1);
        amoeba_state *a = state;
        const double pw = power[i];
        if (IS_LEADER) amoeba_start(a, x0 + ALIGN_D * i, scales + ALIGN_D * i);
        block_barrier();
        while (!a->done) {              // read after a barrier: the same answer in every thread
            const double v = align_objective<KIND>(&sp, a->x, i, pw, rot, phase);   // x: read before a barrier
            if (IS_LEADER) amoeba_advance(a, v, ctl);
            block_barrier();
        }
        if (IS_LEADER)
            amoeba_finish(a, x0 + ALIGN_D * i, x_best + ALIGN_D * i, f_best + i, f0 + i, steps + i, evals + i);
        block_barrier();                // every thread has left the loop before the leader starts the next image
    }
}

#define ALIGN_ARGS const cfloat *ref, int n, int halo, int extent, int taps, const float *window, \
    int window_size, const float *freqs, const float *weights, int n_samples, int k_index, const cfloat *data, \
    const float *ctf, int has_ctf, const double *power, const double *x0, const double *scales, \
    long long n_images, double ftol, double xtol, long long itmax, double *x_best, double *f_best, double *f0, \
    long long *steps, long long *evals
#define ALIGN_PASS ref, n, halo, extent, taps, window, window_size, freqs, weights, n_samples, k_index, data, ctf, \
    has_ctf, power, x0, scales, n_images, ftol, xtol, itmax, x_best, f_best, f0, steps, evals

KERNEL void align_kb(ALIGN_ARGS) { align_images<INTERP_KB>(ALIGN_PASS); }
KERNEL void align_trilinear(ALIGN_ARGS) { align_images<INTERP_TRILINEAR>(ALIGN_PASS); }
