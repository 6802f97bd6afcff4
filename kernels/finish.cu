// finish.cu: the first step of the reconstruction's finish (gpu_ali3d/reconstruct.py finish, its numpy reference):
// every voxel of the padded half-complex grid divided by its weight plus the Wiener term, in one pass over the
// grid, for one accumulator or the sum of two (the full map from the half sets, without forming their sum).
// float64 throughout, the reference's operations in its order: (d_a + d_b) / ((w_a + w_b) + lambda) where the
// weight is > 0, else the data as they are (0 where nothing was inserted). numpy divides a complex number by a real
// one (promoted to complex, Smith's rule) as d * (1 / den) part by part, and so does this kernel: the results are
// the reference's bit for bit (barring the sign of a zero).

#include "portable.cuh"
#include "fourier_grid.cuh"

// KERNEL finish: one block per (z, y) row of the grid (FOR_BLOCKS over np_ * np_), threads over x.
//
//   data_a, w_a  complex128, float64 (np_, np_, np_ / 2 + 1), C-contiguous: an accumulator's data and weights.
//   data_b, w_b  the same of a second accumulator, added to the first's; read only if has_b.
//   has_b        int32: 1 to normalise the sum of the two, 0 for a alone.
//   np_          int32: Np (even).
//   lambda_const float64: the Wiener term of every voxel (SPARX's 1 / snr), used when per_shell is 0.
//   lambda_shell float64 (n_shells,): the term of the voxels of shell sh = floor(|i|) (i the voxel's signed
//                integer coordinates: reconstruct._voxel_shells), read only if per_shell.
//   per_shell    int32: 1 to read lambda_shell.
//   out          complex128 (np_, np_, np_ / 2 + 1): the normalised grid (may not alias the inputs).
KERNEL void finish(const cdouble *data_a, const double *w_a, const cdouble *data_b, const double *w_b,
                   int has_b, int np_, double lambda_const, const double *lambda_shell, int per_shell,
                   cdouble *out) {
    const long long n = np_, half = np_ / 2 + 1;
    FOR_BLOCKS(r, n * n) {
        const long long iz = fft_signed(r / n, n), iy = fft_signed(r % n, n);
        FOR_THREADS(ix, half) {
            const long long v = r * half + ix;
            cdouble d = data_a[v];
            double w = w_a[v];
            if (has_b) {
                d = cadd(d, data_b[v]);
                w += w_b[v];
            }
            if (w > 0.0) {
                const double lam = per_shell ? lambda_shell[isqrt_ll(ix * ix + iy * iy + iz * iz)] : lambda_const;
                const double scale = 1.0 / (w + lam);          // numpy's complex / real: Smith's rule
                d = cmake(d.re * scale, d.im * scale);           // with a zero imaginary part

            }
            out[v] = d;
        }
    }
}
