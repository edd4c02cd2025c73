/* The journal's record framing in C: the hot part of every append.
 *
 * frame_into(buf, first_seq, kinds, payloads, max_payload) appends one frame per payload to
 * the bytearray ``buf``: crc32c u32 | payload length u32 | seq u64 | kind u8 | payload, little
 * endian, seqs counting up from ``first_seq``, the CRC covering everything after itself
 * (docs/journal.md). ``kinds`` holds one kind byte per payload, GROUP_END bits already set.
 * Returns the size of the last frame. A payload longer than ``max_payload`` is refused, and
 * then nothing is framed: a group stands or falls whole.
 *
 * Why C: in Python each record costs six calls (pack the header, join it to the payload, the
 * CRC, pack the CRC, two appends), about 0.19 us, which made framing two thirds of the
 * producer's time at 1,000 records per batch. Here the header and the copy are plain memory
 * writes. The CRC itself is still computed by the ``crc32c`` package, called once per record
 * over the frame in place, so there is one CRC32C implementation in the project. ``_log.py``
 * keeps the same function in Python (``_frame_into_py``), used where this extension is not
 * built; the tests check that both give the same bytes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define FRAME_SIZE 17 /* crc u32, length u32, seq u64, kind u8 */

/* The CRC is the module attribute ``crc32c`` (crc32c.crc32c, set at import), looked up once
 * per call, so that tests can watch or fail it. */
static PyObject *crc32c_name;

static void put_u32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static void put_u64(unsigned char *p, uint64_t v) {
    put_u32(p, (uint32_t)v);
    put_u32(p + 4, (uint32_t)(v >> 32));
}

/* The payloads' buffers, held while they are copied (a bytes object is read directly). */
typedef struct {
    const char *data;
    Py_ssize_t size;
} Piece;

static void release_views(Py_buffer *views, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        if (views[i].obj != NULL)
            PyBuffer_Release(&views[i]);
    }
}

