/* x86 kernels: SSE4.1 and AVX2+FMA, enabled per function with target attributes so the file builds with the
 * portable baseline flags; edge_native.c only selects a table after pp_cpu_features() says the CPU has it.
 *
 * AVX2 horizontal pass: per output column one unaligned 64-bit load holds both taps; byte shuffles driven by
 * per-column controls (prepare_words) extract the components of 8 columns, which are converted to float (YUV -> RGB
 * in float right there) and blended with FMA. Plain loads beat vpgatherdd on Zen 3 by ~1.5x here.
 * SSE4.1: the same word scheme at 128 bits (scalar 64-bit loads, byte shuffles, vector arithmetic).
 * preprocess_neon.c uses this word scheme too, with its own preparation (prepare_neon: 32-byte tables of four words
 * looked up with vqtbl2q_u8, four columns at a time) rather than prepare_words, whose layout follows pshufb's
 * 16-byte lanes.
 */
#include <string.h>

#include "preprocess.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

/* ---------------------------------------------------------------- AVX2 */

#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static inline __m256 clamp255(__m256 v) {
    return _mm256_min_ps(_mm256_max_ps(v, _mm256_setzero_ps()), _mm256_set1_ps(255.0f));
}

AVX2 static inline void yuv2rgb8(__m256i y, __m256i u, __m256i v, __m256 *r, __m256 *g, __m256 *b) {
    /* The -16 / -128 offsets are folded into one constant per channel (exact enough: |error| < 1e-4). */
    const __m256 yf = _mm256_cvtepi32_ps(y), uf = _mm256_cvtepi32_ps(u), vf = _mm256_cvtepi32_ps(v);
    const __m256 cy = _mm256_set1_ps(PP_CY);
    *r = clamp255(_mm256_fmadd_ps(vf, _mm256_set1_ps(PP_CVR),
                                  _mm256_fmadd_ps(yf, cy, _mm256_set1_ps(-16.0f * PP_CY - 128.0f * PP_CVR))));
    *g = clamp255(_mm256_fmadd_ps(
        uf, _mm256_set1_ps(PP_CUG),
        _mm256_fmadd_ps(vf, _mm256_set1_ps(PP_CVG),
                        _mm256_fmadd_ps(yf, cy, _mm256_set1_ps(-16.0f * PP_CY - 128.0f * (PP_CUG + PP_CVG))))));
    *b = clamp255(_mm256_fmadd_ps(uf, _mm256_set1_ps(PP_CUB),
                                  _mm256_fmadd_ps(yf, cy, _mm256_set1_ps(-16.0f * PP_CY - 128.0f * PP_CUB))));
}

AVX2 static inline void lerp_store(float *dst, __m256 p0, __m256 p1, __m256 w) {
    _mm256_storeu_ps(dst, _mm256_fmadd_ps(_mm256_sub_ps(p1, p0), w, p0));
}

/* The AVX2 horizontal pass loads, per output column, one 64-bit word holding both taps (pixels x0 and x0 + 1; x1 is
 * x0 + 1, or x0 with weight 0, so the byte past it is never used for real). Words of a group of 8 columns go to
 * lo = columns 0,1,4,5 and hi = 2,3,6,7, so that for each component a pshufb per vector giving, per 128-bit lane
 * (columns a, b), the dwords [tap0 a, tap0 b, tap1 a, tap1 b] followed by unpack{lo,hi}_epi64 yields the taps of
 * columns 0..7 in order. prepare_words precomputes per column the load offset and those byte indices: they depend on
 * the format, on x0's parity (YUV chroma pairs) and, near the end of a row, on the load being moved back so that it
 * stays inside the row (no scalar tail). */
typedef struct {
    __m256i ctl[6]; /* components 0..2 for lo, then for hi */
} grp_ctl;

static void put_idx(grp_ctl *g, int k, int comp, int tap0, int tap1) {
    const int h = (k >> 1) & 1, lane = k >> 2, ab = k & 1;
    uint8_t *c = (uint8_t *)&g->ctl[3 * h + comp] + 16 * lane;
    tap0 = tap0 > 7 ? 7 : tap0; /* only for a zero-weight tap: any byte of this word will do */
    tap1 = tap1 > 7 ? 7 : tap1;
    c[4 * ab] = (uint8_t)(tap0 + 8 * ab);
    c[4 * (2 + ab)] = (uint8_t)(tap1 + 8 * ab);
}

