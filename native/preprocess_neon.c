/* NEON kernels (AArch64 Advanced SIMD, mandatory there: no target attributes, no probe beyond the architecture).
 *
 * The shape of the SSE4.1 path of preprocess_x86.c, so a board's figures compare with the same benchmark:
 * horizontal pass per group of 4 output columns: one scalar 64-bit load per column holds both taps (pixels x0 and
 * x0 + 1 of the source row; x1 is x0 + 1, or x0 with weight 0, so the byte past it never counts), byte-table
 * lookups driven by per-column controls built once per call (prepare_neon) extract each component of each tap as
 * 32-bit lanes, then float conversion (YUV -> RGB in float right there) and the blend. Where SSE4.1 needs pshufb
 * on two registers plus an unpack per component, vqtbl2q_u8 looks up the 32 bytes of all four words at once, so one
 * lookup yields one tap of one component for the 4 columns. NEON has no gathers; plain loads are what x86 uses too.
 * Vertical pass: vector blend, normalise, quantise (vcvtnq: round half to even) per 8 columns; NHWC with 3
 * channels interleaves in the store (vst3), where SSE4.1 falls back to scalar.
 *
 * Invariant: the arithmetic is the scalar kernels' operation for operation (separate multiply and add, never a
 * fused multiply-add; the same order), so the output equals the scalar path's bit for bit. Tails (columns past the
 * last whole group in the vertical pass) and frames too narrow for one 8-byte word per row use the scalar code.
 */
#include <string.h>

#include "preprocess.h"

#if defined(__aarch64__)
#include <arm_neon.h>

/* Per group of 4 output columns: byte indices into the 32-byte table {word 0, word 1, word 2, word 3} for
 * component c and tap t. Lane k (bytes 4k..4k+3) of idx[c][t] selects byte 8k + d into the lane's low byte and
 * 0xff (out of range: zero) into the three others, so the lookup is already the uint32 value. */
typedef struct {
    uint8_t idx[3][2][16];
} neon_grp;

/* Scratch layout (job->kscratch): neon_grp[ng], then off0[4 ng] (load offsets in the row: Y or packed pixels),
 * then off1[4 ng] (NV12: load offsets in the UV row). 24 + 8 bytes per column, within PP_KSCRATCH_PER_COL. */
#define NEON_GRP(job) ((const neon_grp *)(job)->kscratch)
#define NEON_OFF0(job, ng) ((const int32_t *)(const void *)(NEON_GRP(job) + (ng)))

static inline int imin_neon(int a, int b) { return a < b ? a : b; }

/* Tap positions inside a word; a position past the word belongs to a zero-weight tap, so any byte of it will do. */
static void put_tap(neon_grp *g, int k, int comp, int tap, int pos) {
    g->idx[comp][tap][4 * k] = (uint8_t)(8 * k + (pos > 7 ? 7 : pos));
}

/* The 8-byte words must fit in a row: frames narrower than this run the scalar kernels (kflags == 0). */
static const int neon_min_w[PP_NFORMATS] = {3, 3, 8, 4, 8};

static void prepare_neon(pp_job *job) {
    const int n = job->inner_w, ng = (n + 3) / 4, W = job->frame_w;
    neon_grp *grp = (neon_grp *)job->kscratch;
    int32_t *off0 = (int32_t *)(void *)(grp + ng), *off1 = off0 + 4 * ng;
    job->kflags = W >= neon_min_w[job->fmt];
    if (!job->kflags) return;
    memset(grp, 0xff, (size_t)ng * sizeof *grp);
    /* Columns up to 4 ng - 1 < inner_w + PP_TABLE_PAD exist in the tables (zero weight past inner_w). */
    for (int i = 0; i < 4 * ng; i++) {
        const int x = job->x0[i], p = x & 1, k = i & 3;
        neon_grp *g = grp + i / 4;
        /* Each load starts at the pixel's natural offset, moved back near the row end so that it stays inside. */
        int nat, o, d;
        switch (job->fmt) {
        case PP_RGB888:
        case PP_BGR888:
            nat = 3 * x, o = imin_neon(nat, 3 * W - 8), d = nat - o;
            off0[i] = o;
            for (int c = 0; c < 3; c++) put_tap(g, k, c, 0, d + c), put_tap(g, k, c, 1, d + c + 3);
            break;
        case PP_GRAY8:
            o = imin_neon(x, W - 8), d = x - o;
            off0[i] = o;
            put_tap(g, k, 0, 0, d), put_tap(g, k, 0, 1, d + 1);
            break;
        case PP_YUYV: /* word Y0 U Y1 V Y0' U' Y1' V' from pixel pair x >> 1; pixel x + 1 is Y1, or Y0' when x is odd */
            nat = 4 * (x >> 1), o = imin_neon(nat, 2 * W - 8), d = nat - o;
            off0[i] = o;
            put_tap(g, k, 0, 0, d + 2 * p), put_tap(g, k, 0, 1, d + 2 * p + 2);
            put_tap(g, k, 1, 0, d + 1), put_tap(g, k, 1, 1, d + 1 + 4 * p);
            put_tap(g, k, 2, 0, d + 3), put_tap(g, k, 2, 1, d + 3 + 4 * p);
            break;
        default: { /* NV12: a word of the Y row (component 0) and one of the UV row (components 1 and 2) */
            const int cx = x & ~1, yo = imin_neon(x, W - 8), co = imin_neon(cx, W - 8), dy = x - yo, dc = cx - co;
            off0[i] = yo;
            off1[i] = co;
            put_tap(g, k, 0, 0, dy), put_tap(g, k, 0, 1, dy + 1);
            put_tap(g, k, 1, 0, dc), put_tap(g, k, 1, 1, dc + 2 * p);
            put_tap(g, k, 2, 0, dc + 1), put_tap(g, k, 2, 1, dc + 1 + 2 * p);
            break;
        }
        }
    }
}