static PyObject *frame_into(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "frame_into(buf, first_seq, kinds, payloads, max_payload) takes 5 arguments");
        return NULL;
    }
    PyObject *buf = args[0], *kinds = args[2], *payloads = args[3];
    if (!PyByteArray_CheckExact(buf)) {
        PyErr_SetString(PyExc_TypeError, "frame_into: buf must be a bytearray");
        return NULL;
    }
    unsigned long long first = PyLong_AsUnsignedLongLong(args[1]);
    if (first == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t max_payload = PyLong_AsSsize_t(args[4]);
    if (max_payload == -1 && PyErr_Occurred())
        return NULL;
    if (max_payload < 0 || (uint64_t)max_payload > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "frame_into: max_payload must be 0..2**32-1");
        return NULL;
    }
    if (!PyBytes_Check(kinds) && !PyByteArray_Check(kinds)) {
        PyErr_SetString(PyExc_TypeError, "frame_into: kinds must be bytes or a bytearray");
        return NULL;
    }
    PyObject *seq_fast = PySequence_Fast(payloads, "frame_into: payloads must be a sequence");
    if (seq_fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq_fast);
    Py_ssize_t nkinds = PyBytes_Check(kinds) ? PyBytes_GET_SIZE(kinds) : PyByteArray_GET_SIZE(kinds);
    if (n == 0 || nkinds != n) {
        Py_DECREF(seq_fast);
        PyErr_Format(PyExc_ValueError, "frame_into: %zd kinds for %zd payloads (at least one of each)", nkinds, n);
        return NULL;
    }
    PyObject *crc32c_fn = PyDict_GetItemWithError(PyModule_GetDict(module), crc32c_name); /* borrowed */
    if (crc32c_fn == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_AttributeError, "frame_into: the module has no crc32c");
        Py_DECREF(seq_fast);
        return NULL;
    }
    Py_INCREF(crc32c_fn); /* a test may replace the attribute while the call runs */
    PyObject **items = PySequence_Fast_ITEMS(seq_fast);
    Piece *pieces = PyMem_Malloc(sizeof(Piece) * (size_t)n);
    Py_buffer *views = PyMem_Calloc((size_t)n, sizeof(Py_buffer));
    PyObject *result = NULL;
    Py_ssize_t held = 0;
    Py_ssize_t start = -1; /* buf's size before, once it has been grown */
    if (pieces == NULL || views == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = items[i];
        if (PyBytes_CheckExact(item)) {
            pieces[i].data = PyBytes_AS_STRING(item);
            pieces[i].size = PyBytes_GET_SIZE(item);
        } else {
            if (PyObject_GetBuffer(item, &views[i], PyBUF_SIMPLE) < 0)
                goto done;
            held = i + 1;
            pieces[i].data = views[i].buf;
            pieces[i].size = views[i].len;
        }
        if (pieces[i].size > max_payload) {
            PyErr_Format(PyExc_ValueError, "a record of %zd bytes: recovery reads records of at most %zd bytes",
                         pieces[i].size, max_payload);
            goto done;
        }
        if (total > PY_SSIZE_T_MAX - FRAME_SIZE - pieces[i].size) {
            PyErr_NoMemory();
            goto done;
        }
        total += FRAME_SIZE + pieces[i].size;
    }
    if (first > UINT64_MAX - (unsigned long long)(n - 1)) {
        PyErr_SetString(PyExc_OverflowError, "frame_into: the seqs pass 2**64 - 1");
        goto done;
    }
    Py_ssize_t size_before = PyByteArray_GET_SIZE(buf);
    if (size_before > PY_SSIZE_T_MAX - total) {
        PyErr_NoMemory();
        goto done;
    }
    if (PyByteArray_Resize(buf, size_before + total) < 0) /* BufferError while buf is exported */
        goto done;
    start = size_before;
    const unsigned char *kind_bytes = (const unsigned char *)(
        PyBytes_Check(kinds) ? PyBytes_AS_STRING(kinds) : PyByteArray_AS_STRING(kinds));
    /* The frames are written first and checksummed after. No pointer into ``buf`` is kept
     * across the CRC call, and its size is checked again after it: crc32c releases the GIL for
     * a large record, and creating the memoryview may run the garbage collector. No other
     * thread resizes ``buf`` meanwhile: the journal frames into its buffer under its lock, or
     * into a bytearray of its own. */
    Py_ssize_t offset = start;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char *o = (unsigned char *)PyByteArray_AS_STRING(buf) + offset;
        put_u32(o + 4, (uint32_t)pieces[i].size);
        put_u64(o + 8, (uint64_t)(first + (unsigned long long)i));
        o[16] = kind_bytes[i];
        memcpy(o + FRAME_SIZE, pieces[i].data, (size_t)pieces[i].size);
        offset += FRAME_SIZE + pieces[i].size;
    }
    offset = start;
    Py_ssize_t last = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t size = FRAME_SIZE + pieces[i].size;
        if (PyByteArray_GET_SIZE(buf) < offset + size) {
            PyErr_SetString(PyExc_RuntimeError, "frame_into: the buffer was resized while it was framed");
            goto done;
        }
        PyObject *view = PyMemoryView_FromMemory(PyByteArray_AS_STRING(buf) + offset + 4, size - 4, PyBUF_READ);
        if (view == NULL)
            goto done;
        PyObject *crc = PyObject_CallOneArg(crc32c_fn, view);
        Py_DECREF(view);
        if (crc == NULL)
            goto done;
        unsigned long value = PyLong_AsUnsignedLong(crc);
        Py_DECREF(crc);
        if (value == (unsigned long)-1 && PyErr_Occurred())
            goto done;
        if (PyByteArray_GET_SIZE(buf) < offset + size) {
            PyErr_SetString(PyExc_RuntimeError, "frame_into: the buffer was resized while it was framed");
            goto done;
        }
        put_u32((unsigned char *)PyByteArray_AS_STRING(buf) + offset, (uint32_t)value);
        offset += size;
        last = size;
    }
    result = PyLong_FromSsize_t(last);
done:
    if (result == NULL && start >= 0 && PyByteArray_GET_SIZE(buf) >= start) {
        /* a failure after buf was grown (a CRC call that raised): take the frames back, so
         * that the journal's buffer never holds frames its seqs do not count */
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        if (PyByteArray_Resize(buf, start) < 0)
            PyErr_Clear();
        PyErr_Restore(type, value, traceback);
    }
    release_views(views, held);
    PyMem_Free(views);
    PyMem_Free(pieces);
    Py_DECREF(crc32c_fn);
    Py_DECREF(seq_fast);
    return result;
}

static PyMethodDef framing_methods[] = {
    {"frame_into", (PyCFunction)(void (*)(void))frame_into, METH_FASTCALL,
     "frame_into(buf, first_seq, kinds, payloads, max_payload) -> size of the last frame\n\n"
     "Append one journal frame per payload to the bytearray buf (see docs/journal.md)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef framing_module = {
    PyModuleDef_HEAD_INIT, "engine.journal._framing", "The journal's record framing in C.", -1, framing_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__framing(void) {
    crc32c_name = PyUnicode_InternFromString("crc32c");
    if (crc32c_name == NULL)
        return NULL;
    PyObject *package = PyImport_ImportModule("crc32c");
    if (package == NULL)
        return NULL;
    PyObject *crc = PyObject_GetAttrString(package, "crc32c");
    Py_DECREF(package);
    if (crc == NULL)
        return NULL;
    PyObject *module = PyModule_Create(&framing_module);
    if (module == NULL || PyModule_AddObject(module, "crc32c", crc) < 0) {
        Py_DECREF(crc);
        Py_XDECREF(module);
        return NULL;
    }
    return module;
}
