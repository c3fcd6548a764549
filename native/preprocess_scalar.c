/* The shared driver (tables, row cache, letterbox border) and the portable scalar kernels. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "preprocess.h"

static inline float pp_lerp(float a, float b, float w) { return a + (b - a) * w; }

/* Two plain selects: compilers turn these into maxss/minss (the nested form became unpredictable branches). */
static inline float pp_clamp255(float v) {
    v = v > 0.0f ? v : 0.0f;
    return v < 255.0f ? v : 255.0f;
}

static inline void pp_yuv_to_rgb(int y, int u, int v, float *r, float *g, float *b) {
    float yf = PP_CY * (float)(y - 16), uf = (float)(u - 128), vf = (float)(v - 128);
    *r = pp_clamp255(yf + PP_CVR * vf);
    *g = pp_clamp255(yf + PP_CUG * uf + PP_CVG * vf);
    *b = pp_clamp255(yf + PP_CUB * uf);
}

void pp_hpass_scalar_cols(const pp_job *job, const uint8_t *row, const uint8_t *uv, float *const planes[3], int i0,
                          int i1) {
    const int32_t *x0t = job->x0, *x1t = job->x1;
    const float *wxt = job->wx;
    switch (job->fmt) {
    case PP_RGB888:
    case PP_BGR888:
        for (int i = i0; i < i1; i++) {
            const uint8_t *p = row + 3 * (ptrdiff_t)x0t[i], *q = row + 3 * (ptrdiff_t)x1t[i];
            float w = wxt[i];
            planes[0][i] = pp_lerp(p[0], q[0], w);
            planes[1][i] = pp_lerp(p[1], q[1], w);
            planes[2][i] = pp_lerp(p[2], q[2], w);
        }
        break;
    case PP_GRAY8:
        for (int i = i0; i < i1; i++) planes[0][i] = pp_lerp(row[x0t[i]], row[x1t[i]], wxt[i]);
        break;
    case PP_YUYV:
        for (int i = i0; i < i1; i++) {
            int xa = x0t[i], xb = x1t[i];
            const uint8_t *pa = row + 4 * (ptrdiff_t)(xa >> 1), *pb = row + 4 * (ptrdiff_t)(xb >> 1);
            float ra, ga, ba, rb, gb, bb;
            pp_yuv_to_rgb(pa[(xa & 1) * 2], pa[1], pa[3], &ra, &ga, &ba);
            pp_yuv_to_rgb(pb[(xb & 1) * 2], pb[1], pb[3], &rb, &gb, &bb);
            float w = wxt[i];
            planes[0][i] = pp_lerp(ra, rb, w);
            planes[1][i] = pp_lerp(ga, gb, w);
            planes[2][i] = pp_lerp(ba, bb, w);
        }
        break;
    case PP_NV12:
        for (int i = i0; i < i1; i++) {
            int xa = x0t[i], xb = x1t[i];
            const uint8_t *ca = uv + (xa & ~1), *cb = uv + (xb & ~1);
            float ra, ga, ba, rb, gb, bb;
            pp_yuv_to_rgb(row[xa], ca[0], ca[1], &ra, &ga, &ba);
            pp_yuv_to_rgb(row[xb], cb[0], cb[1], &rb, &gb, &bb);
            float w = wxt[i];
            planes[0][i] = pp_lerp(ra, rb, w);
            planes[1][i] = pp_lerp(ga, gb, w);
            planes[2][i] = pp_lerp(ba, bb, w);
        }
        break;
    default:
        break;
    }
}

/* Round half to even (the default rounding mode) and saturate; NaN maps to the low bound rather than to UB. */
static inline int pp_quant(float v, float lo, float hi) {
    v = v >= lo ? v : lo;
    v = v <= hi ? v : hi;
    return (int)lrintf(v);
}

static inline void pp_store(const pp_job *job, size_t idx, float v) {
    switch (job->dtype) {
    case PP_F32:
        ((float *)job->out)[idx] = v;
        break;
    case PP_U8:
        ((uint8_t *)job->out)[idx] = (uint8_t)pp_quant(v, 0.0f, 255.0f);
        break;
    default:
        ((int8_t *)job->out)[idx] = (int8_t)pp_quant(v, -128.0f, 127.0f);
        break;
    }
}