/* The words of 4 columns as one 32-byte lookup table. */
static inline uint8x16x2_t words4(const uint8_t *base, const int32_t *o) {
    uint8x16x2_t t;
    t.val[0] = vcombine_u8(vld1_u8(base + o[0]), vld1_u8(base + o[1]));
    t.val[1] = vcombine_u8(vld1_u8(base + o[2]), vld1_u8(base + o[3]));
    return t;
}

static inline float32x4_t tap4(uint8x16x2_t words, const neon_grp *g, int comp, int tap) {
    return vcvtq_f32_u32(vreinterpretq_u32_u8(vqtbl2q_u8(words, vld1q_u8(g->idx[comp][tap]))));
}

/* p0 + (p1 - p0) * w, as pp_lerp. */
static inline void lerp_store4(float *dst, float32x4_t p0, float32x4_t p1, float32x4_t w) {
    vst1q_f32(dst, vaddq_f32(p0, vmulq_f32(vsubq_f32(p1, p0), w)));
}

static inline float32x4_t clamp255_neon(float32x4_t v) {
    return vminq_f32(vmaxq_f32(v, vdupq_n_f32(0.0f)), vdupq_n_f32(255.0f));
}

/* pp_yuv_to_rgb for 4 pixels, in its order of operations. */
static inline void yuv2rgb4_neon(float32x4_t y, float32x4_t u, float32x4_t v, float32x4_t *r, float32x4_t *g,
                                 float32x4_t *b) {
    const float32x4_t yf = vmulq_f32(vdupq_n_f32(PP_CY), vsubq_f32(y, vdupq_n_f32(16.0f)));
    const float32x4_t uf = vsubq_f32(u, vdupq_n_f32(128.0f)), vf = vsubq_f32(v, vdupq_n_f32(128.0f));
    *r = clamp255_neon(vaddq_f32(yf, vmulq_f32(vdupq_n_f32(PP_CVR), vf)));
    *g = clamp255_neon(
        vaddq_f32(vaddq_f32(yf, vmulq_f32(vdupq_n_f32(PP_CUG), uf)), vmulq_f32(vdupq_n_f32(PP_CVG), vf)));
    *b = clamp255_neon(vaddq_f32(yf, vmulq_f32(vdupq_n_f32(PP_CUB), uf)));
}

static void hpass_neon(const pp_job *job, const uint8_t *row, const uint8_t *uv, float *const planes[3]) {
    if (!job->kflags) {
        pp_hpass_scalar_cols(job, row, uv, planes, 0, job->inner_w);
        return;
    }
    const int ng = (job->inner_w + 3) / 4, fmt = job->fmt;
    const neon_grp *g = NEON_GRP(job);
    const int32_t *off0 = NEON_OFF0(job, ng), *off1 = off0 + 4 * ng;
    /* Whole groups only: the row buffers and column tables have room past inner_w (see pp_run). */
    for (int i = 0; i < 4 * ng; i += 4, g++) {
        const uint8x16x2_t words = words4(row, off0 + i);
        const float32x4_t w = vld1q_f32(job->wx + i);
        if (fmt == PP_RGB888 || fmt == PP_BGR888 || fmt == PP_GRAY8) {
            const int nc = fmt == PP_GRAY8 ? 1 : 3;
            for (int c = 0; c < nc; c++) lerp_store4(planes[c] + i, tap4(words, g, c, 0), tap4(words, g, c, 1), w);
            continue;
        }
        const uint8x16x2_t cw = fmt == PP_NV12 ? words4(uv, off1 + i) : words;
        float32x4_t r0, g0, b0, r1, g1, b1;
        yuv2rgb4_neon(tap4(words, g, 0, 0), tap4(cw, g, 1, 0), tap4(cw, g, 2, 0), &r0, &g0, &b0);
        yuv2rgb4_neon(tap4(words, g, 0, 1), tap4(cw, g, 1, 1), tap4(cw, g, 2, 1), &r1, &g1, &b1);
        lerp_store4(planes[0] + i, r0, r1, w);
        lerp_store4(planes[1] + i, g0, g1, w);
        lerp_store4(planes[2] + i, b0, b1, w);
    }
}

