/* checkpointer._codec: the page encoder's cache phase for small batches, in one call.
 *
 * Why: a small epoch (a few pages) costs the numpy encoder some twenty array calls (zero
 * detection, the set-associative cache lookup, the LRU victims, the XOR, the stores), each a
 * few microseconds, and several times that on the agent's loop with cold caches: far more
 * than the work itself. This is the same work as PageEncoder._lookup_and_store plus the XOR
 * that follows it (checkpointer/codec.py), one page after the other; zstd and the payload
 * layout stay in Python (one call each).
 *
 * The cache (the caller holds the encoder's lock): keys[sets * ways] (EMPTY_KEY: a free
 * line), stamps[sets * ways] (0: never used; the batch's clock otherwise), data[sets * ways]
 * pages. A key's set is the Fibonacci hash of it, shifted by `shift` (one set: 0). The rules
 * are the numpy path's:
 *  - a hit keeps its line (stamped now); a non-zero hit goes XOR against the cached version,
 *    which is then replaced by the new one; a zero hit invalidates its line (its base on the
 *    replica becomes zeros: a stale version must never be a base again);
 *  - hits first, then the non-zero misses take their set's least recently used lines, never
 *    one stamped by this batch (a hit's, or an earlier miss's): a miss that finds none is
 *    simply not cached;
 *  - output: kinds[n] (0 ZERO, 1 RAW, 2 XOR) and, for the non-zero pages in key order, the
 *    page itself (RAW) or page ^ cached (XOR) in out; returns their count.
 * Keys must be sorted, unique and below EMPTY_KEY (checked here, before anything changes).
 *
 * assemble_pages: the last step of decode_batch for a small batch, once the batch is checked
 * (keys inside the layout, kinds, lengths) and its zstd frame decompressed: each page of out is
 * zeros (ZERO), the next data row (RAW), or the next data row ^ the committed page of its key
 * (XOR), read straight from the slot's memory (slots: (slot id, pages buffer, page count)). A
 * key outside the slots is a ValueError before anything is written (the caller checked them).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define PAGE 4096
#define EMPTY_KEY UINT64_MAX
#define GOLDEN 0x9E3779B97F4A7C15ULL
#define KIND_ZERO 0
#define KIND_RAW 1
#define KIND_XOR 2

static int get(PyObject *obj, Py_buffer *view, int writable, const char *what, Py_ssize_t at_least) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    if (view->len < at_least) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, at least %zd are needed", what, view->len, at_least);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int is_zero(const uint64_t *page) {
    uint64_t acc = 0;
    for (int i = 0; i < PAGE / 8; i++)
        acc |= page[i];
    return acc == 0;
}

static void xor_into(uint64_t *out, const uint64_t *a, const uint64_t *b) {
    for (int i = 0; i < PAGE / 8; i++)
        out[i] = a[i] ^ b[i];
}

static PyObject *encode_pages(PyObject *self, PyObject *args) {
    PyObject *keys_o, *pages_o, *ckeys_o, *cstamp_o, *cdata_o, *out_o, *kinds_o;
    unsigned long long clock, shift;
    Py_ssize_t ways, sets;
    if (!PyArg_ParseTuple(args, "OOOOOKnnKOO", &keys_o, &pages_o, &ckeys_o, &cstamp_o, &cdata_o, &clock,
                          &ways, &sets, &shift, &out_o, &kinds_o))
        return NULL;
    if (ways < 1 || sets < 1 || shift > 64) {
        PyErr_SetString(PyExc_ValueError, "ways and sets must be at least 1, shift at most 64");
        return NULL;
    }
    Py_buffer kb, pb, ckb, csb, cdb, ob, kdb;
    if (get(keys_o, &kb, 0, "keys", 0) < 0)
        return NULL;
    Py_ssize_t n = kb.len / 8;
    PyObject *result = NULL;
    if (get(pages_o, &pb, 0, "pages", n * PAGE) < 0) goto out0;
    Py_ssize_t lines = ways * sets;
    if (get(ckeys_o, &ckb, 1, "cache keys", lines * 8) < 0) goto out1;
    if (get(cstamp_o, &csb, 1, "cache stamps", lines * 8) < 0) goto out2;
    if (get(cdata_o, &cdb, 1, "cache data", lines * PAGE) < 0) goto out3;
    if (get(out_o, &ob, 1, "out", n * PAGE) < 0) goto out4;
    if (get(kinds_o, &kdb, 1, "kinds", n) < 0) goto out5;

    const uint64_t *keys = kb.buf;
    const uint8_t *pages = pb.buf;
    uint64_t *ckeys = ckb.buf, *cstamp = csb.buf;
    uint8_t *cdata = cdb.buf, *out = ob.buf, *kinds = kdb.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (keys[i] == EMPTY_KEY) {
            PyErr_SetString(PyExc_ValueError, "encode: page key 0xffffffffffffffff is reserved");
            goto done;
        }
        if (i && keys[i] <= keys[i - 1]) {
            PyErr_SetString(PyExc_ValueError, "encode: page keys must be sorted and unique");
            goto done;
        }
    }
    /* Pass 1: zero detection, and the hits (XOR now, into the page's place in out later). */
    Py_ssize_t *line_of = PyMem_Malloc((n ? n : 1) * sizeof(Py_ssize_t));
    if (line_of == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        const uint64_t key = keys[i];
        const Py_ssize_t set = sets == 1 ? 0 : (Py_ssize_t)((key * GOLDEN) >> shift);
        Py_ssize_t line = -1;
        for (Py_ssize_t w = 0; w < ways; w++)
            if (ckeys[set * ways + w] == key) {
                line = set * ways + w;
                break;
            }
        line_of[i] = line;
        int zero = is_zero((const uint64_t *)(pages + i * PAGE));
        kinds[i] = zero ? KIND_ZERO : (line >= 0 ? KIND_XOR : KIND_RAW);
        if (line >= 0) {
            if (zero) {
                ckeys[line] = EMPTY_KEY;
                cstamp[line] = 0;
            } else {
                cstamp[line] = clock;
            }
        }
    }
    /* Pass 2, in key order: out, the cache's new versions, and the misses' lines. */
    Py_ssize_t nz = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (kinds[i] == KIND_ZERO)
            continue;
        const uint8_t *page = pages + i * PAGE;
        uint8_t *dst = out + nz * PAGE;
        Py_ssize_t line = line_of[i];
        if (kinds[i] == KIND_XOR) {
            xor_into((uint64_t *)dst, (const uint64_t *)page, (const uint64_t *)(cdata + line * PAGE));
        } else {
            memcpy(dst, page, PAGE);
            const uint64_t key = keys[i];
            const Py_ssize_t set = sets == 1 ? 0 : (Py_ssize_t)((key * GOLDEN) >> shift);
            line = -1;
            uint64_t oldest = UINT64_MAX;
            for (Py_ssize_t w = 0; w < ways; w++) {
                const Py_ssize_t candidate = set * ways + w;
                if (cstamp[candidate] != clock && cstamp[candidate] < oldest) {
                    oldest = cstamp[candidate];
                    line = candidate;
                }
            }
            if (line >= 0) {
                ckeys[line] = key;
                cstamp[line] = clock;
            }
        }
        if (line >= 0)
            memcpy(cdata + line * PAGE, page, PAGE);
        nz++;
    }
    PyMem_Free(line_of);
    result = PyLong_FromSsize_t(nz);