static inline int imin(int a, int b) { return a < b ? a : b; }

/* NV12's Y row has one byte per pixel: when the 8 taps of 4 consecutive columns lie within 16 bytes (any upscale,
 * downscales up to ~4x), one 16-byte load per 4 columns and one pshufb per tap replace 8 word loads. */
typedef struct {
    __m256i ctl[2];  /* tap 0 and tap 1: dword k of lane h = column 4h + k */
    int32_t base[2]; /* load offset of each lane */
    int32_t fast;    /* both lanes fit */
    int32_t pad[5];
} ywin;

/* Scratch layout behind the controls: off0[8 ng], off1[8 ng], NV12 chroma-cache tag (32 bytes), 6 chroma-term
 * rows of 8 ng floats, ywin[ng]. */
#define KS_CTL(job) ((const grp_ctl *)(job)->kscratch)
#define KS_OFF0(job, ng) ((const int32_t *)(const void *)(KS_CTL(job) + (ng)))
#define NV12_TAG(job, ng) ((const uint8_t **)(void *)(KS_OFF0(job, ng) + 16 * (ng)))
#define NV12_TERMS(job, ng) ((float *)(void *)((uint8_t *)NV12_TAG(job, ng) + 32))
#define NV12_YWIN(job, ng) ((ywin *)(void *)(NV12_TERMS(job, ng) + 48 * (size_t)(ng)))

static void prepare_nv12_ywin(pp_job *job, int ng) {
    ywin *yw = NV12_YWIN(job, ng);
    const int W = job->frame_w;
    for (int g = 0; g < ng; g++) {
        memset(yw[g].ctl, 0x80, sizeof yw[g].ctl);
        yw[g].fast = W >= 16;
        for (int h = 0; h < 2 && yw[g].fast; h++) {
            const int c0 = 8 * g + 4 * h, base = imin(job->x0[c0], W - 16);
            yw[g].base[h] = base;
            if (job->x1[c0 + 3] - base > 15) yw[g].fast = 0;
            for (int k = 0; k < 4 && yw[g].fast; k++) {
                ((uint8_t *)&yw[g].ctl[0])[16 * h + 4 * k] = (uint8_t)(job->x0[c0 + k] - base);
                ((uint8_t *)&yw[g].ctl[1])[16 * h + 4 * k] = (uint8_t)(job->x1[c0 + k] - base);
            }
        }
    }
}

static void prepare_words(pp_job *job) {
    const int n = job->inner_w, ng = (n + 7) / 8, W = job->frame_w;
    grp_ctl *ctl = (grp_ctl *)job->kscratch;
    int32_t *off0 = (int32_t *)(void *)(ctl + ng), *off1 = off0 + 8 * ng;
    static const int min_w[PP_NFORMATS] = {3, 3, 8, 4, 8}; /* so that one 8-byte word fits in a row */
    job->kflags = W >= min_w[job->fmt];
    if (!job->kflags) return;
    *(const uint8_t **)(void *)(off1 + 8 * ng) = NULL; /* NV12 chroma cache: no UV row yet */
    memset(ctl, 0x80, (size_t)ng * sizeof *ctl);
    for (int i = 0; i < 8 * ng; i++) {
        const int x = job->x0[i], p = x & 1, k = i & 7;
        grp_ctl *g = ctl + i / 8;
        int nat, o, d;
        switch (job->fmt) {
        case PP_RGB888:
        case PP_BGR888:
            nat = 3 * x, o = imin(nat, 3 * W - 8), d = nat - o;
            off0[i] = o;
            put_idx(g, k, 0, d, d + 3), put_idx(g, k, 1, d + 1, d + 4), put_idx(g, k, 2, d + 2, d + 5);
            break;
        case PP_GRAY8:
            o = imin(x, W - 8), d = x - o;
            off0[i] = o;
            put_idx(g, k, 0, d, d + 1);
            break;
        case PP_YUYV: /* word: Y0 U Y1 V Y0' U' Y1' V' from pair x >> 1 */
            nat = 4 * (x >> 1), o = imin(nat, 2 * W - 8), d = nat - o;
            off0[i] = o;
            put_idx(g, k, 0, d + 2 * p, d + 2 * p + 2), put_idx(g, k, 1, d + 1, d + 1 + 4 * p),
                put_idx(g, k, 2, d + 3, d + 3 + 4 * p);
            break;
        default: { /* NV12: one word from the Y row (component 0), one from the UV row (components 1, 2) */
            const int yo = imin(x, W - 8), co = imin(x & ~1, W - 8), dy = x - yo, dc = (x & ~1) - co;
            off0[i] = yo;
            off1[i] = co;
            put_idx(g, k, 0, dy, dy + 1), put_idx(g, k, 1, dc, dc + 2 * p), put_idx(g, k, 2, dc + 1, dc + 1 + 2 * p);
            break;
        }
        }
    }
    if (job->fmt == PP_NV12) prepare_nv12_ywin(job, ng);
}