void pp_vpass_scalar_cols(const pp_job *job, const float *const a[3], const float *const b[3], float wy, int r,
                          int i0, int i1) {
    const int C = job->channels, dt = job->dtype;
    const size_t oy = (size_t)(job->top + r), ox = (size_t)job->left;
    /* Element (c, i) of this row lives at base + c * cstep + i * istep in either layout. */
    size_t base, cstep, istep;
    if (job->layout == PP_NCHW) {
        base = oy * (size_t)job->out_w + ox;
        cstep = (size_t)job->out_h * (size_t)job->out_w;
        istep = 1;
    } else {
        base = (oy * (size_t)job->out_w + ox) * (size_t)C;
        cstep = 1;
        istep = (size_t)C;
    }
    const float lo = dt == PP_I8 ? -128.0f : 0.0f, hi = dt == PP_I8 ? 127.0f : 255.0f;
    for (int c = 0; c < C; c++) {
        const float al = job->alpha[c], be = job->beta[c], wa = wy * al;
        const float *pa = a[c], *pb = b[c];
        const size_t start = base + (size_t)c * cstep;
        if (dt == PP_F32) {
            float *o = (float *)job->out + start;
            for (int i = i0; i < i1; i++) o[(size_t)i * istep] = pa[i] * al + ((pb[i] - pa[i]) * wa + be);
        } else if (dt == PP_U8) {
            uint8_t *o = (uint8_t *)job->out + start;
            for (int i = i0; i < i1; i++)
                o[(size_t)i * istep] = (uint8_t)pp_quant(pa[i] * al + ((pb[i] - pa[i]) * wa + be), lo, hi);
        } else {
            int8_t *o = (int8_t *)job->out + start;
            for (int i = i0; i < i1; i++)
                o[(size_t)i * istep] = (int8_t)pp_quant(pa[i] * al + ((pb[i] - pa[i]) * wa + be), lo, hi);
        }
    }
}

static void pp_hpass_scalar(const pp_job *job, const uint8_t *row, const uint8_t *uv, float *const planes[3]) {
    pp_hpass_scalar_cols(job, row, uv, planes, 0, job->inner_w);
}

static void pp_vpass_scalar(const pp_job *job, const float *const a[3], const float *const b[3], float wy, int r) {
    pp_vpass_scalar_cols(job, a, b, wy, r, 0, job->inner_w);
}

const pp_kernels pp_kernels_scalar = {
    "scalar",
    {pp_hpass_scalar, pp_hpass_scalar, pp_hpass_scalar, pp_hpass_scalar, pp_hpass_scalar},
    pp_vpass_scalar,
    NULL,
};

/* Fill columns [x0, x1) of output row y with the letterbox value on every channel. */
static void pp_fill_span(const pp_job *job, int y, int x0, int x1) {
    const int C = job->channels;
    for (int c = 0; c < C; c++) {
        float v = job->fill * job->alpha[c] + job->beta[c];
        for (int x = x0; x < x1; x++) {
            size_t idx = job->layout == PP_NCHW
                             ? ((size_t)c * (size_t)job->out_h + (size_t)y) * (size_t)job->out_w + (size_t)x
                             : ((size_t)y * (size_t)job->out_w + (size_t)x) * (size_t)C + (size_t)c;
            pp_store(job, idx, v);
        }
    }
}

static void pp_fill_border(const pp_job *job) {
    for (int y = 0; y < job->out_h; y++) {
        if (y < job->top || y >= job->top + job->inner_h) {
            pp_fill_span(job, y, 0, job->out_w);
        } else {
            pp_fill_span(job, y, 0, job->left);
            pp_fill_span(job, y, job->left + job->inner_w, job->out_w);
        }
    }
}

/* Half-pixel-centre source coordinate, clamped exactly as OpenCV INTER_LINEAR does; double precision so the
 * tables equal the float64 reference's. */
static void pp_coord(int i, double scale, int n_in, int *c0, int *c1, double *w) {
    double s = ((double)i + 0.5) * scale - 0.5;
    if (s < 0.0) s = 0.0;
    int k = (int)s; /* s >= 0: truncation is floor */
    double f = s - (double)k;
    if (k >= n_in - 1) {
        k = n_in - 1;
        f = 0.0;
    }
    *c0 = k;
    *c1 = k + 1 < n_in ? k + 1 : n_in - 1;
    *w = f;
}

