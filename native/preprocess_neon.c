/* NEON kernels (AArch64). Placeholder translation unit: a later change adds pp_kernels_neon here, shaped like the
 * SSE4.1 path of preprocess_x86.c (scalar 64-bit loads, vqtbl1q_u8 where x86 uses pshufb with the same per-column
 * controls, vector arithmetic; NEON has no gathers), declares it in preprocess.h and registers it in
 * edge_native.c's native_exec behind PP_CPU_NEON. */
#include "preprocess.h"

#if defined(__aarch64__)
#include <arm_neon.h>
#endif

/* ISO C forbids an empty translation unit. */
typedef int pp_neon_placeholder;