done:
    PyBuffer_Release(&kdb);
out5:
    PyBuffer_Release(&ob);
out4:
    PyBuffer_Release(&cdb);
out3:
    PyBuffer_Release(&csb);
out2:
    PyBuffer_Release(&ckb);
out1:
    PyBuffer_Release(&pb);
out0:
    PyBuffer_Release(&kb);
    return result;
}

static PyObject *assemble_pages(PyObject *self, PyObject *args) {
    PyObject *keys_o, *kinds_o, *data_o, *out_o, *slots_o;
    unsigned int shift;
    unsigned long long mask;
    if (!PyArg_ParseTuple(args, "OOOOOIK", &keys_o, &kinds_o, &data_o, &out_o, &slots_o, &shift, &mask))
        return NULL;
    if (!PyTuple_Check(slots_o) || PyTuple_GET_SIZE(slots_o) > 64) {
        PyErr_SetString(PyExc_ValueError, "slots must be a tuple of at most 64 (slot, pages, count)");
        return NULL;
    }
    Py_ssize_t nslots = PyTuple_GET_SIZE(slots_o);
    Py_buffer kb, kdb, db, ob, sb[64];
    unsigned long long slot_ids[64];
    Py_ssize_t slot_pages[64];
    Py_ssize_t got = 0;
    PyObject *result = NULL;
    if (get(keys_o, &kb, 0, "keys", 0) < 0)
        return NULL;
    Py_ssize_t n = kb.len / 8;
    if (get(kinds_o, &kdb, 0, "kinds", n) < 0) goto k0;
    if (get(data_o, &db, 0, "data", 0) < 0) goto k1;
    if (get(out_o, &ob, 1, "out", n * PAGE) < 0) goto k2;
    for (; got < nslots; got++) {
        PyObject *item = PyTuple_GET_ITEM(slots_o, got);
        unsigned long long id;
        Py_ssize_t count;
        PyObject *pages;
        if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "KOn", &id, &pages, &count))
            goto k4;
        if (get(pages, &sb[got], 0, "slot pages", count * PAGE) < 0)
            goto k4;
        slot_ids[got] = id;
        slot_pages[got] = count;
    }
    const uint64_t *keys = kb.buf;
    const uint8_t *kinds = kdb.buf, *data = db.buf;
    uint8_t *out = ob.buf;
    Py_ssize_t rows = 0;
    for (Py_ssize_t i = 0; i < n; i++) {                /* check first: nothing is written on an error */
        if (kinds[i] > KIND_XOR) {
            PyErr_Format(PyExc_ValueError, "unknown page kind %d at index %zd", kinds[i], i);
            goto k4;
        }
        if (kinds[i] != KIND_ZERO)
            rows++;
        if (kinds[i] == KIND_XOR) {
            const unsigned long long slot = keys[i] >> shift, offset = keys[i] & mask;
            Py_ssize_t s = 0;
            while (s < nslots && slot_ids[s] != slot)
                s++;
            if (s == nslots || offset >= (unsigned long long)slot_pages[s]) {
                PyErr_Format(PyExc_ValueError, "page key %#llx is outside the slots", (unsigned long long)keys[i]);
                goto k4;
            }
        }
    }
    if (db.len < rows * PAGE) {
        PyErr_Format(PyExc_ValueError, "data holds %zd bytes for %zd non-zero pages", db.len, rows);
        goto k4;
    }
    rows = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint8_t *dst = out + i * PAGE;
        if (kinds[i] == KIND_ZERO) {
            memset(dst, 0, PAGE);
            continue;
        }
        const uint8_t *row = data + rows * PAGE;
        rows++;
        if (kinds[i] == KIND_RAW) {
            memcpy(dst, row, PAGE);
            continue;
        }
        const unsigned long long slot = keys[i] >> shift, offset = keys[i] & mask;
        Py_ssize_t s = 0;
        while (slot_ids[s] != slot)
            s++;
        xor_into((uint64_t *)dst, (const uint64_t *)row, (const uint64_t *)((const uint8_t *)sb[s].buf + offset * PAGE));
    }
    result = PyLong_FromSsize_t(rows);
k4:
    for (Py_ssize_t s = 0; s < got; s++)
        PyBuffer_Release(&sb[s]);
    PyBuffer_Release(&ob);
k2:
    PyBuffer_Release(&db);
k1:
    PyBuffer_Release(&kdb);
k0:
    PyBuffer_Release(&kb);
    return result;
}

static PyMethodDef methods[] = {
    {"assemble_pages", assemble_pages, METH_VARARGS,
     "assemble_pages(keys, kinds, data, out, slots, shift, mask) -> data rows used (see the module's comment)"},
    {"encode_pages", encode_pages, METH_VARARGS,
     "encode_pages(keys, pages, cache_keys, cache_stamps, cache_data, clock, ways, sets, shift, out, kinds)"
     " -> non-zero pages written to out (see the module's comment)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "checkpointer._codec",
                                    "The page encoder's cache phase for small batches (checkpointer/native/codec.c).",
                                    -1, methods};

PyMODINIT_FUNC PyInit__codec(void) { return PyModule_Create(&module); }
