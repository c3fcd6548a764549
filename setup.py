"""Build the C extension ``edge._native``; everything else is declared in pyproject.toml."""

import os

from setuptools import Extension, setup

SOURCES = [
    "native/edge_native.c",
    "native/cpu.c",
    "native/preprocess_scalar.c",
    "native/preprocess_x86.c",
    "native/preprocess_neon.c",
]

# The SIMD paths use per-function target attributes and a run-time CPU probe, so the baseline flags stay portable:
# one wheel runs on any x86-64 (or any AArch64) and picks its best path when it starts.
compile_args = ["-O3", "-std=c11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration", "-fno-math-errno"]
if os.environ.get("EDGE_NATIVE_DEBUG"):
    compile_args += ["-O0", "-g", "-fsanitize=address,undefined"]

setup(
    ext_modules=[
        Extension(
            "edge._native",
            sources=SOURCES,
            include_dirs=["native"],
            extra_compile_args=compile_args,
            extra_link_args=["-fsanitize=address,undefined"] if os.environ.get("EDGE_NATIVE_DEBUG") else [],
        )
    ],
)
