/* edge._native: argument parsing and validation, buffer handling, GIL release and SIMD dispatch for the
 * preprocessing kernels (preprocess_*.c, which never see Python objects).
 *
 * Invariant: every argument is validated here before any kernel runs, so the kernels may trust pp_job (see
 * preprocess.h). Every Py_buffer taken is released on every path. The probed SIMD paths live in module state
 * (multi-phase init, no process-global state).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <string.h>

#include "preprocess.h"

/* Output values from which a call releases the GIL (about 30 us of kernel work on a Cortex-A72). */
#define EDGE_GIL_RELEASE_MIN_VALUES 16384u

/* Frame and output dimensions are capped so every byte offset a kernel computes fits comfortably in int32 (the
 * AVX2 gathers use 32-bit indices) and every size product fits in size_t. */
#define EDGE_MAX_DIM (1 << 20)
#define EDGE_MAX_ROW_BYTES (1 << 28)

typedef struct {
    const pp_kernels *paths[4]; /* supported on this CPU, best first; the last is always scalar */
    int npaths;
} native_state;

static native_state *get_state(PyObject *module) { return (native_state *)PyModule_GetState(module); }

/* The numeric format of a buffer item, with a native byte-order prefix stripped (numpy exports "f", "<f" or
 * "=f" depending on how the array was made). */
static const char *item_format(const Py_buffer *b) {
    const char *f = b->format ? b->format : "B";
    if (f[0] == '@' || f[0] == '=' || f[0] == '<') f++;
    return f;
}

static int check_src(const Py_buffer *b, int fmt, int *frame_h, int *frame_w) {
    if (b->itemsize != 1 || strcmp(item_format(b), "B") != 0) {
        PyErr_SetString(PyExc_TypeError, "src must be a uint8 buffer");
        return -1;
    }
    int bpp;
    switch (fmt) {
    case PP_RGB888:
    case PP_BGR888:
        bpp = 3;
        break;
    case PP_YUYV:
        bpp = 2;
        break;
    default:
        bpp = 1;
        break;
    }
    int ok;
    if (fmt == PP_GRAY8)
        ok = b->ndim == 2 || (b->ndim == 3 && b->shape[2] == 1);
    else if (fmt == PP_NV12)
        ok = b->ndim == 2;
    else
        ok = b->ndim == 3 && b->shape[2] == bpp;
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "src has the wrong number of dimensions or channels for pixel format %d", fmt);
        return -1;
    }
    if (b->shape == NULL || b->strides == NULL) {
        PyErr_SetString(PyExc_ValueError, "src must export its shape and strides");
        return -1;
    }
    Py_ssize_t rows = b->shape[0], w = b->shape[1];
    if (rows < 1 || w < 1 || rows > EDGE_MAX_DIM || w > EDGE_MAX_DIM) {
        PyErr_SetString(PyExc_ValueError, "src height and width must be between 1 and 2**20");
        return -1;
    }
    /* The kernels take a row stride only: pixels (and channels) inside a row must be packed. */
    if (b->strides[1] != bpp || (b->ndim == 3 && b->shape[2] > 1 && b->strides[2] != 1)) {
        PyErr_SetString(PyExc_ValueError, "src rows must be packed (pixel stride == bytes per pixel)");
        return -1;
    }
    if (b->strides[0] > EDGE_MAX_ROW_BYTES || b->strides[0] < -EDGE_MAX_ROW_BYTES) {
        PyErr_SetString(PyExc_ValueError, "src row stride is too large");
        return -1;
    }
    if ((fmt == PP_YUYV || fmt == PP_NV12) && (w % 2) != 0) {
        PyErr_SetString(PyExc_ValueError, "src width must be even for YUYV and NV12");
        return -1;
    }
    if (fmt == PP_NV12) {
        /* H * 3 / 2 rows with H even: exactly a multiple of 3 rows. */
        if (rows % 3 != 0) {
            PyErr_SetString(PyExc_ValueError, "NV12 src must have H*3/2 rows with H even");
            return -1;
        }
        rows = rows / 3 * 2;
    }
    *frame_h = (int)rows;
    *frame_w = (int)w;
    return 0;
}

