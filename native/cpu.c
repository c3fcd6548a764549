/* Run-time CPU feature probe: the wheel is built for the baseline ISA and picks its SIMD path when it loads. */
#include "preprocess.h"

unsigned pp_cpu_features(void) {
    unsigned f = 0;
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.1")) f |= PP_CPU_SSE41;
    /* The AVX2 kernels use FMA too; every AVX2 CPU shipped so far has it, but a hypervisor may mask it. */
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) f |= PP_CPU_AVX2;
#elif defined(__aarch64__)
    f |= PP_CPU_NEON; /* Advanced SIMD is mandatory in AArch64. */
#endif
    return f;
}
