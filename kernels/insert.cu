// insert.cu: back-projection of image transforms into the 3-D Fourier grid with weights, by nearest neighbour
// (SPARX nn4 / nn4_ctf insert_slice, onelinenn) or trilinear spreading (RELION). The numpy references are
// gpu_ali3d/reconstruct.py insert_transforms and insert_transforms_trilinear; the launch wrapper is reconstruct.insert_sums.
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
//      order (threads, blocks, CPU or GPU). These sums go into a zeroed scratch grid that holds each voxel's three
//      sums side by side (re, im, weight: one cache line per contribution, not two as with the accumulator's
//      separate value and weight grids; the insertion is bound by those misses on the CPU); insert_unscale then
//      adds scratch / scale to the accumulator voxel by voxel. The rounding rint(v * scale) costs at most
//      0.5 / scale = B[sh] 2^-52 per contribution (B[sh] the shell's bound), i.e. ~1e-11 relative to a typical
//      voxel of the shell at M = 64: far below the float32 rounding of the inputs.

#include "portable.cuh"
#include "fourier_grid.cuh"


// KERNEL insert: one block per (image, symmetry mate) pair (FOR_BLOCKS over n_images * n_mates, mate fastest),
// threads over the kept samples (FOR_THREADS). Two insertions (argument `trilinear`):
//   0  nearest neighbour (SPARX nn4 / nn4_ctf): the samples are those of the padded transform (m_ = np_, scale 1)
//      and each adds to the voxel nearest q.
//   1  trilinear: the samples are those of the image's own M x M transform (m_ = M, scale = npad), with the CTF
//      evaluated on that grid, placed at q = npad (R S)^T k and spread over the 8 voxels around q with weights
//      (1 - |dx|)(1 - |dy|)(1 - |dz|) (RELION's back-projection; reconstruct.insert_transforms_trilinear).
//
//   transforms   complex64 (n_images, m_, m_ / 2 + 1), C-contiguous: the centred, shifted (and CTF-multiplied)
//                image transforms of reconstruct.slice_transforms (npad = np_ / m_), np.fft.rfft2 layout (rows ky in
//                FFT order, columns kx = 0..m_/2), cycles per m_ pixels.
//   n_images     int64: n.
//   m_           int32: side of the transforms' grid (np_ for nearest neighbour, M (even or odd) for trilinear).
//   np_          int32: Np = npad * M, side of the padded 3-D grid (even).
//   scale        float64: np_ / m_, the factor from the transforms' frequency units to the 3-D grid's (1 or npad).
//   samples      int32 (n_samples,): flat indices (row * (m_/2 + 1) + kx) of the kept half-plane samples of one
//                image plane: 4 (kx^2 + ky^2) < m_^2 and not (kx = 0 and ky < 0) (reconstruct._kept_samples).
//   n_samples    int32.
//   weights      float32 (n_images or 1, m_, m_ / 2 + 1), C-contiguous: CTF^2 per sample; read only if
//                has_weights (else any array; the weight is 1).
//   weight_stride int64: elements between the weight planes of consecutive images (0 when one plane serves all).
//   has_weights  int32: 1 CTF^2 weights, 0 weight 1.
//   mates        float64 (n_images, n_mates, 3, 3), C-contiguous: R @ S per image and symmetry operator
//                (geometry.rotation_matrix times symmetry.symmetry_rotations, made on the host); sample (kx, ky)
//                goes to q = scale (R S)^T (kx, ky, 0).
//   n_mates      int32.
//   data         mode 0: complex128 (np_, np_, np_ / 2 + 1), C-contiguous, FourierAccumulator.data layout (axes z, y,
//                x; z and y in FFT order, x = 0..Np/2), the accumulator itself. Mode 1: the zeroed scratch grid,
//                float64 (np_, np_, np_ / 2 + 1, 3) (re, im, weight per voxel; reconstruct.new_scratch). Added to.
//   wsum         mode 0: float64 (np_, np_, np_ / 2 + 1), FourierAccumulator.weights, added to. Mode 1: unread.
//   scale_v      float64 (n_shells,): mode 1, the power-of-two scale of data contributions per shell (else unread).
//   scale_w      float64 (n_shells,): mode 1, the same for the weights. n_shells >= isqrt(3 (Np/2)^2) + 1.
//   deterministic int32: 0 atomic mode, 1 fixed-point mode (file comment).
//   trilinear    int32: 0 nearest neighbour, 1 trilinear (above).

