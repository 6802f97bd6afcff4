// portable.cuh: the one place that knows CUDA from the host compiler (DESIGN.md, "The portability pattern").
//
// Kernels are written in "blocks of threads" form and compiled twice from the same text: by NVRTC / nvcc
// (__CUDACC__ defined) for the GPU, and by the host C++ compiler with OpenMP (-x c++ -fopenmp) for the CPU.
// No other CUDA-only construct may appear in a kernel body.
//
//   KERNEL           a kernel entry point.            CUDA: extern "C" __global__     CPU: extern "C" (plain function)
//   DEVICE           a helper callable from kernels.  CUDA: __device__ inline         CPU: static inline
//   FOR_BLOCKS(i, n) `for` header: the loop over independent work items ("blocks"), i a long long in [0, n).
//                    CUDA: grid-stride loop over blockIdx.x (every thread of a block sees the same i, so block-wide
//                    barriers inside the body are safe). CPU: `#pragma omp parallel for schedule(dynamic)` loop.
//                    The body is an ordinary block `{ ... }`; variables declared in it are private to the item.
//                    The body must not `break` or `return` (OpenMP forbids it; on CUDA it would desert barriers).
//   FOR_THREADS(k, n) `for` header: the loop over the sub-items of one work item, k a long long in [0, n).
//                    CUDA: k = threadIdx.x, stepping by blockDim.x. CPU: a plain sequential loop.
//   IS_LEADER        true in exactly one thread of a block: CUDA threadIdx.x == 0; CPU: true.
//   block_sum(x)     sum of x over the threads of the block (float or double), returned to EVERY thread.
//                    CUDA: warp shuffles + shared memory; it contains __syncthreads(), so every thread of the block
//                    must call it the same number of times (call it after FOR_THREADS, never inside a branch that
//                    depends on threadIdx), and blockDim.x must be a multiple of 32 (at most 1024).
//                    Consecutive calls are safe (each starts with a barrier). CPU: identity (one "thread" per block).
//   BLOCK_SHARED(T, name, n)  declares `T name[n]` (n a compile-time constant) shared by the threads of a block:
//                    declare it inside the FOR_BLOCKS body, fill it in a FOR_THREADS loop, then block_barrier().
//                    CUDA: __shared__ (one copy per block, reused by the block's next item: a barrier (block_sum has
//                    them) must separate the last read of one item from the first write of the next). CPU: an
//                    array local to the item.
//   DYNAMIC_SHARED(T, name, n)  declares `T *name` pointing at n elements (n known only at run time) shared by
//                    the threads of a block, used as BLOCK_SHARED. CUDA: the block's dynamic shared memory
//                    (`extern __shared__`): the launch must give at least n * sizeof(T) bytes (KernelSet.launch
//                    shared_mem=), n itself is not read; one DYNAMIC_SHARED per kernel (every one names the same
//                    memory), alignment 16 bytes. CPU: an array of n elements local to the item (a variable-length
//                    array, which g++ and clang accept in C++), so both targets size it the same way.
//   block_barrier()  all threads of the block wait here. CUDA: __syncthreads(); CPU: nothing.
//   atomic_add(p, v) *p += v atomically (float or double). CUDA: atomicAdd; CPU: `#pragma omp atomic`.
//   prefetch_write(p)  a hint that *p will be written soon: CPU `__builtin_prefetch(p, 1, 3)` (the insertion issues
//                    a sample's cache misses together, where its locked adds would take them one at a time);
//                    CUDA: nothing (the GPU hides latency by running other warps).
//   cfloat, cdouble  complex numbers {re, im}, laid out as numpy complex64 / complex128 (two floats, aligned to their
//                    size), with cmake, cadd, csub, cmul, cconj, cscale, cabs2 helpers usable on both targets.
//   sincos_f(x, &s, &c)  float sine and cosine of x (radians); full-precision library versions on both targets.
//
//   floor_ll(x), rint_small(x)  floor to an integer and round-half-even of a double, without library calls.
//   fmadd(a, b, c)   a * b + c (float or double), rounded once where the target has a fused multiply-add (CUDA; a CPU
//                    build for x86-64-v3, where __FMA__ is defined: gpu_ali3d/kernels.py cpu_flags), else
//                    rounded twice. Written out where the objective wants one, so every kernel that inlines the
//                    same helper rounds alike (compiler contraction picks its fusions per call site).
// Math: use the C functions (floor, sqrt, sin, cos, floorf, sqrtf, ...); on CUDA they are built in, on the CPU this
// header includes <math.h>. Never pass -use_fast_math: the CPU and GPU must compute the same answer. Fused
// multiply-add: off (--fmad=false) for every kernel file but the objective's (score.cu, align.cu), whose GPU
// results are compared with the CPU's at float tolerances, not bitwise (gpu_ali3d/kernels.py nvrtc_options); the
// host compiler never contracts (-ffp-contract=off), and the objective's fusions are explicit (fmadd).
#ifndef GPU_ALI3D_PORTABLE_CUH
#define GPU_ALI3D_PORTABLE_CUH

