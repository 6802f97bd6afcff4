// insert.cu: nearest-neighbour back-projection of image transforms into the 3-D Fourier grid with weights
// (SPARX nn4 / nn4_ctf insert_slice, onelinenn). The numpy reference is gpu_ali3d/reconstruct.py
// (insert_transforms); the launch wrapper is reconstruct.insert_sums.
//
// Precision: the grid and weights are float64 (complex128 = two doubles), the layout of FourierAccumulator, so the
// host finish and the MPI sum (float64, DESIGN.md "MPI") read the kernel's output as it is. A float32 grid would
// halve the memory but sum 10^4-10^5 contributions per low-frequency voxel with ~1e-7 relative rounding each.
// Inputs are float32 (complex64 transforms, float32 CTF^2), converted exactly to double before any arithmetic.
//
// Voxel positions are computed as the reference does, in float64 from the same host-made matrices (R @ S):
// q_a = M[0][a] kx + M[1][a] ky (two products, then their sum), Friedel flip if q_x < 0, floor(q + 0.5).
//
// Two modes (argument `deterministic`):
//   0  atomic: each contribution, as double, is atomic_add-ed into the accumulator. The order of the additions
//      follows thread timing, so the last bits of a voxel can change from run to run.
//   1  deterministic (fixed point in float64): each contribution v to a voxel in shell sh (sh = floor(|i|) of the
//      voxel's integer coordinates i) is replaced by the integer rint(v * scale[sh]), scale a power of two chosen by
//      the host so that the sum of |contributions| reaching any voxel of that shell is below 2^51. Every partial
//      sum is then an integer below 2^53, so every double addition is exact and the result does not depend on the
//      order (threads, blocks, CPU or GPU). These sums go into a zeroed scratch grid; insert_unscale then adds
//      scratch / scale to the accumulator voxel by voxel. The rounding rint(v * scale) costs at most
//      0.5 / scale = B[sh] 2^-52 per contribution (B[sh] the shell's bound), i.e. ~1e-11 relative to a typical
//      voxel of the shell at M = 64: far below the float32 rounding of the inputs.

#include "portable.cuh"

// Signed frequency of index i of an FFT-order axis of length n (reconstruct._signed): 0..n/2-1, then -n/2..-1.
DEVICE long long fft_signed(long long i, long long n) { return i < n / 2 ? i : i - n; }

// floor(sqrt(r2)) for an integer r2 >= 0, exact (the double sqrt is only a first guess).
DEVICE long long isqrt_ll(long long r2) {
    long long s = (long long)sqrt((double)r2);
    while (s > 0 && s * s > r2) --s;
    while ((s + 1) * (s + 1) <= r2) ++s;
    return s;
}

