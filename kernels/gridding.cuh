// gridding.cuh: Kaiser-Bessel / trilinear interpolation of a prepared reference, poses, shift phase: DEVICE
// functions shared by the kernels. The numpy reference is gpu_ali3d/gridding.py; every function here names the
// function it mirrors, and uses the same formula (float32 data, float64 where rounding would move a tap).
#ifndef GPU_ALI3D_GRIDDING_CUH
#define GPU_ALI3D_GRIDDING_CUH
#include "portable.cuh"

#define INTERP_KB 0
#define INTERP_TRILINEAR 1
// Largest tap count handled by the generic (run-time taps) interpolation.
#define MAX_TAPS 16

// The Kaiser-Bessel window of one axis, I0(beta sqrt(1 - (d / half)^2)) / I0(beta) for |d| < half = K / 2, from
// a table made by the host in float64 (kernels.kb_window_table, from gridding.kb_weights): table[i] = window at
// d = i * half / size, i = 0 .. size, rounded to float32, and linear interpolation between entries (largest error
// 8.5e-8 for size 4096 at SPARX's beta = 8.25, tests/test_kernels.py). Two table reads per tap lane instead of the
// Bessel series.
struct kb_window {
    const float *table;
    int size;
    float scale;        // size / (K / 2): table intervals per padded-grid sample (a product per tap, no division)
};

DEVICE kb_window make_kb_window(const float *table, int size, int width) {
    kb_window w;
    w.table = table;
    w.size = size;
    w.scale = (float)((double)size / (0.5 * width));
    return w;
}

// gridding.kb_weights: one axis's weight at distance d (padded-grid samples, float: tap_weights); 0 unless
// |d| < K/2. Float throughout: d carries one float rounding (tap_weights), a = |d| size / (K/2) one more, so the
// fraction f between table entries is off by up to ~3e-4 of an interval at size 4096: weight errors of a few
// 1e-7 of the window's peak, as if u had moved by ~1e-7 grid units (also where the window's edge cuts a tap:
// |d| = K/2 itself gives a = size exactly and weight 0 for K = 2..16, as the reference). Measured against the float64 reference (tests/test_kernels.py problems, M = 32..48):
// largest score difference 2.9e-8 (2.4e-8 with float64 distances), |P|^2 3.8e-7 relative (1.4e-7); the tests'
// tolerance is 1e-5.
DEVICE float kb_weight(const kb_window *w, float d) {
    const float a = fabsf(d) * w->scale;
    if (!(a < (float)w->size)) return 0.0f;
    const int i = (int)a;
    const float f = a - (float)i;
    return w->table[i] + f * (w->table[i + 1] - w->table[i]);
}

// The hat window of trilinear interpolation (gridding._interpolate, "trilinear"): max(0, 1 - |d|).
DEVICE float hat_weight(float d) {
    const float a = 1.0f - fabsf(d);
    return a > 0.0f ? a : 0.0f;
}

// Geometry of a reference cropped to |u_a| <= E (E = N/2: all of PreparedReference.data), complex64 (D, D, Dx),
// axes (z, y, x), D = 2E + 2h + 1, Dx = E + 1 + 2h: data[E + h + u_z, E + h + u_y, h + u_x] = F_pad(u_x, u_y, u_z).
// kernels.kernel_reference makes it (a slice of PreparedReference.data).
struct ref_layout {
    long long stride_z, stride_y, origin;    // element strides; flat index of u = (0, 0, 0)
};

DEVICE ref_layout make_ref_layout(int extent, int halo) {
    ref_layout g;
    const long long d = 2 * extent + 2 * halo + 1, dx = extent + 1 + 2 * halo;
    g.stride_y = dx;
    g.stride_z = d * dx;
    g.origin = (long long)(extent + halo) * g.stride_z + (long long)(extent + halo) * g.stride_y + halo;
    return g;
}

// The 3 * nt tap weights of a point, wt[a * NT + t] for axis a (x, y, z) and tap t, distance d = u_a - (j_a + t);
// KIND (INTERP_KB or INTERP_TRILINEAR) picks the window at compile time. The taps j (which voxels) come from u in
// float64 (interpolate), as the reference's; the distances are float: d0 = u_a - j_a, in [nt/2 - 1, nt/2), is
// rounded once per axis, and d0 - t is then exact for nt >= 4 (a multiple of d0's last-bit unit, |d0 - t| < nt/2).
template <int NT, int KIND>
DEVICE void tap_weights(int nt, const kb_window *w, const double *u, const long long *j, float *wt) {
    for (int a = 0; a < 3; ++a) {
        const float d0 = (float)(u[a] - (double)j[a]);
        for (int t = 0; t < nt; ++t) {
            const float d = d0 - (float)t;
            wt[a * NT + t] = KIND == INTERP_KB ? kb_weight(w, d) : hat_weight(d);
        }
    }
}