// One contribution (value re + i im, weight wt) to voxel (ix, iy, iz) (ix >= 0; iy, iz signed in [-Np/2, Np/2]).
// The voxel v's value is vals[v * vstride], vals[v * vstride + 1] and its weight wts[v * wstride].
DEVICE void add_to_voxel(long long ix, long long iy, long long iz, long long n, long long half, double re,
                         double im, double wt, double *vals, long long vstride, double *wts, long long wstride,
                         const double *scale_v, const double *scale_w, int deterministic) {
    // one wrap into FFT order
    const long long voxel = ((iz < 0 ? iz + n : iz) * n + (iy < 0 ? iy + n : iy)) * half + ix;
    if (deterministic) {
        const long long sh = isqrt_ll(ix * ix + iy * iy + iz * iz);
        re = rint_small(re * scale_v[sh]);      // |value| < 2^51 by the choice of the scales
        im = rint_small(im * scale_v[sh]);
        wt = rint_small(wt * scale_w[sh]);
    }
    atomic_add(&vals[voxel * vstride], re);
    atomic_add(&vals[voxel * vstride + 1], im);
    atomic_add(&wts[voxel * wstride], wt);
}

KERNEL void insert(const cfloat *transforms, long long n_images, int m_, int np_, double scale,
                   const int *samples, int n_samples,
                   const float *weights, long long weight_stride, int has_weights,
                   const double *mates, int n_mates, cdouble *data, double *wsum,
                   const double *scale_v, const double *scale_w, int deterministic, int trilinear) {
    const long long n = np_, half = np_ / 2 + 1;
    const long long m_half = m_ / 2 + 1, m_plane = (long long)m_ * m_half;
    double *const vals = (double *)data;                  // mode 1: the interleaved scratch (re, im, weight)
    const long long vstride = deterministic ? 3 : 2, wstride = deterministic ? 3 : 1;
    double *const wts = deterministic ? vals + 2 : wsum;
    FOR_BLOCKS(b, n_images * (long long)n_mates) {
        const long long img = b / n_mates;
        const double *m = mates + 9 * b;                  // (img, mate) row-major 3 x 3
        const cfloat *x = transforms + img * m_plane;
        const float *w = has_weights ? weights + img * weight_stride : 0;
        FOR_THREADS(s, n_samples) {
            const int f = samples[s];
            const int row = f / (int)m_half, kx = f - row * (int)m_half, ky = (int)fft_signed(row, m_);
            const double dkx = (double)kx, dky = (double)ky;
            // q = scale (R S)^T (kx, ky, 0): q_a = (M[0][a] kx + M[1][a] ky) scale, rounded as the reference rounds
            // it (each product, then the sum, then the scale: exact for scale 1 and powers of two), so that a sample
            // near a voxel boundary lands where numpy puts it. NVRTC/nvcc contract a * b + c * d into
            // fma(a, b, c * d) by default (--fmad=true), which rounds once less; the "+ 0.0" (not removable without
            // -ffast-math: it turns -0 into +0) makes each product its own fma(a, b, 0) = round(a b), and the sum of
            // two such results is not contracted. Checked in the PTX (sm_80, sm_90).
            const double px = m[0] * dkx + 0.0, py = m[1] * dkx + 0.0, pz = m[2] * dkx + 0.0;
            const double rx = m[3] * dky + 0.0, ry = m[4] * dky + 0.0, rz = m[5] * dky + 0.0;
            double qx = (px + rx) * scale, qy = (py + ry) * scale, qz = (pz + rz) * scale;
            const bool flip = qx < 0.0;                    // Friedel: -q and the complex conjugate
            if (flip) { qx = -qx; qy = -qy; qz = -qz; }
            const cfloat v = x[f];
            const double re = (double)v.re, im = flip ? -(double)v.im : (double)v.im;
            const double wt = has_weights ? (double)w[f] : 1.0;
            if (!trilinear) {
                // |q| < Np/2, so iy, iz are in [-Np/2, Np/2]
                add_to_voxel(floor_ll(qx + 0.5), floor_ll(qy + 0.5), floor_ll(qz + 0.5), n, half, re, im, wt,
                             vals, vstride, wts, wstride, scale_v, scale_w, deterministic);
            } else {
                // the 8 voxels around q: x0 + 0/1 <= Np/2 and y0, z0 + 0/1 in [-Np/2, Np/2] as |q| < Np/2
                const long long x0 = floor_ll(qx), y0 = floor_ll(qy), z0 = floor_ll(qz);
                const double fx = qx - (double)x0, fy = qy - (double)y0, fz = qz - (double)z0;
                for (int c = 0; c < 4; ++c) {            // the four (y, z) rows' lines requested together
                    const long long iy = y0 + (c & 1), iz = z0 + (c >> 1);
                    const long long v = ((iz < 0 ? iz + n : iz) * n + (iy < 0 ? iy + n : iy)) * half + x0;
                    prefetch_write(&vals[v * vstride]);
                    prefetch_write(&vals[(v + 1) * vstride + 2]);
                }
                for (int c = 0; c < 8; ++c) {
                    const int dx = c & 1, dy = (c >> 1) & 1, dz = c >> 2;
                    const double t = ((dx ? fx : 1.0 - fx) * (dy ? fy : 1.0 - fy)) * (dz ? fz : 1.0 - fz);
                    add_to_voxel(x0 + dx, y0 + dy, z0 + dz, n, half, re * t, im * t, wt * t,
                                 vals, vstride, wts, wstride, scale_v, scale_w, deterministic);
                }
            }
        }
    }
}

