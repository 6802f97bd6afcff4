// selftest.cu: a tiny kernel that exercises every construct of portable.cuh (tests/test_kernel_build.py).
#include "portable.cuh"

// Row statistics of a matrix, one block per row.
//   x         float32 (n_rows, n_cols), C-contiguous.
//   n_rows    number of rows (blocks). n_cols: number of columns (threads' work).
//   row_sums  float64 (n_rows, 2), written: [sum_k x[i, k], sum_k x[i, k]^2 (accumulated in float32)].
//   total     float64 (1,), read-modify-write: += sum of all x (atomic_add from each block's leader).
//   cprod     float32 (n_rows, 2), written: the product of the complex numbers (x[i,0] + i x[i,1]) and
//             conj(x[i,2] + i x[i,3]) (needs n_cols >= 4), exercising the complex helpers.
KERNEL void selftest(const float *x, long long n_rows, int n_cols, double *row_sums, double *total, float *cprod) {
    FOR_BLOCKS(i, n_rows) {
        const float *row = x + i * (long long)n_cols;
        double s = 0.0;
        float s2 = 0.0f;
        FOR_THREADS(k, n_cols) {
            s += row[k];
            s2 += row[k] * row[k];
        }
        s = block_sum(s);
        s2 = block_sum(s2);
        if (IS_LEADER) {
            row_sums[2 * i] = s;
            row_sums[2 * i + 1] = s2;
            atomic_add(total, s);
            cfloat p = cmul(cmake(row[0], row[1]), cconj(cmake(row[2], row[3])));
            cprod[2 * i] = p.re;
            cprod[2 * i + 1] = p.im;
        }
    }
}