// gridding._interpolate at one point u = (ux, uy, uz) (padded-grid units, |u| <= N/2): separable interpolation
// with `taps` taps per axis (TAPS > 0 fixes it at compile time; TAPS = 0 reads `taps`, at most MAX_TAPS) of the
// window KIND (INTERP_KB, or INTERP_TRILINEAR's hat: interpolate_trilinear is its written-out form).
// A point with ux < 0 is replaced by -u and the result conjugated (Friedel). Taps of an axis: j = first + t,
// first = floor(u - taps/2) + 1, weight window(u - j); all are plain reads inside the halo. Contraction order
// x, then y, then z, as the reference's einsum.
template <int TAPS, int KIND>
DEVICE cfloat interpolate(const cfloat *data, ref_layout g, int taps, const kb_window *w,
                          double ux, double uy, double uz) {
    const int NT = TAPS > 0 ? TAPS : MAX_TAPS;
    const int nt = TAPS > 0 ? TAPS : taps;
    const bool flip = ux < 0.0;
    if (flip) { ux = -ux; uy = -uy; uz = -uz; }
    const double half = 0.5 * nt;
    const double u[3] = {ux, uy, uz};
    const long long jj[3] = {floor_ll(ux - half) + 1, floor_ll(uy - half) + 1, floor_ll(uz - half) + 1};
    const long long jx = jj[0], jy = jj[1], jz = jj[2];
    float wt[3 * NT];
    tap_weights<NT, KIND>(nt, w, u, jj, wt);
    const float *wx = wt, *wy = wt + NT, *wz = wt + 2 * NT;
    const cfloat *base = data + g.origin + jz * g.stride_z + jy * g.stride_y + jx;
    float re = 0.0f, im = 0.0f;
    for (int tz = 0; tz < nt; ++tz) {
        float yre = 0.0f, yim = 0.0f;
        for (int ty = 0; ty < nt; ++ty) {
            const cfloat *row = base + tz * g.stride_z + ty * g.stride_y;
            float xre = 0.0f, xim = 0.0f;
            for (int tx = 0; tx < nt; ++tx) {
                const cfloat v = row[tx];
                xre += wx[tx] * v.re;
                xim += wx[tx] * v.im;
            }
            yre += wy[ty] * xre;
            yim += wy[ty] * xim;
        }
        re += wz[tz] * yre;
        im += wz[tz] * yim;
    }
    return cmake(re, flip ? -im : im);
}

// interpolate<2> for the hat window (trilinear), written out: taps floor(u) and floor(u) + 1 with weights 1 - f and
// f, f = u - floor(u) rounded to float once (the generic form rounds 1 - |u - j| from double: the same weights
// to float rounding). Same contraction order (x, then y, then z); each two-tap sum w0 a + f b is one fmadd
// (rounded once where the target fuses).
DEVICE float lerp_taps(float w0, float a, float f, float b) { return fmadd(f, b, w0 * a); }

DEVICE cfloat interpolate_trilinear(const cfloat *data, ref_layout g, double ux, double uy, double uz) {
    const bool flip = ux < 0.0;
    if (flip) { ux = -ux; uy = -uy; uz = -uz; }
    const long long jx = floor_ll(ux), jy = floor_ll(uy), jz = floor_ll(uz);
    const float fx = (float)(ux - (double)jx), fy = (float)(uy - (double)jy), fz = (float)(uz - (double)jz);
    const float wx0 = 1.0f - fx, wy0 = 1.0f - fy, wz0 = 1.0f - fz;
    const cfloat *b = data + g.origin + jz * g.stride_z + jy * g.stride_y + jx;
    const cfloat *r00 = b, *r01 = b + g.stride_y, *r10 = b + g.stride_z, *r11 = b + g.stride_z + g.stride_y;
    const float x00re = lerp_taps(wx0, r00[0].re, fx, r00[1].re), x00im = lerp_taps(wx0, r00[0].im, fx, r00[1].im);
    const float x01re = lerp_taps(wx0, r01[0].re, fx, r01[1].re), x01im = lerp_taps(wx0, r01[0].im, fx, r01[1].im);
    const float x10re = lerp_taps(wx0, r10[0].re, fx, r10[1].re), x10im = lerp_taps(wx0, r10[0].im, fx, r10[1].im);
    const float x11re = lerp_taps(wx0, r11[0].re, fx, r11[1].re), x11im = lerp_taps(wx0, r11[0].im, fx, r11[1].im);
    const float y0re = lerp_taps(wy0, x00re, fy, x01re), y0im = lerp_taps(wy0, x00im, fy, x01im);
    const float y1re = lerp_taps(wy0, x10re, fy, x11re), y1im = lerp_taps(wy0, x10im, fy, x11im);
    const float re = lerp_taps(wz0, y0re, fz, y1re), im = lerp_taps(wz0, y0im, fz, y1im);
    return cmake(re, flip ? -im : im);
}