AVX2 static inline void taps(__m256i lo, __m256i hi, const grp_ctl *g, int comp, __m256i *t0, __m256i *t1) {
    __m256i a = _mm256_shuffle_epi8(lo, g->ctl[comp]), b = _mm256_shuffle_epi8(hi, g->ctl[3 + comp]);
    *t0 = _mm256_unpacklo_epi64(a, b);
    *t1 = _mm256_unpackhi_epi64(a, b);
}

/* movq + movhpd per 128-bit half: cheaper than the vpinsrq that _mm256_setr_epi64x compiles to. */
AVX2 static inline __m128i two_words(const uint8_t *p0, const uint8_t *p1) {
    return _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(_mm_loadl_epi64((const __m128i *)(const void *)p0)),
                                         (const double *)(const void *)p1));
}

#define WORDS(lo, hi, AT)                                                                                              \
    __m256i lo = _mm256_inserti128_si256(_mm256_castsi128_si256(two_words(AT(0), AT(1))), two_words(AT(4), AT(5)), 1); \
    __m256i hi = _mm256_inserti128_si256(_mm256_castsi128_si256(two_words(AT(2), AT(3))), two_words(AT(6), AT(7)), 1)

AVX2 static void hpass_rgb_avx2(const pp_job *job, const uint8_t *row, const uint8_t *uv, float *const planes[3]) {
    if (!job->kflags) {
        pp_hpass_scalar_cols(job, row, uv, planes, 0, job->inner_w);
        return;
    }
    const int ng = (job->inner_w + 7) / 8;
    const grp_ctl *g = KS_CTL(job);
    const int32_t *off = KS_OFF0(job, ng);
    const int nc = job->fmt == PP_GRAY8 ? 1 : 3;
    for (int i = 0; i < 8 * ng; i += 8, g++) {
        const int32_t *o = off + i;
#define AT(k) (row + o[k])
        WORDS(lo, hi, AT);
#undef AT
        __m256 w = _mm256_loadu_ps(job->wx + i);
        for (int c = 0; c < nc; c++) {
            __m256i t0, t1;
            taps(lo, hi, g, c, &t0, &t1);
            lerp_store(planes[c] + i, _mm256_cvtepi32_ps(t0), _mm256_cvtepi32_ps(t1), w);
        }
    }
}

AVX2 static inline void yuv_taps_store(__m256i lo, __m256i hi, const grp_ctl *g, __m256 w, float *const planes[3],
                                       int i) {
    __m256i y0, y1, u0, u1, v0, v1;
    taps(lo, hi, g, 0, &y0, &y1);
    taps(lo, hi, g, 1, &u0, &u1);
    taps(lo, hi, g, 2, &v0, &v1);
    __m256 r0, g0, b0, r1, g1, b1;
    yuv2rgb8(y0, u0, v0, &r0, &g0, &b0);
    yuv2rgb8(y1, u1, v1, &r1, &g1, &b1);
    lerp_store(planes[0] + i, r0, r1, w);
    lerp_store(planes[1] + i, g0, g1, w);
    lerp_store(planes[2] + i, b0, b1, w);
}

AVX2 static void hpass_yuyv_avx2(const pp_job *job, const uint8_t *row, const uint8_t *uv, float *const planes[3]) {
    if (!job->kflags) {
        pp_hpass_scalar_cols(job, row, uv, planes, 0, job->inner_w);
        return;
    }
    const int ng = (job->inner_w + 7) / 8;
    const grp_ctl *g = KS_CTL(job);
    const int32_t *off = KS_OFF0(job, ng);
    for (int i = 0; i < 8 * ng; i += 8, g++) {
        const int32_t *o = off + i;
#define AT(k) (row + o[k])
        WORDS(lo, hi, AT);
#undef AT
        yuv_taps_store(lo, hi, g, _mm256_loadu_ps(job->wx + i), planes, i);
    }
}