// KERNEL insert: one block per (image, symmetry mate) pair (FOR_BLOCKS over n_images * n_mates, mate fastest),
// threads over the kept samples (FOR_THREADS).
//
//   transforms   complex64 (n_images, np_, np_ / 2 + 1), C-contiguous: the padded, centred, shifted (and
//                CTF-multiplied) image transforms of reconstruct.slice_transforms, np.fft.rfft2 layout (rows ky in
//                FFT order, columns kx = 0..np_/2), cycles per padded box.
//   n_images     int64: n.
//   np_          int32: Np = npad * M, side of the padded grid (even).
//   samples      int32 (n_samples,): flat indices (row * (np_/2 + 1) + kx) of the kept half-plane samples of one
//                image plane: kx^2 + ky^2 < Np^2 / 4 and not (kx = 0 and ky < 0) (reconstruct._kept_samples).
//   n_samples    int32.
//   weights      float32 (n_images or 1, np_, np_ / 2 + 1), C-contiguous: CTF^2 per sample; read only if
//                has_weights (else any array; the weight is 1).
//   weight_stride int64: elements between the weight planes of consecutive images (0 when one plane serves all).
//   has_weights  int32: 1 CTF^2 weights, 0 weight 1.
//   mates        float64 (n_images, n_mates, 3, 3), C-contiguous: R @ S per image and symmetry operator
//                (geometry.rotation_matrix times symmetry.symmetry_rotations, made on the host); sample (kx, ky)
//                goes to q = (R S)^T (kx, ky, 0).
//   n_mates      int32.
//   data         complex128 (np_, np_, np_ / 2 + 1), C-contiguous, FourierAccumulator.data layout (axes z, y, x; z and
//                y in FFT order, x = 0..Np/2): mode 0 the accumulator itself, mode 1 the zeroed scratch grid. Added to.
//   wsum         float64, same shape: FourierAccumulator.weights (mode 0) or the weight scratch grid (mode 1).
//   scale_v      float64 (n_shells,): mode 1, the power-of-two scale of data contributions per shell (else unread).
//   scale_w      float64 (n_shells,): mode 1, the same for the weights. n_shells >= isqrt(3 (Np/2)^2) + 1.
//   deterministic int32: 0 atomic mode, 1 fixed-point mode (file comment).
KERNEL void insert(const cfloat *transforms, long long n_images, int np_, const int *samples, int n_samples,
                   const float *weights, long long weight_stride, int has_weights,
                   const double *mates, int n_mates, cdouble *data, double *wsum,
                   const double *scale_v, const double *scale_w, int deterministic) {
    const long long n = np_, half = np_ / 2 + 1, plane = n * half;
    FOR_BLOCKS(b, n_images * (long long)n_mates) {
        const long long img = b / n_mates;
        const double *m = mates + 9 * b;                  // (img, mate) row-major 3 x 3
        const cfloat *x = transforms + img * plane;
        const float *w = has_weights ? weights + img * weight_stride : 0;
        FOR_THREADS(s, n_samples) {
            const int f = samples[s];
            const int row = f / (int)half, kx = f - row * (int)half, ky = (int)fft_signed(row, n);
            const double dkx = (double)kx, dky = (double)ky;
            // q = (R S)^T (kx, ky, 0): q_a = M[0][a] kx + M[1][a] ky, rounded as the reference rounds it (each
            // product, then the sum), so that a sample near a voxel boundary lands where numpy puts it. NVRTC/nvcc
            // contract a * b + c * d into fma(a, b, c * d) by default (--fmad=true), which rounds once less; the
            // "+ 0.0" (not removable without -ffast-math: it turns -0 into +0) makes each product its own fma(a, b, 0)
            // = round(a b), and the sum of two such results is not contracted. Checked in the PTX (sm_80, sm_90).
            const double px = m[0] * dkx + 0.0, py = m[1] * dkx + 0.0, pz = m[2] * dkx + 0.0;
            const double rx = m[3] * dky + 0.0, ry = m[4] * dky + 0.0, rz = m[5] * dky + 0.0;
            double qx = px + rx, qy = py + ry, qz = pz + rz;
            const bool flip = qx < 0.0;                    // Friedel: -q and the complex conjugate
            if (flip) { qx = -qx; qy = -qy; qz = -qz; }
            const long long ix = floor_ll(qx + 0.5);
            const long long iy = floor_ll(qy + 0.5), iz = floor_ll(qz + 0.5);   // signed
            // |q| < Np/2, so iy, iz are in [-Np/2, Np/2]: one wrap into FFT order
            const long long voxel = ((iz < 0 ? iz + n : iz) * n + (iy < 0 ? iy + n : iy)) * half + ix;
            const cfloat v = x[f];
            double re = (double)v.re, im = flip ? -(double)v.im : (double)v.im;
            double wt = has_weights ? (double)w[f] : 1.0;
            if (deterministic) {
                const long long sh = isqrt_ll(ix * ix + iy * iy + iz * iz);
                re = rint_small(re * scale_v[sh]);      // |value| < 2^51 by the choice of the scales
                im = rint_small(im * scale_v[sh]);
                wt = rint_small(wt * scale_w[sh]);
            }
            atomic_add(&data[voxel].re, re);
            atomic_add(&data[voxel].im, im);
            atomic_add(&wsum[voxel], wt);
        }
    }
}

// KERNEL insert_unscale: the end of the deterministic mode, one block per (z, y) row of the grid (FOR_BLOCKS over
// np_ * np_), threads over x. acc_data[v] += scratch_data[v] / scale_v[sh(v)], acc_w[v] += scratch_w[v] /
// scale_w[sh(v)], sh(v) = floor(|i|) of the voxel's signed integer coordinates (as in insert). Division by a power of
// two: exact (barring underflow). The scratch voxels are set back to 0, ready for the next batch of images.
//
//   scratch_data complex128 (np_, np_, np_ / 2 + 1), C-contiguous: the fixed-point sums of insert (mode 1); zeroed.
//   scratch_w    float64, same shape; zeroed.
//   np_          int32: Np (even).
//   scale_v, scale_w  float64 (n_shells,): the scales insert used.
//   acc_data     complex128, same shape: FourierAccumulator.data, added to.
//   acc_w        float64, same shape: FourierAccumulator.weights, added to.
KERNEL void insert_unscale(cdouble *scratch_data, double *scratch_w, int np_,
                           const double *scale_v, const double *scale_w, cdouble *acc_data, double *acc_w) {
    const long long n = np_, half = np_ / 2 + 1;
    FOR_BLOCKS(r, n * n) {
        const long long iz = fft_signed(r / n, n), iy = fft_signed(r % n, n);
        FOR_THREADS(ix, half) {
            const long long v = r * half + ix;
            const long long sh = isqrt_ll(ix * ix + iy * iy + iz * iz);
            acc_data[v].re += scratch_data[v].re / scale_v[sh];
            acc_data[v].im += scratch_data[v].im / scale_v[sh];
            acc_w[v] += scratch_w[v] / scale_w[sh];
            scratch_data[v].re = 0.0;
            scratch_data[v].im = 0.0;
            scratch_w[v] = 0.0;
        }
    }
}