static int check_out(const Py_buffer *b, int dtype, int layout, int channels, int *out_h, int *out_w) {
    static const char *const fmts[] = {"f", "B", "b"};
    static const Py_ssize_t sizes[] = {4, 1, 1};
    if (strcmp(item_format(b), fmts[dtype]) != 0 || b->itemsize != sizes[dtype]) {
        PyErr_SetString(PyExc_TypeError, "out has the wrong item type for dtype");
        return -1;
    }
    if (b->readonly) {
        PyErr_SetString(PyExc_ValueError, "out must be writable");
        return -1;
    }
    if (b->ndim != 4 || b->shape == NULL || !PyBuffer_IsContiguous(b, 'C')) {
        PyErr_SetString(PyExc_ValueError, "out must be a C-contiguous 4-d buffer");
        return -1;
    }
    const Py_ssize_t *s = b->shape;
    Py_ssize_t c = layout == PP_NCHW ? s[1] : s[3], h = layout == PP_NCHW ? s[2] : s[1],
               w = layout == PP_NCHW ? s[3] : s[2];
    if (s[0] != 1 || c != channels || h < 1 || w < 1 || h > EDGE_MAX_DIM || w > EDGE_MAX_DIM) {
        PyErr_SetString(PyExc_ValueError, "out has the wrong shape for the layout and pixel format");
        return -1;
    }
    *out_h = (int)h;
    *out_w = (int)w;
    return 0;
}

PyDoc_STRVAR(preprocess_doc,
             "preprocess(src, out, fmt, crop, inner, order, alpha, beta, fill, dtype, layout, path=None)\n--\n\n"
             "Resize, convert, normalise and quantise src into out (raw kernel entry; use\n"
             "edge.inference.preprocess.preprocess_image).\n\n"
             "src: uint8 buffer laid out for fmt (0 RGB888, 1 BGR888, 2 GRAY8, 3 YUYV, 4 NV12), rows may have any\n"
             "stride, pixels packed. out: C-contiguous writable 4-d buffer, (1,C,H,W) for layout 0 (NCHW) or\n"
             "(1,H,W,C) for layout 1, item type float32/uint8/int8 for dtype 0/1/2. crop: (x, y, w, h) in the frame.\n"
             "inner: (top, left, h, w) rectangle of out the crop is resized into (the rest gets fill). order: 0 RGB,\n"
             "1 BGR. alpha, beta: 3 floats per output channel, value = pixel * alpha + beta (quantisation folded in).\n"
             "fill: letterbox value in pixel units. path: 'avx2', 'sse4', 'neon', 'scalar' or None for the best.\n"
             "Returns None. The GIL is released while the kernel runs when the output has at least 16384 values.");