/* pa * al + ((pb - pa) * wa + be), as pp_vpass_scalar_cols. */
static inline float32x4_t blend4(const float *pa, const float *pb, float32x4_t al, float32x4_t wa, float32x4_t be) {
    const float32x4_t va = vld1q_f32(pa), vb = vld1q_f32(pb);
    return vaddq_f32(vmulq_f32(va, al), vaddq_f32(vmulq_f32(vsubq_f32(vb, va), wa), be));
}

/* 8 values to 8 bytes (uint8, or int8's two's complement): clamp in float first (maxnm maps NaN to the low bound,
 * as pp_quant does), round half to even, then the saturating narrows cannot saturate. */
static inline uint8x8_t quant8(float32x4_t v0, float32x4_t v1, float32x4_t lo, float32x4_t hi, int dtype) {
    const int32x4_t q0 = vcvtnq_s32_f32(vminnmq_f32(vmaxnmq_f32(v0, lo), hi));
    const int32x4_t q1 = vcvtnq_s32_f32(vminnmq_f32(vmaxnmq_f32(v1, lo), hi));
    const int16x8_t w = vcombine_s16(vqmovn_s32(q0), vqmovn_s32(q1));
    return dtype == PP_U8 ? vqmovun_s16(w) : vreinterpret_u8_s8(vqmovn_s16(w));
}

static void vpass_neon(const pp_job *job, const float *const a[3], const float *const b[3], float wy, int r) {
    const int C = job->channels, n = job->inner_w, nv = n & ~7, dt = job->dtype;
    const float32x4_t lo = vdupq_n_f32(dt == PP_I8 ? -128.0f : 0.0f), hi = vdupq_n_f32(dt == PP_I8 ? 127.0f : 255.0f);
    const size_t oy = (size_t)(job->top + r);
    float32x4_t al[3], be[3], wa[3];
    for (int c = 0; c < C; c++) {
        al[c] = vdupq_n_f32(job->alpha[c]);
        be[c] = vdupq_n_f32(job->beta[c]);
        wa[c] = vdupq_n_f32(wy * job->alpha[c]);
    }
    if (job->layout == PP_NHWC && C == 3) {
        const size_t base = (oy * (size_t)job->out_w + (size_t)job->left) * 3;
        for (int i = 0; i < nv; i += 8) {
            float32x4_t v[3][2];
            for (int c = 0; c < 3; c++) {
                v[c][0] = blend4(a[c] + i, b[c] + i, al[c], wa[c], be[c]);
                v[c][1] = blend4(a[c] + i + 4, b[c] + i + 4, al[c], wa[c], be[c]);
            }
            if (dt == PP_F32) {
                float *o = (float *)job->out + base + 3 * (size_t)i;
                for (int h = 0; h < 2; h++) {
                    const float32x4x3_t t = {{v[0][h], v[1][h], v[2][h]}};
                    vst3q_f32(o + 12 * h, t);
                }
            } else {
                const uint8x8x3_t t = {{quant8(v[0][0], v[0][1], lo, hi, dt), quant8(v[1][0], v[1][1], lo, hi, dt),
                                        quant8(v[2][0], v[2][1], lo, hi, dt)}};
                vst3_u8((uint8_t *)job->out + base + 3 * (size_t)i, t);
            }
        }
    } else {
        /* NCHW, or a single channel (NHWC's row is then laid out as NCHW's). */
        for (int c = 0; c < C; c++) {
            const size_t base = job->layout == PP_NCHW
                                    ? ((size_t)c * (size_t)job->out_h + oy) * (size_t)job->out_w + (size_t)job->left
                                    : oy * (size_t)job->out_w + (size_t)job->left;
            for (int i = 0; i < nv; i += 8) {
                const float32x4_t v0 = blend4(a[c] + i, b[c] + i, al[c], wa[c], be[c]);
                const float32x4_t v1 = blend4(a[c] + i + 4, b[c] + i + 4, al[c], wa[c], be[c]);
                if (dt == PP_F32) {
                    float *o = (float *)job->out + base + (size_t)i;
                    vst1q_f32(o, v0);
                    vst1q_f32(o + 4, v1);
                } else {
                    vst1_u8((uint8_t *)job->out + base + (size_t)i, quant8(v0, v1, lo, hi, dt));
                }
            }
        }
    }
    pp_vpass_scalar_cols(job, a, b, wy, r, nv, n);
}

const pp_kernels pp_kernels_neon = {
    "neon",
    {hpass_neon, hpass_neon, hpass_neon, hpass_neon, hpass_neon},
    vpass_neon,
    prepare_neon,
};

#else

/* ISO C forbids an empty translation unit. */
typedef int pp_neon_unused;

#endif