/* NV12: two consecutive source rows often share a UV row (about half of the calls for a 480 -> 224 downscale), so
 * the chroma terms of both taps (with every constant folded in) are kept per call, keyed by the UV row, behind the
 * column offsets; the Y pass then costs one FMA per channel and tap before the clamp. */

AVX2 static void nv12_chroma_avx2(const pp_job *job, const uint8_t *uv, int ng, float *terms) {
    const grp_ctl *g = KS_CTL(job);
    const int32_t *co = KS_OFF0(job, ng) + 8 * ng;
    const size_t stride = 8 * (size_t)ng;
    const __m256 kr = _mm256_set1_ps(-16.0f * PP_CY - 128.0f * PP_CVR),
                 kg = _mm256_set1_ps(-16.0f * PP_CY - 128.0f * (PP_CUG + PP_CVG)),
                 kb = _mm256_set1_ps(-16.0f * PP_CY - 128.0f * PP_CUB);
    for (int i = 0; i < 8 * ng; i += 8, g++) {
        const int32_t *o = co + i;
#define AT(k) (uv + o[k])
        WORDS(lo, hi, AT);
#undef AT
        __m256i u0, u1, v0, v1;
        taps(lo, hi, g, 1, &u0, &u1);
        taps(lo, hi, g, 2, &v0, &v1);
        const __m256 uf[2] = {_mm256_cvtepi32_ps(u0), _mm256_cvtepi32_ps(u1)};
        const __m256 vf[2] = {_mm256_cvtepi32_ps(v0), _mm256_cvtepi32_ps(v1)};
        for (int t = 0; t < 2; t++) {
            float *dst = terms + (size_t)(3 * t) * stride + (size_t)i;
            _mm256_storeu_ps(dst, _mm256_fmadd_ps(vf[t], _mm256_set1_ps(PP_CVR), kr));
            _mm256_storeu_ps(dst + stride, _mm256_fmadd_ps(uf[t], _mm256_set1_ps(PP_CUG),
                                                           _mm256_fmadd_ps(vf[t], _mm256_set1_ps(PP_CVG), kg)));
            _mm256_storeu_ps(dst + 2 * stride, _mm256_fmadd_ps(uf[t], _mm256_set1_ps(PP_CUB), kb));
        }
    }
}

AVX2 static void hpass_nv12_avx2(const pp_job *job, const uint8_t *row, const uint8_t *uv, float *const planes[3]) {
    if (!job->kflags) {
        pp_hpass_scalar_cols(job, row, uv, planes, 0, job->inner_w);
        return;
    }
    const int ng = (job->inner_w + 7) / 8;
    const uint8_t **tag = NV12_TAG(job, ng);
    float *terms = NV12_TERMS(job, ng);
    if (*tag != uv) {
        nv12_chroma_avx2(job, uv, ng, terms);
        *tag = uv;
    }
    const size_t stride = 8 * (size_t)ng;
    const grp_ctl *g = KS_CTL(job);
    const int32_t *off0 = KS_OFF0(job, ng);
    const ywin *yw = NV12_YWIN(job, ng);
    const __m256 cy = _mm256_set1_ps(PP_CY);
    for (int i = 0; i < 8 * ng; i += 8, g++) {
        __m256i y0, y1;
        const ywin *win = yw + i / 8;
        if (win->fast) {
            const __m256i v = _mm256_inserti128_si256(
                _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(const void *)(row + win->base[0]))),
                _mm_loadu_si128((const __m128i *)(const void *)(row + win->base[1])), 1);
            y0 = _mm256_shuffle_epi8(v, win->ctl[0]);
            y1 = _mm256_shuffle_epi8(v, win->ctl[1]);
        } else {
            const int32_t *yo = off0 + i;
#define AT(k) (row + yo[k])
            WORDS(lo, hi, AT);
#undef AT
            taps(lo, hi, g, 0, &y0, &y1);
        }
        const __m256 yf0 = _mm256_cvtepi32_ps(y0), yf1 = _mm256_cvtepi32_ps(y1);
        const __m256 w = _mm256_loadu_ps(job->wx + i);
        for (int c = 0; c < 3; c++) {
            const float *t = terms + (size_t)c * stride + (size_t)i;
            __m256 p0 = clamp255(_mm256_fmadd_ps(yf0, cy, _mm256_loadu_ps(t)));
            __m256 p1 = clamp255(_mm256_fmadd_ps(yf1, cy, _mm256_loadu_ps(t + 3 * stride)));
            lerp_store(planes[c] + i, p0, p1, w);
        }
    }
}