static PyObject *native_preprocess(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"src",   "out",  "fmt",   "crop",   "inner", "order", "alpha",
                             "beta",  "fill", "dtype", "layout", "path",  NULL};
    PyObject *src_obj, *out_obj;
    int fmt, order, dtype, layout;
    int cx, cy, cw, ch, it, il, ih, iw;
    float al[3], be[3], fill;
    const char *path = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOi(iiii)(iiii)i(fff)(fff)fii|z:preprocess", kwlist, &src_obj,
                                     &out_obj, &fmt, &cx, &cy, &cw, &ch, &it, &il, &ih, &iw, &order, &al[0], &al[1],
                                     &al[2], &be[0], &be[1], &be[2], &fill, &dtype, &layout, &path))
        return NULL;
    if (fmt < 0 || fmt >= PP_NFORMATS) return PyErr_Format(PyExc_ValueError, "fmt must be 0..4, got %d", fmt);
    if (dtype < PP_F32 || dtype > PP_I8) return PyErr_Format(PyExc_ValueError, "dtype must be 0..2, got %d", dtype);
    if (layout != PP_NCHW && layout != PP_NHWC)
        return PyErr_Format(PyExc_ValueError, "layout must be 0 or 1, got %d", layout);
    if (order != 0 && order != 1) return PyErr_Format(PyExc_ValueError, "order must be 0 or 1, got %d", order);
    for (int c = 0; c < 3; c++)
        if (!isfinite(al[c]) || !isfinite(be[c]))
            return PyErr_Format(PyExc_ValueError, "alpha and beta must be finite");
    if (!isfinite(fill)) return PyErr_Format(PyExc_ValueError, "fill must be finite");

    native_state *st = get_state(module);
    const pp_kernels *k = NULL;
    if (path == NULL) {
        k = st->paths[0];
    } else {
        for (int i = 0; i < st->npaths; i++)
            if (strcmp(st->paths[i]->name, path) == 0) k = st->paths[i];
        if (k == NULL) return PyErr_Format(PyExc_ValueError, "path '%s' is not supported on this CPU", path);
    }

    Py_buffer sb, ob;
    if (PyObject_GetBuffer(src_obj, &sb, PyBUF_RECORDS_RO) < 0) return NULL;
    if (PyObject_GetBuffer(out_obj, &ob, PyBUF_RECORDS) < 0) {
        PyBuffer_Release(&sb);
        return NULL;
    }
    PyObject *result = NULL;
    int frame_h, frame_w, out_h, out_w;
    const int channels = fmt == PP_GRAY8 ? 1 : 3;
    if (check_src(&sb, fmt, &frame_h, &frame_w) < 0) goto done;
    if (check_out(&ob, dtype, layout, channels, &out_h, &out_w) < 0) goto done;
    if (cx < 0 || cy < 0 || cw < 1 || ch < 1 || (long long)cx + cw > frame_w || (long long)cy + ch > frame_h) {
        PyErr_Format(PyExc_ValueError, "crop (%d, %d, %d, %d) does not lie inside the %dx%d frame", cx, cy, cw, ch,
                     frame_w, frame_h);
        goto done;
    }
    if (it < 0 || il < 0 || ih < 1 || iw < 1 || (long long)it + ih > out_h || (long long)il + iw > out_w) {
        PyErr_Format(PyExc_ValueError, "inner (%d, %d, %d, %d) does not lie inside the %dx%d output", it, il, ih, iw,
                     out_h, out_w);
        goto done;
    }

    pp_job job;
    memset(&job, 0, sizeof job);
    job.src = (const uint8_t *)sb.buf;
    job.stride = sb.strides[0];
    job.fmt = fmt;
    job.frame_w = frame_w;
    job.frame_h = frame_h;
    job.crop_x = cx;
    job.crop_y = cy;
    job.crop_w = cw;
    job.crop_h = ch;
    job.out = ob.buf;
    job.out_h = out_h;
    job.out_w = out_w;
    job.channels = channels;
    job.dtype = dtype;
    job.layout = layout;
    job.top = it;
    job.left = il;
    job.inner_h = ih;
    job.inner_w = iw;
    /* The horizontal pass emits BGR888 as B,G,R and everything else as R,G,B. */
    job.swap_rb = channels == 3 && ((fmt == PP_BGR888) != (order == 1));
    memcpy(job.alpha, al, sizeof al);
    memcpy(job.beta, be, sizeof be);
    job.fill = fill;

    int rc;
    /* Release the GIL only when the kernel runs long enough to repay it: getting the GIL back after a few
     * microseconds of work costs a wait behind whichever thread took it (measured: a 32x32 tensor took 6x
     * longer in the threaded pipeline when released). The cost of a call scales with the output size. */
    if ((size_t)out_h * (size_t)out_w * (size_t)channels >= EDGE_GIL_RELEASE_MIN_VALUES) {
        Py_BEGIN_ALLOW_THREADS
        rc = pp_run(&job, k);
        Py_END_ALLOW_THREADS
    } else {
        rc = pp_run(&job, k);
    }
    if (rc != 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&ob);
    PyBuffer_Release(&sb);
    return result;
}

PyDoc_STRVAR(simd_paths_doc, "simd_paths()\n--\n\nThe kernel paths this CPU supports, best first (e.g. "
                             "['avx2', 'sse4', 'scalar']).");

static PyObject *native_simd_paths(PyObject *module, PyObject *Py_UNUSED(ignored)) {
    native_state *st = get_state(module);
    PyObject *list = PyList_New(st->npaths);
    if (list == NULL) return NULL;
    for (int i = 0; i < st->npaths; i++) {
        PyObject *s = PyUnicode_FromString(st->paths[i]->name);
        if (s == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, s);
    }
    return list;
}

static PyMethodDef native_methods[] = {
    {"preprocess", (PyCFunction)(void (*)(void))native_preprocess, METH_VARARGS | METH_KEYWORDS, preprocess_doc},
    {"simd_paths", native_simd_paths, METH_NOARGS, simd_paths_doc},
    {NULL, NULL, 0, NULL},
};

static int native_exec(PyObject *module) {
    native_state *st = get_state(module);
    unsigned f = pp_cpu_features();
    st->npaths = 0;
#if defined(__x86_64__) || defined(__i386__)
    if (f & PP_CPU_AVX2) st->paths[st->npaths++] = &pp_kernels_avx2;
    if (f & PP_CPU_SSE41) st->paths[st->npaths++] = &pp_kernels_sse4;
#elif defined(__aarch64__)
    if (f & PP_CPU_NEON) st->paths[st->npaths++] = &pp_kernels_neon;
#endif
    (void)f; /* unused on other architectures */
    st->paths[st->npaths++] = &pp_kernels_scalar;
    return 0;
}

static PyModuleDef_Slot native_slots[] = {
    {Py_mod_exec, native_exec},
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "edge._native",
    .m_doc = "Preprocessing kernels of edge (C, with run-time SIMD dispatch).",
    .m_size = sizeof(native_state),
    .m_methods = native_methods,
    .m_slots = native_slots,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModuleDef_Init(&native_module); }