#if defined(__CUDACC__)
// ------------------------------------------------------------------------------------------------ CUDA
#define GPU_ALI3D_TARGET_CUDA 1
#define KERNEL extern "C" __global__
#define DEVICE __device__ inline
#define FOR_BLOCKS(i, n) for (long long i = blockIdx.x; i < (long long)(n); i += gridDim.x)
#define FOR_THREADS(k, n) for (long long k = threadIdx.x; k < (long long)(n); k += blockDim.x)
#define IS_LEADER (threadIdx.x == 0)
#define BLOCK_SHARED(T, name, n) __shared__ T name[n]
#define DYNAMIC_SHARED(T, name, n) \
    extern __shared__ __align__(16) unsigned char gpu_ali3d_dynamic_shared[]; \
    T *const name = reinterpret_cast<T *>(gpu_ali3d_dynamic_shared)
#define block_barrier() __syncthreads()
#define prefetch_write(p) ((void)0)

template <typename T>
__device__ inline T _warp_sum(T x) {
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xffffffffu, x, offset);
    return x;
}

template <typename T>
__device__ inline T _block_sum(T x) {
    __shared__ T partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
    x = _warp_sum(x);
    __syncthreads();                       // a previous call may still be reading partial[0]
    if (lane == 0) partial[warp] = x;
    __syncthreads();
    if (warp == 0) {
        x = lane < n_warps ? partial[lane] : T(0);
        x = _warp_sum(x);
        if (lane == 0) partial[0] = x;
    }
    __syncthreads();
    return partial[0];
}

DEVICE float block_sum(float x) { return _block_sum<float>(x); }
DEVICE double block_sum(double x) { return _block_sum<double>(x); }
DEVICE void atomic_add(float *p, float v) { atomicAdd(p, v); }
DEVICE void atomic_add(double *p, double v) { atomicAdd(p, v); }
DEVICE void sincos_f(float x, float *s, float *c) { sincosf(x, s, c); }
DEVICE float fmadd(float a, float b, float c) { return __fmaf_rn(a, b, c); }
DEVICE double fmadd(double a, double b, double c) { return __fma_rn(a, b, c); }

#else
// ------------------------------------------------------------------------------------------------ CPU (OpenMP)
#include <math.h>
#define GPU_ALI3D_TARGET_CPU 1
#define KERNEL extern "C"
#define DEVICE static inline
#define FOR_BLOCKS(i, n) \
    _Pragma("omp parallel for schedule(dynamic)") for (long long i = 0; i < (long long)(n); ++i)
#define FOR_THREADS(k, n) for (long long k = 0; k < (long long)(n); ++k)
#define IS_LEADER true
#define BLOCK_SHARED(T, name, n) T name[n]
#define DYNAMIC_SHARED(T, name, n) T name[n]
#define block_barrier() ((void)0)
#define prefetch_write(p) __builtin_prefetch((p), 1, 3)

DEVICE float block_sum(float x) { return x; }
DEVICE double block_sum(double x) { return x; }
DEVICE void atomic_add(float *p, float v) {
    _Pragma("omp atomic") *p += v;
}
DEVICE void atomic_add(double *p, double v) {
    _Pragma("omp atomic") *p += v;
}
DEVICE void sincos_f(float x, float *s, float *c) { *s = sinf(x); *c = cosf(x); }
#if defined(__FMA__)
DEVICE float fmadd(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
DEVICE double fmadd(double a, double b, double c) { return __builtin_fma(a, b, c); }
#else
DEVICE float fmadd(float a, float b, float c) { return a * b + c; }
DEVICE double fmadd(double a, double b, double c) { return a * b + c; }
#endif
#endif

// ------------------------------------------------------------------------------------------------ complex numbers
template <typename T>
struct alignas(2 * sizeof(T)) complex_t {
    T re, im;
};
typedef complex_t<float> cfloat;      // numpy complex64
typedef complex_t<double> cdouble;    // numpy complex128

template <typename T> DEVICE complex_t<T> cmake(T re, T im) { complex_t<T> z; z.re = re; z.im = im; return z; }
template <typename T> DEVICE complex_t<T> cadd(complex_t<T> a, complex_t<T> b) { return cmake(a.re + b.re, a.im + b.im); }
template <typename T> DEVICE complex_t<T> csub(complex_t<T> a, complex_t<T> b) { return cmake(a.re - b.re, a.im - b.im); }
template <typename T> DEVICE complex_t<T> cmul(complex_t<T> a, complex_t<T> b) {
    return cmake(a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re);
}
template <typename T> DEVICE complex_t<T> cconj(complex_t<T> a) { return cmake(a.re, -a.im); }
template <typename T> DEVICE complex_t<T> cscale(complex_t<T> a, T s) { return cmake(a.re * s, a.im * s); }
template <typename T> DEVICE T cabs2(complex_t<T> a) { return a.re * a.re + a.im * a.im; }

// ------------------------------------------------------------------------------------------------ rounding
// floor(x) as an integer, for |x| < 2^62: the same value as (long long)floor(x), without the library call that
// floor() is on a baseline x86-64 host build (a conversion and a compare instead).
DEVICE long long floor_ll(double x) {
    const long long i = (long long)x;      // truncates towards zero
    return i - (long long)(x < (double)i);
}

// rint(x) (round half to even) for |x| <= 2^51, without a library call: adding and subtracting 1.5 * 2^52 leaves
// x rounded to an integer in the default rounding mode; both operations are exact otherwise. The compilers keep
// the pair (no -ffast-math on either target).
DEVICE double rint_small(double x) {
    const double magic = 6755399441055744.0;   // 1.5 * 2^52
    return (x + magic) - magic;
}

#endif  // GPU_ALI3D_PORTABLE_CUH