// Kaiser-Bessel interpolate<> with the common tap counts compiled in (K = 6 by default, 4, 8, 2), else generic.
DEVICE cfloat interpolate_kb(const cfloat *data, ref_layout g, int taps, const kb_window *w,
                             double ux, double uy, double uz) {
    switch (taps) {
        case 6: return interpolate<6, INTERP_KB>(data, g, taps, w, ux, uy, uz);
        case 4: return interpolate<4, INTERP_KB>(data, g, taps, w, ux, uy, uz);
        case 8: return interpolate<8, INTERP_KB>(data, g, taps, w, ux, uy, uz);
        case 2: return interpolate<2, INTERP_KB>(data, g, taps, w, ux, uy, uz);
        default: return interpolate<0, INTERP_KB>(data, g, taps, w, ux, uy, uz);
    }
}

// The interpolation of kind KIND at u: interpolate_kb (`taps` from the reference) or interpolate_trilinear
// (2 taps). The objective's kernels are specialised on KIND (one entry point each), so a trilinear kernel
// holds none of Kaiser-Bessel's code or registers.
template <int KIND>
DEVICE cfloat interpolate_kind(const cfloat *data, ref_layout g, int taps, const kb_window *w,
                               double ux, double uy, double uz) {
    if constexpr (KIND == INTERP_TRILINEAR) return interpolate_trilinear(data, g, ux, uy, uz);
    else return interpolate_kb(data, g, taps, w, ux, uy, uz);
}

// geometry.rotation_matrix: SPIDER/SPARX ZYZ angles (degrees) -> R, row-major r[3 i + j] = R[i, j].
// A projection samples the reference at R^T k: u_j = R[0, j] kx + R[1, j] ky.
DEVICE void rotation_zyz(double phi_deg, double theta_deg, double psi_deg, double *r) {
    const double d2r = 3.14159265358979323846 / 180.0;
    const double cf = cos(phi_deg * d2r), sf = sin(phi_deg * d2r);
    const double ct = cos(theta_deg * d2r), st = sin(theta_deg * d2r);
    const double cp = cos(psi_deg * d2r), sp = sin(psi_deg * d2r);
    r[0] = cp * ct * cf - sp * sf;   r[1] = cp * ct * sf + sp * cf;    r[2] = -cp * st;
    r[3] = -sp * ct * cf - cp * sf;  r[4] = -sp * ct * sf + cp * cf;   r[5] = sp * st;
    r[6] = st * cf;                  r[7] = st * sf;                   r[8] = ct;
}

// gridding._shift_phase: exp(+2 pi i (kx sx + ky sy) / N), given sx_n = sx / N and sy_n = sy / N (cycles per
// padded-grid unit). The phase in cycles is reduced to [-1/2, 1/2] in float64 before the float32 sincos.
DEVICE cfloat shift_phase(double kx, double ky, double sx_n, double sy_n) {
    double t = kx * sx_n + ky * sy_n;
    t -= floor(t + 0.5);
    float s, c;
    sincos_f((float)(6.283185307179586 * t), &s, &c);
    return cmake(c, s);
}

// The separable form of shift_phase for integer frequencies: exp(2 pi i (kx sx + ky sy) / N) =
// axis_phase(kx, sx_n) * axis_phase(ky, sy_n); each factor rounded as shift_phase rounds the whole phase.
DEVICE cfloat axis_phase(double k, double s_n) {
    return shift_phase(k, 0.0, s_n, 0.0);
}

#endif  // GPU_ALI3D_GRIDDING_CUH