/* Saturating store of 8 values, already clamped to the type's range in float (so cvtps never overflows). */
AVX2 static inline void store8_q(void *dst, __m256 v, int dtype) {
    __m256i q = _mm256_cvtps_epi32(v); /* MXCSR default: round half to even */
    __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    __m128i b8 = dtype == PP_U8 ? _mm_packus_epi16(w16, w16) : _mm_packs_epi16(w16, w16);
    _mm_storel_epi64((__m128i *)dst, b8);
}

AVX2 static void vpass_avx2(const pp_job *job, const float *const a[3], const float *const b[3], float wy, int r) {
    const int C = job->channels, n = job->inner_w, nv = n & ~7;
    const int dt = job->dtype;
    const __m256 lo = _mm256_set1_ps(dt == PP_I8 ? -128.0f : 0.0f), hi = _mm256_set1_ps(dt == PP_I8 ? 127.0f : 255.0f);
    const size_t oy = (size_t)(job->top + r);
    for (int c = 0; c < C; c++) {
        const __m256 al = _mm256_set1_ps(job->alpha[c]), be = _mm256_set1_ps(job->beta[c]),
                     wa = _mm256_set1_ps(wy * job->alpha[c]);
        const float *pa = a[c], *pb = b[c];
        if (job->layout == PP_NHWC) {
            /* Interleaving happens below from planar staging rows. */
            float *t = job->tmp[c];
            for (int i = 0; i < nv; i += 8) {
                __m256 va = _mm256_loadu_ps(pa + i), vb = _mm256_loadu_ps(pb + i);
                _mm256_storeu_ps(t + i, _mm256_fmadd_ps(va, al, _mm256_fmadd_ps(_mm256_sub_ps(vb, va), wa, be)));
            }
            continue;
        }
        const size_t base = ((size_t)c * (size_t)job->out_h + oy) * (size_t)job->out_w + (size_t)job->left;
        if (dt == PP_F32) {
            float *o = (float *)job->out + base;
            for (int i = 0; i < nv; i += 8) {
                __m256 va = _mm256_loadu_ps(pa + i), vb = _mm256_loadu_ps(pb + i);
                _mm256_storeu_ps(o + i, _mm256_fmadd_ps(va, al, _mm256_fmadd_ps(_mm256_sub_ps(vb, va), wa, be)));
            }
        } else {
            uint8_t *o = (uint8_t *)job->out + base;
            int i = 0;
            /* 32 values per step: two saturating packs and one lane fix-up per 32 bytes stored. */
            const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            for (; i + 32 <= nv; i += 32) {
                __m256i q[4];
                for (int k = 0; k < 4; k++) {
                    __m256 va = _mm256_loadu_ps(pa + i + 8 * k), vb = _mm256_loadu_ps(pb + i + 8 * k);
                    __m256 v = _mm256_fmadd_ps(va, al, _mm256_fmadd_ps(_mm256_sub_ps(vb, va), wa, be));
                    q[k] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
                }
                __m256i w01 = _mm256_packs_epi32(q[0], q[1]), w23 = _mm256_packs_epi32(q[2], q[3]);
                __m256i b = dt == PP_U8 ? _mm256_packus_epi16(w01, w23) : _mm256_packs_epi16(w01, w23);
                _mm256_storeu_si256((__m256i *)(void *)(o + i), _mm256_permutevar8x32_epi32(b, order));
            }
            for (; i < nv; i += 8) {
                __m256 va = _mm256_loadu_ps(pa + i), vb = _mm256_loadu_ps(pb + i);
                __m256 v = _mm256_fmadd_ps(va, al, _mm256_fmadd_ps(_mm256_sub_ps(vb, va), wa, be));
                store8_q(o + i, _mm256_min_ps(_mm256_max_ps(v, lo), hi), dt);
            }
        }
    }
    if (job->layout == PP_NHWC) {
        const size_t base = (oy * (size_t)job->out_w + (size_t)job->left) * (size_t)C;
        if (dt == PP_F32) {
            float *o = (float *)job->out + base;
            for (int i = 0; i < nv; i++)
                for (int c = 0; c < C; c++) o[(size_t)i * (size_t)C + (size_t)c] = job->tmp[c][i];
        } else {
            const float flo = dt == PP_I8 ? -128.0f : 0.0f, fhi = dt == PP_I8 ? 127.0f : 255.0f;
            uint8_t *o = (uint8_t *)job->out + base;
            for (int i = 0; i < nv; i++)
                for (int c = 0; c < C; c++) {
                    float v = job->tmp[c][i];
                    if (!(v >= flo)) v = flo;
                    if (v > fhi) v = fhi;
                    int q = _mm_cvtss_si32(_mm_set_ss(v));
                    o[(size_t)i * (size_t)C + (size_t)c] = (uint8_t)q; /* int8: the two's complement byte */
                }
        }
    }
    pp_vpass_scalar_cols(job, a, b, wy, r, nv, n);
}