// KERNEL insert_unscale: the end of the deterministic mode, one block per (z, y) row of the grid (FOR_BLOCKS over
// np_ * np_), threads over x. acc_data[v] += (scratch[v][0] + i scratch[v][1]) / scale_v[sh(v)], acc_w[v] +=
// scratch[v][2] / scale_w[sh(v)], sh(v) = floor(|i|) of the voxel's signed integer coordinates (as in insert).
// Division by a power of two: exact (barring underflow). The scratch voxels are set back to 0, ready for the next batch of images.
//
//   scratch      float64 (np_, np_, np_ / 2 + 1, 3), C-contiguous: the fixed-point sums (re, im, weight per voxel) of
//                insert (mode 1); zeroed.
//   np_          int32: Np (even).
//   scale_v, scale_w  float64 (n_shells,): the scales insert used.
//   acc_data     complex128 (np_, np_, np_ / 2 + 1): FourierAccumulator.data, added to.
//   acc_w        float64 (np_, np_, np_ / 2 + 1): FourierAccumulator.weights, added to.
KERNEL void insert_unscale(double *scratch, int np_,
                           const double *scale_v, const double *scale_w, cdouble *acc_data, double *acc_w) {
    const long long n = np_, half = np_ / 2 + 1;
    FOR_BLOCKS(r, n * n) {
        const long long iz = fft_signed(r / n, n), iy = fft_signed(r % n, n);
        FOR_THREADS(ix, half) {
            const long long v = r * half + ix;
            const long long sh = isqrt_ll(ix * ix + iy * iy + iz * iz);
            double *const s = scratch + 3 * v;
            acc_data[v].re += s[0] / scale_v[sh];
            acc_data[v].im += s[1] / scale_v[sh];
            acc_w[v] += s[2] / scale_w[sh];
            s[0] = 0.0;
            s[1] = 0.0;
            s[2] = 0.0;
        }
    }
}