int pp_run(pp_job *job, const pp_kernels *k) {
    const size_t n = (size_t)job->inner_w;
    /* 32 spare floats per row buffer: room for the vector kernels' alignment and tails. */
    const size_t row_floats = n + 32;
    const size_t kbytes = (n + 8) / 8 * 8 * PP_KSCRATCH_PER_COL;
    /* Tables get PP_TABLE_PAD extra entries repeating the last column (weight 0), so vector kernels may run whole
     * groups past inner_w; row buffers have the same slack. */
    const size_t nt = n + PP_TABLE_PAD;
    const size_t bytes = 2 * nt * sizeof(int32_t) + nt * sizeof(float) + 9 * row_floats * sizeof(float) + kbytes + 64;
    unsigned char *mem = malloc(bytes);
    if (mem == NULL) return -1;
    int32_t *x0t = (int32_t *)mem, *x1t = x0t + nt;
    float *wxt = (float *)(x1t + nt);
    float *rows = wxt + nt;
    float *slot[2][3];
    for (int s = 0; s < 2; s++)
        for (int c = 0; c < 3; c++) slot[s][c] = rows + (size_t)(s * 3 + c) * row_floats;
    for (int c = 0; c < 3; c++) job->tmp[c] = rows + (size_t)(6 + c) * row_floats;
    uintptr_t k0 = (uintptr_t)(rows + 9 * row_floats);
    job->kscratch = (void *)((k0 + 31) & ~(uintptr_t)31);

    const double sx = (double)job->crop_w / (double)job->inner_w;
    for (size_t i = 0; i < n; i++) {
        int a, b;
        double w;
        pp_coord((int)i, sx, job->crop_w, &a, &b, &w);
        x0t[i] = a + job->crop_x;
        x1t[i] = b + job->crop_x;
        wxt[i] = (float)w;
    }
    for (size_t i = n; i < nt; i++) {
        x0t[i] = x0t[n - 1];
        x1t[i] = x1t[n - 1];
        wxt[i] = 0.0f;
    }
    job->x0 = x0t;
    job->x1 = x1t;
    job->wx = wxt;

    if (k->prepare != NULL) k->prepare(job);
    if (job->inner_h != job->out_h || job->inner_w != job->out_w) pp_fill_border(job);

    const pp_hpass_fn hpass = k->hpass[job->fmt];
    const double sy = (double)job->crop_h / (double)job->inner_h;
    int tag[2] = {-1, -1};
    for (int r = 0; r < job->inner_h; r++) {
        int y0, y1;
        double w;
        pp_coord(r, sy, job->crop_h, &y0, &y1, &w);
        y0 += job->crop_y;
        y1 += job->crop_y;
        /* A zero weight needs only one row: skips half the horizontal work for integer ratios. */
        if (w == 0.0) y1 = y0;
        int sa = tag[0] == y0 ? 0 : (tag[1] == y0 ? 1 : -1);
        int sb = tag[0] == y1 ? 0 : (tag[1] == y1 ? 1 : -1);
        int need[2] = {y0, y1}, *sl[2] = {&sa, &sb};
        for (int j = 0; j < 2; j++) {
            if (*sl[j] >= 0) continue;
            if (j == 1 && y1 == y0) {
                sb = sa;
                continue;
            }
            int other = j == 0 ? sb : sa;
            int s = other == 0 ? 1 : 0;
            int y = need[j];
            const uint8_t *row = job->src + (ptrdiff_t)y * job->stride;
            const uint8_t *uv = job->fmt == PP_NV12 ? job->src + (ptrdiff_t)(job->frame_h + y / 2) * job->stride : NULL;
            hpass(job, row, uv, slot[s]);
            tag[s] = y;
            *sl[j] = s;
        }
        const float *pa[3] = {slot[sa][0], slot[sa][1], slot[sa][2]};
        const float *pb[3] = {slot[sb][0], slot[sb][1], slot[sb][2]};
        if (job->swap_rb) {
            const float *t = pa[0];
            pa[0] = pa[2];
            pa[2] = t;
            t = pb[0];
            pb[0] = pb[2];
            pb[2] = t;
        }
        k->vpass(job, pa, pb, (float)w, r);
    }
    free(mem);
    return 0;
}
