// fourier_grid.cuh: indices of the padded 3-D Fourier grid (FourierAccumulator's half-complex layout, axes z, y in
// FFT order and x = 0..Np/2), shared by insert.cu and finish.cu.
#ifndef GPU_ALI3D_FOURIER_GRID_CUH
#define GPU_ALI3D_FOURIER_GRID_CUH
#include "portable.cuh"

// Signed frequency of index i of an FFT-order axis of length n (np.fft.fftfreq * n; reconstruct._signed for even
// n): 0..(n+1)/2-1, then the negative ones (even n: 0..n/2-1, -n/2..-1; odd n: 0..(n-1)/2, -(n-1)/2..-1).
DEVICE long long fft_signed(long long i, long long n) { return i < (n + 1) / 2 ? i : i - n; }

// floor(sqrt(r2)) for an integer r2 >= 0, exact (the double sqrt is only a first guess).
DEVICE long long isqrt_ll(long long r2) {
    long long s = (long long)sqrt((double)r2);
    while (s > 0 && s * s > r2) --s;
    while ((s + 1) * (s + 1) <= r2) ++s;
    return s;
}

#endif  // GPU_ALI3D_FOURIER_GRID_CUH
