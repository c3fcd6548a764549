/* Image preprocessing kernels: pure C, no Python.h.
 *
 * One call maps a (cropped) camera frame to a model input tensor: bilinear resize with half-pixel centres
 * (OpenCV INTER_LINEAR / torch align_corners=False), YUV -> RGB (BT.601 limited range, OpenCV's fixed-point
 * constants) at the source pixels, per-channel normalisation folded into v = p * alpha + beta, optional
 * quantisation (round half to even, saturate), NCHW or NHWC, optional letterbox border.
 *
 * The driver (pp_run, preprocess_scalar.c) is shared by every instruction set: it builds the column tables once,
 * walks the output rows keeping a two-row cache of horizontally resized source rows keyed by source row, and calls
 * the two kernels of a pp_kernels table (horizontal pass per source row, vertical pass per output row). Each
 * instruction set (SSE4.1, AVX2, NEON) only provides a table.
 *
 * Invariants the caller (edge_native.c) guarantees before pp_run: every size is >= 1 and validated against the
 * source buffer; inner pixels are packed (pixel stride == bytes per pixel), so bytes [0, frame_w * bpp) of every
 * row in [0, rows) are readable; the crop lies inside the frame; the inner rectangle lies inside the output.
 * Kernels never read outside those bytes (vector loads that would cross a row end fall back to scalar code).
 */
#ifndef EDGE_PREPROCESS_H
#define EDGE_PREPROCESS_H

#include <stddef.h>
#include <stdint.h>

enum pp_format { PP_RGB888 = 0, PP_BGR888 = 1, PP_GRAY8 = 2, PP_YUYV = 3, PP_NV12 = 4, PP_NFORMATS = 5 };
enum pp_dtype { PP_F32 = 0, PP_U8 = 1, PP_I8 = 2 };
enum pp_layout { PP_NCHW = 0, PP_NHWC = 1 };

/* BT.601 limited range, OpenCV's constants as fractions of 2^20 (exact in float: < 2^24). */
#define PP_YUV_SHIFT_DIV (1.0f / 1048576.0f)
#define PP_CY (1220542.0f * PP_YUV_SHIFT_DIV)
#define PP_CUB (2116026.0f * PP_YUV_SHIFT_DIV)
#define PP_CUG (-409993.0f * PP_YUV_SHIFT_DIV)
#define PP_CVG (-852492.0f * PP_YUV_SHIFT_DIV)
#define PP_CVR (1673527.0f * PP_YUV_SHIFT_DIV)

typedef struct pp_job {
    /* Source: src points at pixel (0, 0); NV12's UV plane starts at row frame_h. stride may be negative. */
    const uint8_t *src;
    ptrdiff_t stride;
    int fmt;
    int frame_w, frame_h;
    int crop_x, crop_y, crop_w, crop_h;
    /* Output tensor (C-contiguous) and the inner rectangle the crop is resized into (letterbox). */
    void *out;
    int out_h, out_w, channels, dtype, layout;
    int top, left, inner_h, inner_w;
    int swap_rb;   /* the output wants the first and third planes of the horizontal pass exchanged */
    float alpha[3], beta[3]; /* per output channel, quantisation folded in */
    float fill;    /* letterbox border in pixel units */
    /* Per-call tables, filled by pp_run: absolute source columns and weights for each inner output column. */
    const int32_t *x0, *x1;
    const float *wx;
    float *tmp[3]; /* inner_w floats each: staging for interleaved (NHWC) stores */
    /* Per-call scratch for a kernel table's prepare(): PP_KSCRATCH_PER_COL bytes per inner column (rounded up to
     * whole groups of 8 columns), 32-byte aligned. */
    void *kscratch;
    int kflags; /* set by prepare(), read by that table's kernels */
} pp_job;

#define PP_KSCRATCH_PER_COL 96
/* Extra entries at the end of the column tables (see pp_run). */
#define PP_TABLE_PAD 16

/* Horizontal pass: one source row (row: Y or packed pixels; uv: NV12's UV row, else NULL) to inner_w floats per
 * plane. Planes are in source order (RGB888, YUV: R,G,B; BGR888: B,G,R; GRAY8: one). */
typedef void (*pp_hpass_fn)(const pp_job *job, const uint8_t *row, const uint8_t *uv, float *const planes[3]);
/* Vertical pass: blend two cached rows (planes already in output channel order), normalise, quantise, store inner
 * row r (0 <= r < inner_h). */
typedef void (*pp_vpass_fn)(const pp_job *job, const float *const a[3], const float *const b[3], float wy, int r);

/* Optional per-call preparation (after the column tables are built, before any pass): e.g. per-column shuffle
 * controls. NULL when a table needs none. */
typedef void (*pp_prepare_fn)(pp_job *job);

typedef struct pp_kernels {
    const char *name;
    pp_hpass_fn hpass[PP_NFORMATS];
    pp_vpass_fn vpass;
    pp_prepare_fn prepare;
} pp_kernels;

/* Run one job. Returns 0, or -1 if scratch memory could not be allocated (nothing written then). Safe without
 * the GIL. */
int pp_run(pp_job *job, const pp_kernels *k);

/* Scalar building blocks the SIMD paths use for their tails: columns [i0, i1). */
void pp_hpass_scalar_cols(const pp_job *job, const uint8_t *row, const uint8_t *uv, float *const planes[3], int i0,
                          int i1);
void pp_vpass_scalar_cols(const pp_job *job, const float *const a[3], const float *const b[3], float wy, int r,
                          int i0, int i1);

extern const pp_kernels pp_kernels_scalar;
#if defined(__x86_64__) || defined(__i386__)
extern const pp_kernels pp_kernels_sse4;
extern const pp_kernels pp_kernels_avx2;
#endif
#if defined(__aarch64__)
extern const pp_kernels pp_kernels_neon;
#endif

/* CPU features (cpu.c). */
enum { PP_CPU_SSE41 = 1u << 0, PP_CPU_AVX2 = 1u << 1, PP_CPU_NEON = 1u << 2 };
unsigned pp_cpu_features(void);

#endif
