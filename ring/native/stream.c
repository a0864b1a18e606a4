/* ring._native.stream_slots: the stream device's checkpoint state, the part that runs in the pause.

   Why it exists: StreamDevice.device_state() runs while the guest is paused, and written with
   numpy (a mask over the slot table, a fancy index, the formatting) it cost 150 to 300 us for 50
   clients here, cold: about fifteen numpy calls. This is the same loop over the table's words
   and the same JSON text, in one call.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define MAX_FIELDS 16

/* `value` in decimal at `out` (at most 20 digits, no terminator); returns the digits written.
   (snprintf cost about 100 ns a field here: most of the call.) */
static size_t put_decimal(char *out, uint64_t value)
{
    char digits[20];
    size_t n = 0;
    do {
        digits[n++] = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    for (size_t i = 0; i < n; i++)
        out[i] = digits[n - 1 - i];
    return n;
}

PyDoc_STRVAR(stream_slots_doc,
"stream_slots(table, words_per_slot, state, generation, guest_generation, fields, names) -> str\n\n"
"The JSON objects, comma-separated, of every slot in use in `table` (a buffer of uint64 words,\n"
"words_per_slot per slot): its state word (a column index) is not 0 (CLOSED), or its generation\n"
"differs from its guest_generation. Each object is {\"<names[0]>\":<word fields[0]>,...,\"slot\":N},\n"
"as json.dumps writes it with separators (',', ':').");

static PyObject *stream_slots(PyObject *self, PyObject *args)
{
    Py_buffer table;
    Py_ssize_t per_slot;
    Py_ssize_t state, generation, guest_generation;
    PyObject *fields_arg, *names_arg;
    if (!PyArg_ParseTuple(args, "y*nnnnOO", &table, &per_slot, &state, &generation, &guest_generation,
                          &fields_arg, &names_arg))
        return NULL;
    PyObject *result = NULL, *fields = NULL, *names = NULL;
    char *text = NULL;
    Py_ssize_t columns[MAX_FIELDS];
    const char *labels[MAX_FIELDS];
    Py_ssize_t nfields = 0;
    if (!(fields = PySequence_Fast(fields_arg, "fields must be a sequence of column indices")) ||
        !(names = PySequence_Fast(names_arg, "names must be a sequence of str")))
        goto done;
    nfields = PySequence_Fast_GET_SIZE(fields);
    if (nfields > MAX_FIELDS || PySequence_Fast_GET_SIZE(names) != nfields || per_slot <= 0 ||
        state >= per_slot || generation >= per_slot || guest_generation >= per_slot ||
        state < 0 || generation < 0 || guest_generation < 0) {
        PyErr_Format(PyExc_ValueError, "at most %d fields, one name each, columns within a slot", MAX_FIELDS);
        goto done;
    }
    for (Py_ssize_t i = 0; i < nfields; i++) {
        columns[i] = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(fields, i));
        labels[i] = PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(names, i));
        if (PyErr_Occurred() || !labels[i])
            goto done;
        if (columns[i] < 0 || columns[i] >= per_slot || strlen(labels[i]) > 64) {
            PyErr_SetString(PyExc_ValueError, "a field's column is within a slot, its name at most 64 bytes");
            goto done;
        }
    }
    const uint64_t *words = table.buf;
    Py_ssize_t slots = table.len / (Py_ssize_t)sizeof(uint64_t) / per_slot;
    Py_ssize_t in_use = 0;
    for (Py_ssize_t s = 0; s < slots; s++) {
        const uint64_t *w = words + s * per_slot;
        in_use += w[state] != 0 || w[generation] != w[guest_generation];
    }
    /* per object: braces, quotes, colons and commas, each name, each value (20 digits at most) */
    size_t per_object = 16 + 30;
    for (Py_ssize_t i = 0; i < nfields; i++)
        per_object += strlen(labels[i]) + 24;
    size_t capacity = (size_t)in_use * per_object + 1;
    text = PyMem_Malloc(capacity);
    if (!text) {
        PyErr_NoMemory();
        goto done;
    }
    size_t at = 0, lengths[MAX_FIELDS];
    for (Py_ssize_t i = 0; i < nfields; i++)
        lengths[i] = strlen(labels[i]);
    for (Py_ssize_t s = 0; s < slots; s++) {
        const uint64_t *w = words + s * per_slot;
        if (!(w[state] != 0 || w[generation] != w[guest_generation]))
            continue;
        if (at)
            text[at++] = ',';
        text[at++] = '{';
        for (Py_ssize_t i = 0; i < nfields; i++) {
            text[at++] = '"';
            memcpy(text + at, labels[i], lengths[i]);
            at += lengths[i];
            text[at++] = '"';
            text[at++] = ':';
            at += put_decimal(text + at, w[columns[i]]);
            text[at++] = ',';
        }
        memcpy(text + at, "\"slot\":", 7);
        at += 7;
        at += put_decimal(text + at, (uint64_t)s);
        text[at++] = '}';
    }
    result = PyUnicode_FromStringAndSize(text, (Py_ssize_t)at);

done:
    PyMem_Free(text);
    Py_XDECREF(fields);
    Py_XDECREF(names);
    PyBuffer_Release(&table);
    return result;
}

static PyMethodDef stream_functions[] = {
    {"stream_slots", stream_slots, METH_VARARGS, stream_slots_doc},
    {NULL, NULL, 0, NULL},
};

int stream_register(PyObject *module)
{
    return PyModule_AddFunctions(module, stream_functions);
}