const pp_kernels pp_kernels_avx2 = {
    "avx2",
    {hpass_rgb_avx2, hpass_rgb_avx2, hpass_rgb_avx2, hpass_yuyv_avx2, hpass_nv12_avx2},
    vpass_avx2,
    prepare_words,
};

/* ---------------------------------------------------------------- SSE4.1 */

#define SSE4 __attribute__((target("sse4.1")))

/* The AVX2 word scheme at half width: 4 columns per step, lo = columns 0,1 and hi = 2,3; the controls are the
 * 128-bit lanes prepare_words built (lane 0 serves columns 0-3 of a group of 8, lane 1 columns 4-7). */
SSE4 static inline uint64_t load64_sse(const uint8_t *p) {
    uint64_t v;
    __builtin_memcpy(&v, p, 8);
    return v;
}

SSE4 static inline __m128i ctl_sse(const grp_ctl *g, int comp, int lane) {
    return _mm_load_si128((const __m128i *)(const void *)((const uint8_t *)&g->ctl[comp] + 16 * lane));
}

SSE4 static inline void taps_sse(__m128i lo, __m128i hi, const grp_ctl *g, int comp, int lane, __m128 *t0, __m128 *t1) {
    __m128i a = _mm_shuffle_epi8(lo, ctl_sse(g, comp, lane)), b = _mm_shuffle_epi8(hi, ctl_sse(g, 3 + comp, lane));
    *t0 = _mm_cvtepi32_ps(_mm_unpacklo_epi64(a, b));
    *t1 = _mm_cvtepi32_ps(_mm_unpackhi_epi64(a, b));
}

SSE4 static inline void lerp_store_sse(float *dst, __m128 p0, __m128 p1, __m128 w) {
    _mm_storeu_ps(dst, _mm_add_ps(p0, _mm_mul_ps(_mm_sub_ps(p1, p0), w)));
}

SSE4 static inline __m128 clamp255_sse(__m128 v) {
    return _mm_min_ps(_mm_max_ps(v, _mm_setzero_ps()), _mm_set1_ps(255.0f));
}

SSE4 static inline void yuv2rgb4(__m128 y, __m128 u, __m128 v, __m128 *r, __m128 *g, __m128 *b) {
    const __m128 yf = _mm_mul_ps(_mm_sub_ps(y, _mm_set1_ps(16.0f)), _mm_set1_ps(PP_CY));
    const __m128 uf = _mm_sub_ps(u, _mm_set1_ps(128.0f)), vf = _mm_sub_ps(v, _mm_set1_ps(128.0f));
    *r = clamp255_sse(_mm_add_ps(yf, _mm_mul_ps(vf, _mm_set1_ps(PP_CVR))));
    *g = clamp255_sse(
        _mm_add_ps(_mm_add_ps(yf, _mm_mul_ps(uf, _mm_set1_ps(PP_CUG))), _mm_mul_ps(vf, _mm_set1_ps(PP_CVG))));
    *b = clamp255_sse(_mm_add_ps(yf, _mm_mul_ps(uf, _mm_set1_ps(PP_CUB))));
}

SSE4 static void hpass_sse4(const pp_job *job, const uint8_t *row, const uint8_t *uv, float *const planes[3]) {
    if (!job->kflags) {
        pp_hpass_scalar_cols(job, row, uv, planes, 0, job->inner_w);
        return;
    }
    const int ng = (job->inner_w + 7) / 8, fmt = job->fmt;
    const grp_ctl *ctl = KS_CTL(job);
    const int32_t *off0 = KS_OFF0(job, ng), *off1 = off0 + 8 * ng;
    const int nc = fmt == PP_GRAY8 ? 1 : 3;
    const int cols = (job->inner_w + 3) & ~3;
    for (int i = 0; i < cols; i += 4) {
        const grp_ctl *g = ctl + i / 8;
        const int lane = (i / 4) & 1;
        const int32_t *o = off0 + i;
        __m128i lo = _mm_set_epi64x((long long)load64_sse(row + o[1]), (long long)load64_sse(row + o[0]));
        __m128i hi = _mm_set_epi64x((long long)load64_sse(row + o[3]), (long long)load64_sse(row + o[2]));
        const __m128 w = _mm_loadu_ps(job->wx + i);
        if (fmt == PP_RGB888 || fmt == PP_BGR888 || fmt == PP_GRAY8) {
            for (int c = 0; c < nc; c++) {
                __m128 t0, t1;
                taps_sse(lo, hi, g, c, lane, &t0, &t1);
                lerp_store_sse(planes[c] + i, t0, t1, w);
            }
            continue;
        }
        __m128 y0, y1, u0, u1, v0, v1;
        taps_sse(lo, hi, g, 0, lane, &y0, &y1);
        if (fmt == PP_NV12) {
            const int32_t *co = off1 + i;
            lo = _mm_set_epi64x((long long)load64_sse(uv + co[1]), (long long)load64_sse(uv + co[0]));
            hi = _mm_set_epi64x((long long)load64_sse(uv + co[3]), (long long)load64_sse(uv + co[2]));
        }
        taps_sse(lo, hi, g, 1, lane, &u0, &u1);
        taps_sse(lo, hi, g, 2, lane, &v0, &v1);
        __m128 r0, g0, b0, r1, g1, b1;
        yuv2rgb4(y0, u0, v0, &r0, &g0, &b0);
        yuv2rgb4(y1, u1, v1, &r1, &g1, &b1);
        lerp_store_sse(planes[0] + i, r0, r1, w);
        lerp_store_sse(planes[1] + i, g0, g1, w);
        lerp_store_sse(planes[2] + i, b0, b1, w);
    }
}

SSE4 static inline void store4_q(void *dst, __m128 v, int dtype) {
    __m128i q = _mm_cvtps_epi32(v);
    __m128i w16 = _mm_packs_epi32(q, q);
    __m128i b8 = dtype == PP_U8 ? _mm_packus_epi16(w16, w16) : _mm_packs_epi16(w16, w16);
    int32_t x = _mm_cvtsi128_si32(b8);
    __builtin_memcpy(dst, &x, 4);
}

SSE4 static void vpass_sse4(const pp_job *job, const float *const a[3], const float *const b[3], float wy, int r) {
    const int C = job->channels, n = job->inner_w;
    const int dt = job->dtype;
    if (job->layout == PP_NHWC) {
        pp_vpass_scalar_cols(job, a, b, wy, r, 0, n);
        return;
    }
    const int nv = n & ~3;
    const __m128 lo = _mm_set1_ps(dt == PP_I8 ? -128.0f : 0.0f), hi = _mm_set1_ps(dt == PP_I8 ? 127.0f : 255.0f);
    const size_t oy = (size_t)(job->top + r);
    for (int c = 0; c < C; c++) {
        const __m128 al = _mm_set1_ps(job->alpha[c]), be = _mm_set1_ps(job->beta[c]),
                     wa = _mm_set1_ps(wy * job->alpha[c]);
        const float *pa = a[c], *pb = b[c];
        const size_t base = ((size_t)c * (size_t)job->out_h + oy) * (size_t)job->out_w + (size_t)job->left;
        for (int i = 0; i < nv; i += 4) {
            __m128 va = _mm_loadu_ps(pa + i), vb = _mm_loadu_ps(pb + i);
            __m128 v = _mm_add_ps(_mm_mul_ps(va, al), _mm_add_ps(_mm_mul_ps(_mm_sub_ps(vb, va), wa), be));
            if (dt == PP_F32)
                _mm_storeu_ps((float *)job->out + base + (size_t)i, v);
            else
                store4_q((uint8_t *)job->out + base + (size_t)i, _mm_min_ps(_mm_max_ps(v, lo), hi), dt);
        }
    }
    pp_vpass_scalar_cols(job, a, b, wy, r, nv, n);
}

const pp_kernels pp_kernels_sse4 = {
    "sse4",
    {hpass_sse4, hpass_sse4, hpass_sse4, hpass_sse4, hpass_sse4},
    vpass_sse4,
    prepare_words,
};

#endif
