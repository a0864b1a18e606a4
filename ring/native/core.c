/* ring._native: the per-page work of a checkpoint's pause, in C, without the GIL.

   Why it exists: a stop-the-world checkpoint of a small epoch does a few dozen
   microseconds of real work (walk the rings, reset them, copy the pages), but
   the same work written as numpy calls costs 15 to 20 calls of 2 to 5 us each
   on this nested host, cold (see /tmp/profile-report.md, section 3). Here each
   phase is one call; Python keeps the policy (the reset's retry and re-arm
   rules in ring/dirty.py RingTracker._reset_all, the errors, the state
   machine) and this file does only the loops.

   What is hard about it, and where the rules come from (../shared/KVM-NOTES.md,
   ring/kvm.py's module notes):

   - harvest(): KVM publishes entries in order; userspace walks each ring from
     its free-running fetch index while flags has DIRTY, reads slot and offset,
     then writes RESET. No skipping: KVM's reset stops at the first entry
     without RESET. The flags load is an acquire and the RESET store a release
     (free on x86, which is TSO; right on anything else).
   - reset(): KVM_RESET_DIRTY_RINGS checks signal_pending() before every entry
     and stops early; a stopped walk also leaves a 64-page mask unprotected. So
     every blockable signal is blocked on this thread around the ioctl, and the
     thread's voluntary context switches are read just before and just after
     it: a stop (ptrace, SIGSTOP, the freezer) that a mask cannot hold off shows
     as a switch, and the caller re-arms. The GIL is released and taken back
     outside that window, so waiting for the GIL never looks like a stop.
   - Nothing here allocates per page or touches Python objects without the GIL. The GIL is
     released only around long work (see GIL_HARVEST_ENTRIES): inside a pause, taking it back
     can cost a switch interval.

   Page keys are ring/pages.py's: (slot << 40) | offset, slots below 2**16.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sched.h>
#include <time.h>

#define DIRTY_FLAG 1u
#define RESET_FLAG 2u
#define OFFSET_BITS 40
#define OFFSET_MASK ((1ull << OFFSET_BITS) - 1)
#define SLOT_LIMIT (1u << 16)
#define PAGE_SIZE 4096
#define EINTR_RETRIES 1000

/* The GIL: a call releases it only when its work is long enough to be worth it. Taking the GIL
   back waits for whichever thread holds it meanwhile, and a thread running Python (an epoch's
   encoder) gives it up only at its switch interval (5 ms by default): for a pause of a few
   hundred microseconds, releasing the GIL around 20 us of work costs more than it frees. */
#define GIL_HARVEST_ENTRIES 32768   /* ring entries to walk plus VMM pages to merge */
#define GIL_GATHER_PAGES 256        /* 1 MiB of memcpy, about 100 us here */
#define RELEASE_GIL_IF(condition) PyThreadState *saved_ = (condition) ? PyEval_SaveThread() : NULL
#define ACQUIRE_GIL() do { if (saved_) PyEval_RestoreThread(saved_); } while (0)

#define KVMIO 0xAE
#define KVM_RESET_DIRTY_RINGS _IO(KVMIO, 0xc7)
#define KVM_GET_MSRS _IOWR(KVMIO, 0x88, struct msrs_header)
#define MAX_CAPTURE_MSRS 64

struct dirty_gfn {          /* struct kvm_dirty_gfn */
    uint32_t flags;
    uint32_t slot;
    uint64_t offset;
};

struct msrs_header {        /* struct kvm_msrs, without its entries */
    uint32_t nmsrs;
    uint32_t pad;
};

struct msr_entry {          /* struct kvm_msr_entry */
    uint32_t index;
    uint32_t reserved;
    uint64_t data;
};

/* ---- sorting page keys ------------------------------------------------------------- */

static void insertion_sort(uint64_t *keys, size_t n)
{
    for (size_t i = 1; i < n; i++) {
        uint64_t key = keys[i];
        size_t j = i;
        while (j > 0 && keys[j - 1] > key) {
            keys[j] = keys[j - 1];
            j--;
        }
        keys[j] = key;
    }
}

/* LSD radix sort on bytes, skipping the bytes that are the same in every key (a 64 MiB guest's
   keys differ in about 2 of their 7 bytes). `scratch` holds n keys. Returns where the sorted keys
   are (keys or scratch). */
static uint64_t *radix_sort(uint64_t *keys, uint64_t *scratch, size_t n)
{
    uint64_t all_or = 0, all_and = ~0ull;
    for (size_t i = 0; i < n; i++) {
        all_or |= keys[i];
        all_and &= keys[i];
    }
    uint64_t varying = all_or ^ all_and;
    uint64_t *src = keys, *dst = scratch;
    for (int shift = 0; shift < 64; shift += 8) {
        if (!((varying >> shift) & 0xff))
            continue;
        size_t count[256] = {0};
        for (size_t i = 0; i < n; i++)
            count[(src[i] >> shift) & 0xff]++;
        size_t position = 0;
        for (int b = 0; b < 256; b++) {
            size_t c = count[b];
            count[b] = position;
            position += c;
        }
        for (size_t i = 0; i < n; i++)
            dst[count[(src[i] >> shift) & 0xff]++] = src[i];
        uint64_t *t = src;
        src = dst;
        dst = t;
    }
    return src;
}

/* Sort and deduplicate keys[0:n] into out (which may be keys); returns the unique count. */
static size_t sort_unique(uint64_t *keys, uint64_t *scratch, size_t n, uint64_t *out)
{
    if (n == 0)
        return 0;
    uint64_t *sorted = keys;
    if (n <= 48)
        insertion_sort(keys, n);
    else
        sorted = radix_sort(keys, scratch, n);
    size_t unique = 0;
    for (size_t i = 0; i < n; i++)
        if (unique == 0 || sorted[i] != out[unique - 1])
            out[unique++] = sorted[i];
    return unique;
}

/* ---- the loops every pause runs (shared by harvest, gather, reset and checkpoint) ----- */

struct vmm_range {
    uint64_t slot, first, end;
};

struct bad_entry {
    long long ring;                     /* -1: none */
    uint64_t slot, offset;
};

/* Walk each ring from its fetch index while flags has DIRTY, mark RESET, key the entries in
   bounds into out (the first out of bounds goes to bad), then add the VMM's pages. Returns the
   keys written (before dedup); counts[r] and last[r] say what each ring gave. */
static size_t walk_rings(Py_buffer *views, Py_ssize_t nrings, const uint64_t *starts, uint64_t entries,
                         const struct vmm_range *ranges, Py_ssize_t nranges, uint64_t *out, uint64_t *counts,
                         uint64_t (*last)[2], struct bad_entry *bad)
{
    size_t n = 0;
    uint64_t mask = entries - 1;
    bad->ring = -1;
    for (Py_ssize_t r = 0; r < nrings; r++) {
        struct dirty_gfn *ring = views[r].buf;
        uint64_t taken = 0;
        while (taken < entries) {
            struct dirty_gfn *e = &ring[(starts[r] + taken) & mask];
            if (!(__atomic_load_n(&e->flags, __ATOMIC_ACQUIRE) & DIRTY_FLAG))
                break;
            uint64_t slot = e->slot, offset = e->offset;
            __atomic_store_n(&e->flags, RESET_FLAG, __ATOMIC_RELEASE);
            last[r][0] = slot;
            last[r][1] = offset;
            taken++;
            if (slot >= SLOT_LIMIT || offset > OFFSET_MASK) {
                if (bad->ring < 0)
                    *bad = (struct bad_entry){r, slot, offset};
                continue;
            }
            out[n++] = (slot << OFFSET_BITS) | offset;
        }
        counts[r] = taken;
    }
    for (Py_ssize_t i = 0; i < nranges; i++) {
        uint64_t base = ranges[i].slot << OFFSET_BITS;
        for (uint64_t page = ranges[i].first; page < ranges[i].end; page++)
            out[n++] = base | page;
    }
    return n;
}

/* Copy the pages of the sorted keys k[0:n] into dst, a memcpy per run of consecutive pages.
   0, or 1 (a slot not given) / 2 (a page beyond its slot) with the key in *error_key. */
static int copy_pages(const uint64_t *k, size_t n, const uint64_t *slot_ids, const uint64_t *slot_pages,
                      const Py_buffer *memory, Py_ssize_t nslots, char *dst, uint64_t *error_key)
{
    size_t i = 0;
    while (i < n) {
        uint64_t slot = k[i] >> OFFSET_BITS, offset = k[i] & OFFSET_MASK;
        Py_ssize_t s = 0;
        while (s < nslots && slot_ids[s] != slot)
            s++;
        if (s == nslots || offset >= slot_pages[s]) {
            *error_key = k[i];
            return s == nslots ? 1 : 2;
        }
        size_t run = 1;
        while (i + run < n && k[i + run] == k[i] + run && offset + run < slot_pages[s])
            run++;
        memcpy(dst + i * PAGE_SIZE, (char *)memory[s].buf + offset * PAGE_SIZE, run * PAGE_SIZE);
        i += run;
    }
    return 0;
}

/* KVM_RESET_DIRTY_RINGS with every blockable signal blocked: the entries reset, or -errno;
   *switched says whether the thread made a voluntary context switch during the ioctl. */
static int reset_blocked(int fd, int *switched)
{
    sigset_t all, old;
    sigfillset(&all);
    struct rusage before, after;
    int result = -1, err = 0, mask_err = pthread_sigmask(SIG_BLOCK, &all, &old);
    *switched = 0;
    if (mask_err)
        return -mask_err;
    getrusage(RUSAGE_THREAD, &before);
    for (int tries = 0; tries < EINTR_RETRIES; tries++) {
        result = ioctl(fd, KVM_RESET_DIRTY_RINGS, 0);
        err = result < 0 ? errno : 0;
        if (result >= 0 || err != EINTR)
            break;
    }
    getrusage(RUSAGE_THREAD, &after);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    *switched = after.ru_nvcsw != before.ru_nvcsw;
    return result < 0 ? -err : result;
}

/* Argument parsing shared by the calls: a ring (a writable buffer of `entries` entries, and its
   fetch index), a VMM range (slot, first, end), a slot (id, its memory). 0, or -1 with an
   exception set and nothing held. */
static int get_ring(PyObject *ring, PyObject *fetch, Py_ssize_t entries, Py_ssize_t r, Py_buffer *view,
                    uint64_t *start)
{
    if (PyObject_GetBuffer(ring, view, PyBUF_WRITABLE) < 0)
        return -1;
    if (view->len < entries * (Py_ssize_t)sizeof(struct dirty_gfn)) {
        PyErr_Format(PyExc_ValueError, "ring %zd holds %zd bytes, less than %zd entries", r, view->len, entries);
        PyBuffer_Release(view);
        return -1;
    }
    *start = PyLong_AsUnsignedLongLong(fetch);
    if (PyErr_Occurred()) {
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int get_range(PyObject *item, struct vmm_range *range)
{
    unsigned long long slot, first, end;
    if (!PyArg_ParseTuple(item, "KKK;a VMM range is (slot, first, end)", &slot, &first, &end))
        return -1;
    if (slot >= SLOT_LIMIT || end > OFFSET_MASK + 1) {
        PyErr_Format(PyExc_ValueError, "VMM range (slot %llu, pages %llu to %llu) is beyond ring.pages' "
                     "bounds", slot, first, end);
        return -1;
    }
    *range = (struct vmm_range){slot, first, end > first ? end : first};
    return 0;
}

static int get_slot(PyObject *item, Py_buffer *memory, uint64_t *id, uint64_t *pages)
{
    unsigned long long slot;
    PyObject *buffer;
    if (!PyArg_ParseTuple(item, "KO;a slot is (slot, buffer)", &slot, &buffer) ||
        PyObject_GetBuffer(buffer, memory, PyBUF_SIMPLE) < 0)
        return -1;
    *id = slot;
    *pages = (uint64_t)memory->len / PAGE_SIZE;
    return 0;
}

/* ---- harvest ----------------------------------------------------------------------- */

/* harvest()'s answer: (keys trimmed to `unique`, counts, last, bad), or NULL with an exception. */
static PyObject *harvest_result(PyObject *keys, size_t unique, Py_ssize_t nrings, const uint64_t *counts,
                                uint64_t (*last)[2], const struct bad_entry *bad_at)
{
    if (PyByteArray_Resize(keys, (Py_ssize_t)(unique * sizeof(uint64_t))) < 0)
        return NULL;
    PyObject *count_tuple = PyTuple_New(nrings), *last_tuple = PyTuple_New(nrings);
    if (!count_tuple || !last_tuple) {
        Py_XDECREF(count_tuple);
        Py_XDECREF(last_tuple);
        return NULL;
    }
    for (Py_ssize_t r = 0; r < nrings; r++) {
        PyTuple_SET_ITEM(count_tuple, r, PyLong_FromUnsignedLongLong(counts[r]));
        if (counts[r])
            PyTuple_SET_ITEM(last_tuple, r, Py_BuildValue("(KK)", (unsigned long long)last[r][0],
                                                          (unsigned long long)last[r][1]));
        else
            PyTuple_SET_ITEM(last_tuple, r, Py_NewRef(Py_None));
    }
    PyObject *bad = bad_at->ring < 0 ? Py_NewRef(Py_None)
                                     : Py_BuildValue("(LKK)", bad_at->ring, (unsigned long long)bad_at->slot,
                                                     (unsigned long long)bad_at->offset);
    return Py_BuildValue("(ONNN)", keys, count_tuple, last_tuple, bad);
}


PyDoc_STRVAR(harvest_doc,
"harvest(rings, fetch, entries, vmm_ranges) -> (keys, counts, last, bad)\n\n"
"Walk every ring (writable buffers of `entries` kvm_dirty_gfn) from its fetch index while\n"
"flags has DIRTY, mark each entry RESET, then merge the pages of `vmm_ranges` (a sequence of\n"
"(slot, first page, end page)) and return the sorted unique page keys as a bytearray of\n"
"uint64, the entries taken from each ring, each ring's last (slot, offset) or None, and the\n"
"first entry whose slot or offset is beyond ring.pages' bounds as (ring, slot, offset), or\n"
"None. Entries beyond the bounds are marked RESET and counted, never keyed.\n"
"Call only with every vCPU out of KVM_RUN. Releases the GIL for large harvests only (see\n"
"GIL_HARVEST_ENTRIES).");

static PyObject *native_harvest(PyObject *self, PyObject *args)
{
    PyObject *rings_arg, *fetch_arg, *vmm_arg;
    Py_ssize_t entries;
    if (!PyArg_ParseTuple(args, "OOnO", &rings_arg, &fetch_arg, &entries, &vmm_arg))
        return NULL;
    if (entries <= 0 || (entries & (entries - 1))) {
        PyErr_Format(PyExc_ValueError, "ring entries must be a power of two, got %zd", entries);
        return NULL;
    }
    PyObject *rings = PySequence_Fast(rings_arg, "rings must be a sequence of buffers");
    if (!rings)
        return NULL;
    PyObject *fetch = PySequence_Fast(fetch_arg, "fetch must be a sequence of ints");
    PyObject *vmm = fetch ? PySequence_Fast(vmm_arg, "vmm_ranges must be a sequence of (slot, first, end)")
                          : NULL;
    Py_ssize_t nrings = PySequence_Fast_GET_SIZE(rings);
    Py_buffer *views = NULL;
    uint64_t *starts = NULL, *counts = NULL, *scratch = NULL;
    uint64_t (*last)[2] = NULL;
    struct vmm_range *ranges = NULL;
    PyObject *keys = NULL, *result = NULL;
    Py_ssize_t got_views = 0, nranges = 0;
    if (!vmm)
        goto done;
    if (PySequence_Fast_GET_SIZE(fetch) != nrings) {
        PyErr_SetString(PyExc_ValueError, "one fetch index per ring");
        goto done;
    }
    nranges = PySequence_Fast_GET_SIZE(vmm);
    views = PyMem_Calloc(nrings ? nrings : 1, sizeof(Py_buffer));
    starts = PyMem_Calloc(nrings ? nrings : 1, sizeof(uint64_t));
    counts = PyMem_Calloc(nrings ? nrings : 1, sizeof(uint64_t));
    last = PyMem_Calloc(nrings ? nrings : 1, sizeof(*last));
    ranges = PyMem_Calloc(nranges ? nranges : 1, sizeof(struct vmm_range));
    if (!views || !starts || !counts || !last || !ranges) {
        PyErr_NoMemory();
        goto done;
    }
    size_t capacity = 0;
    for (Py_ssize_t r = 0; r < nrings; r++) {
        if (get_ring(PySequence_Fast_GET_ITEM(rings, r), PySequence_Fast_GET_ITEM(fetch, r), entries, r,
                     &views[r], &starts[r]) < 0)
            goto done;
        got_views++;
        capacity += (size_t)entries;
    }
    for (Py_ssize_t i = 0; i < nranges; i++) {
        if (get_range(PySequence_Fast_GET_ITEM(vmm, i), &ranges[i]) < 0)
            goto done;
        capacity += ranges[i].end - ranges[i].first;
    }
    keys = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(capacity * sizeof(uint64_t)));
    if (!keys)
        goto done;
    scratch = PyMem_RawMalloc(capacity ? capacity * sizeof(uint64_t) : 8);
    if (!scratch) {
        PyErr_NoMemory();
        goto done;
    }
    uint64_t *out = (uint64_t *)PyByteArray_AS_STRING(keys);
    size_t unique;
    struct bad_entry bad_at;
    RELEASE_GIL_IF(capacity >= GIL_HARVEST_ENTRIES);
    size_t n = walk_rings(views, nrings, starts, (uint64_t)entries, ranges, nranges, out, counts, last, &bad_at);
    unique = sort_unique(out, scratch, n, out);
    ACQUIRE_GIL();
    result = harvest_result(keys, unique, nrings, counts, last, &bad_at);

done:
    for (Py_ssize_t r = 0; r < got_views; r++)
        PyBuffer_Release(&views[r]);
    PyMem_Free(views);
    PyMem_Free(starts);
    PyMem_Free(counts);
    PyMem_Free(last);
    PyMem_Free(ranges);
    PyMem_RawFree(scratch);
    Py_XDECREF(keys);
    Py_XDECREF(rings);
    Py_XDECREF(fetch);
    Py_XDECREF(vmm);
    return result;
}

PyDoc_STRVAR(sort_unique_doc,
"sort_unique(keys) -> bytearray\n\n"
"The sorted unique values of a buffer of uint64 page keys (the harvest's dedup, on its own).");

static PyObject *native_sort_unique(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    size_t n = (size_t)view.len / sizeof(uint64_t);
    PyObject *keys = PyByteArray_FromStringAndSize(view.buf, (Py_ssize_t)(n * sizeof(uint64_t)));
    uint64_t *scratch = keys ? PyMem_RawMalloc(n ? n * sizeof(uint64_t) : 8) : NULL;
    PyBuffer_Release(&view);
    if (!scratch) {
        Py_XDECREF(keys);
        return keys ? PyErr_NoMemory() : NULL;
    }
    uint64_t *out = (uint64_t *)PyByteArray_AS_STRING(keys);
    size_t unique;
    RELEASE_GIL_IF(n >= GIL_HARVEST_ENTRIES);
    unique = sort_unique(out, scratch, n, out);
    ACQUIRE_GIL();
    PyMem_RawFree(scratch);
    if (PyByteArray_Resize(keys, (Py_ssize_t)(unique * sizeof(uint64_t))) < 0) {
        Py_DECREF(keys);
        return NULL;
    }
    return keys;
}

/* ---- gather ------------------------------------------------------------------------ */

PyDoc_STRVAR(gather_doc,
"gather(keys, slots, out) -> pages\n\n"
"Copy the pages named by `keys` (a buffer of sorted uint64 page keys) into `out` (a writable\n"
"buffer of at least len(keys) pages), in key order. `slots` is a sequence of (slot, buffer)\n"
"pairs, each buffer a slot's memory. Runs of consecutive pages are copied with one memcpy.\n"
"IndexError for a page beyond its slot, KeyError for a slot not given. Releases the GIL from\n"
"GIL_GATHER_PAGES pages up.");

#define MAX_SLOTS 64

static PyObject *native_gather(PyObject *self, PyObject *args)
{
    PyObject *keys_arg, *slots_arg, *out_arg;
    if (!PyArg_ParseTuple(args, "OOO", &keys_arg, &slots_arg, &out_arg))
        return NULL;
    Py_buffer keys, out, memory[MAX_SLOTS];
    uint64_t slot_ids[MAX_SLOTS], slot_pages[MAX_SLOTS];
    Py_ssize_t nslots = 0, got = 0;
    PyObject *result = NULL;
    if (PyObject_GetBuffer(keys_arg, &keys, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(out_arg, &out, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&keys);
        return NULL;
    }
    PyObject *slots = PySequence_Fast(slots_arg, "slots must be a sequence of (slot, buffer)");
    if (!slots)
        goto done;
    nslots = PySequence_Fast_GET_SIZE(slots);
    if (nslots > MAX_SLOTS) {
        PyErr_Format(PyExc_ValueError, "at most %d slots", MAX_SLOTS);
        goto done;
    }
    for (Py_ssize_t i = 0; i < nslots; i++) {
        if (get_slot(PySequence_Fast_GET_ITEM(slots, i), &memory[i], &slot_ids[i], &slot_pages[i]) < 0)
            goto done;
        got++;
    }
    size_t n = (size_t)keys.len / sizeof(uint64_t);
    if ((size_t)out.len < n * PAGE_SIZE) {
        PyErr_Format(PyExc_ValueError, "out holds %zd bytes, %zu pages need %zu", out.len, n, n * PAGE_SIZE);
        goto done;
    }
    const uint64_t *k = keys.buf;
    char *dst = out.buf;
    int error;
    uint64_t error_key = 0;
    RELEASE_GIL_IF(n >= GIL_GATHER_PAGES);
    error = copy_pages(k, n, slot_ids, slot_pages, memory, nslots, dst, &error_key);
    ACQUIRE_GIL();
    char hex[24];
    snprintf(hex, sizeof(hex), "%#llx", (unsigned long long)error_key);   /* (PyErr_Format has no %llx) */
    if (error == 1)
        PyErr_Format(PyExc_KeyError, "page key %s names slot %llu, which is not given", hex,
                     (unsigned long long)(error_key >> OFFSET_BITS));
    else if (error == 2)
        PyErr_Format(PyExc_IndexError, "page key %s is beyond its slot (offset %llu)", hex,
                     (unsigned long long)(error_key & OFFSET_MASK));
    else
        result = PyLong_FromSize_t(n);

done:
    for (Py_ssize_t j = 0; j < got; j++)
        PyBuffer_Release(&memory[j]);
    Py_XDECREF(slots);
    PyBuffer_Release(&out);
    PyBuffer_Release(&keys);
    return result;
}

/* ---- reset ------------------------------------------------------------------------- */

PyDoc_STRVAR(reset_doc,
"reset_dirty_rings(vm_fd, release_gil=False) -> (reset, stopped)\n\n"
"KVM_RESET_DIRTY_RINGS with every blockable signal blocked on this thread: the entries\n"
"reset (short if the walk was cut short) and whether the thread made a voluntary context\n"
"switch during the ioctl (a stop that no mask holds off: ptrace, SIGSTOP, the freezer).\n"
"OSError with the errno on failure. With release_gil the GIL is released and taken back outside\n"
"the measured window, so that waiting for it never looks like a stop; by default it is held\n"
"(a reset of a small harvest takes a few microseconds).");

static PyObject *native_reset(PyObject *self, PyObject *args)
{
    int fd, release_gil = 0;
    if (!PyArg_ParseTuple(args, "i|p", &fd, &release_gil))
        return NULL;
    int result, switched;
    RELEASE_GIL_IF(release_gil);
    result = reset_blocked(fd, &switched);
    ACQUIRE_GIL();
    if (result < 0) {
        errno = -result;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return Py_BuildValue("(iO)", result, switched ? Py_True : Py_False);
}

/* ---- vCPU state -------------------------------------------------------------------- */

PyDoc_STRVAR(get_state_doc,
"get_state(vcpu_fd, xsave_request, xsave_size, msr_indices) -> (xsave, msr_values)\n\n"
"The two vCPU ioctls a checkpoint cannot avoid, back to back without the GIL: the XSAVE\n"
"area (`xsave_request` is KVM_GET_XSAVE or KVM_GET_XSAVE2, `xsave_size` its bytes) and\n"
"KVM_GET_MSRS of `msr_indices` (at most 64). OSError with the errno and the ioctl's name if\n"
"either fails; ValueError if KVM read fewer MSRs than asked. Holds the GIL (about 10 us).");

static PyObject *native_get_state(PyObject *self, PyObject *args)
{
    int fd;
    unsigned long xsave_request;
    Py_ssize_t xsave_size;
    PyObject *indices_arg;
    if (!PyArg_ParseTuple(args, "iknO", &fd, &xsave_request, &xsave_size, &indices_arg))
        return NULL;
    PyObject *indices = PySequence_Fast(indices_arg, "msr_indices must be a sequence of ints");
    if (!indices)
        return NULL;
    Py_ssize_t nmsrs = PySequence_Fast_GET_SIZE(indices);
    if (nmsrs > MAX_CAPTURE_MSRS || xsave_size <= 0) {
        Py_DECREF(indices);
        PyErr_Format(PyExc_ValueError, "at most %d MSRs and a positive XSAVE size", MAX_CAPTURE_MSRS);
        return NULL;
    }
    struct {
        struct msrs_header header;
        struct msr_entry entries[MAX_CAPTURE_MSRS];
    } msrs;
    memset(&msrs, 0, sizeof(msrs));
    msrs.header.nmsrs = (uint32_t)nmsrs;
    for (Py_ssize_t i = 0; i < nmsrs; i++) {
        msrs.entries[i].index = (uint32_t)PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(indices, i));
        if (PyErr_Occurred()) {
            Py_DECREF(indices);
            return NULL;
        }
    }
    Py_DECREF(indices);
    PyObject *xsave = PyBytes_FromStringAndSize(NULL, xsave_size);   /* filled before anyone sees it */
    if (!xsave)
        return NULL;
    char *area = PyBytes_AS_STRING(xsave);
    memset(area, 0, (size_t)xsave_size);
    int failed = 0, err = 0, done_msrs = 0;
    int r;                            /* (two ioctls of about 5 us: the GIL stays held) */
    for (int tries = 0; tries < EINTR_RETRIES; tries++) {
        r = ioctl(fd, xsave_request, area);
        if (r >= 0 || errno != EINTR)
            break;
    }
    if (r < 0) {
        failed = 1;
        err = errno;
    } else if (nmsrs) {
        for (int tries = 0; tries < EINTR_RETRIES; tries++) {
            r = ioctl(fd, KVM_GET_MSRS, &msrs);
            if (r >= 0 || errno != EINTR)
                break;
        }
        if (r < 0) {
            failed = 2;
            err = errno;
        } else {
            done_msrs = r;
        }
    }
    if (failed) {
        Py_DECREF(xsave);
        errno = err;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, failed == 1 ? "KVM_GET_XSAVE" : "KVM_GET_MSRS");
    }
    if (done_msrs != nmsrs) {
        Py_DECREF(xsave);
        PyErr_Format(PyExc_ValueError, "KVM_GET_MSRS read %d of %zd MSRs: MSR 0x%x was refused", done_msrs,
                     nmsrs, msrs.entries[done_msrs].index);
        return NULL;
    }
    PyObject *values = PyTuple_New(nmsrs);
    if (!values) {
        Py_DECREF(xsave);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nmsrs; i++)
        PyTuple_SET_ITEM(values, i, PyLong_FromUnsignedLongLong(msrs.entries[i].data));
    return Py_BuildValue("(NN)", xsave, values);
}

/* ---- the whole pause in one call ---------------------------------------------------- */

int gate_is(PyObject *object);                                      /* ring/native/gate.c */
int gate_stop_nogil(PyObject *object, uint32_t reason, int64_t timeout_ns);
void gate_go_nogil(PyObject *object, uint32_t reason);

#define MAX_CAPTURE_VCPUS 256
#define MAX_RINGS 256

struct capture_job {
    int fd;
    uint64_t sync_address;              /* kvm_run.s: regs, sregs, events (KVM_CAP_SYNC_REGS) */
    Py_ssize_t sync_size;
    unsigned long xsave_request;
    Py_ssize_t xsave_size;
    PyObject *sync, *xsave;             /* bytes, allocated with the GIL, filled without it */
    struct {
        struct msrs_header header;
        struct msr_entry entries[MAX_CAPTURE_MSRS];
    } msrs;
    int done_msrs;
};

static int64_t clock_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* The pausing thread runs SCHED_FIFO for the pause, where the process may (CAP_SYS_NICE): on a
   host with few cores, the agent's other threads and the replica would otherwise preempt it in
   the middle of the pause, while the guest waits. Tried once; EPERM turns it off for good. */
static int boost_state = 0;              /* 0: untried, 1: works, -1: not allowed */

static int boost_priority(void)
{
    if (boost_state < 0)
        return 0;
    struct sched_param param = {.sched_priority = 1};
    if (pthread_setschedparam(pthread_self(), SCHED_FIFO, &param) != 0) {
        boost_state = -1;
        return 0;
    }
    boost_state = 1;
    return 1;
}

static void restore_priority(void)
{
    struct sched_param param = {.sched_priority = 0};
    pthread_setschedparam(pthread_self(), SCHED_OTHER, &param);
}

PyDoc_STRVAR(checkpoint_doc,
"checkpoint(gate, reason, timeout, rings, fetch, entries, vmm_ranges, vm_fd, slots, out, vcpus,\n"
"           resume) -> (stopped, (keys, counts, last, bad), reset, switched, gathered, captures,\n"
"                       resumed, times)\n\n"
"A checkpoint's whole pause without the GIL: stop the gate (bit `reason`, `timeout` s), walk and\n"
"mark every ring and merge `vmm_ranges` (harvest()'s answer), one KVM_RESET_DIRTY_RINGS with signals\n"
"blocked (as reset_dirty_rings()), copy the pages into `out` (as gather()), read each vCPU of\n"
"`vcpus` ((fd, kvm_run.s address, its size, xsave request, xsave size, msr indices)): kvm_run.s\n"
"by memcpy, XSAVE and the MSRs by ioctl; then, if `resume` and every step was clean (the reset\n"
"reset every entry with no context switch, no entry out of bounds, the pages fit in `out`, the\n"
"ioctls succeeded), clear the stop bit. Otherwise the vCPUs stay stopped and the caller finishes\n"
"the pause its slower way (re-arm, a larger buffer, the errors). stopped False: the vCPUs did\n"
"not stop within the timeout, and nothing else was done. gathered is -1 and captures None for a\n"
"step not done. times: CLOCK_MONOTONIC nanoseconds (time.monotonic_ns) at the start and at the\n"
"end of stop, harvest and reset, gather, capture, and go.");

static PyObject *native_checkpoint(PyObject *self, PyObject *args)
{
    PyObject *gate, *rings_arg, *fetch_arg, *vmm_arg, *slots_arg, *out_arg, *vcpus_arg;
    unsigned int reason;
    double timeout;
    Py_ssize_t entries;
    int vm_fd, resume;
    if (!PyArg_ParseTuple(args, "OIdOOnOiOOOp", &gate, &reason, &timeout, &rings_arg, &fetch_arg, &entries,
                          &vmm_arg, &vm_fd, &slots_arg, &out_arg, &vcpus_arg, &resume))
        return NULL;
    if (!gate_is(gate)) {
        PyErr_SetString(PyExc_TypeError, "gate must be a ring._native.Gate");
        return NULL;
    }
    if (entries <= 0 || (entries & (entries - 1))) {
        PyErr_Format(PyExc_ValueError, "ring entries must be a power of two, got %zd", entries);
        return NULL;
    }
    PyObject *rings = NULL, *fetch = NULL, *vmm = NULL, *slots = NULL, *vcpus = NULL, *keys = NULL;
    PyObject *result = NULL;
    Py_buffer ring_views[MAX_RINGS], memory[MAX_SLOTS], out;
    uint64_t starts[MAX_RINGS], counts[MAX_RINGS], last[MAX_RINGS][2];
    uint64_t slot_ids[MAX_SLOTS], slot_pages[MAX_SLOTS];
    struct capture_job *jobs = NULL;
    struct vmm_range *ranges = NULL;
    uint64_t *scratch = NULL;
    Py_ssize_t nrings = 0, got_rings = 0, nslots = 0, got_slots = 0, nranges = 0, nvcpus = 0, got_jobs = 0;
    int got_out = 0;

    if (!(rings = PySequence_Fast(rings_arg, "rings must be a sequence of buffers")) ||
        !(fetch = PySequence_Fast(fetch_arg, "fetch must be a sequence of ints")) ||
        !(vmm = PySequence_Fast(vmm_arg, "vmm_ranges must be a sequence of (slot, first, end)")) ||
        !(slots = PySequence_Fast(slots_arg, "slots must be a sequence of (slot, buffer)")) ||
        !(vcpus = PySequence_Fast(vcpus_arg, "vcpus must be a sequence of capture tuples")))
        goto done;
    nrings = PySequence_Fast_GET_SIZE(rings);
    nslots = PySequence_Fast_GET_SIZE(slots);
    nranges = PySequence_Fast_GET_SIZE(vmm);
    nvcpus = PySequence_Fast_GET_SIZE(vcpus);
    if (nrings > MAX_RINGS || nslots > MAX_SLOTS || nvcpus > MAX_CAPTURE_VCPUS ||
        PySequence_Fast_GET_SIZE(fetch) != nrings) {
        PyErr_Format(PyExc_ValueError, "at most %d rings (one fetch index each), %d slots and %d vCPUs",
                     MAX_RINGS, MAX_SLOTS, MAX_CAPTURE_VCPUS);
        goto done;
    }
    size_t capacity = 0;
    for (Py_ssize_t r = 0; r < nrings; r++) {
        if (get_ring(PySequence_Fast_GET_ITEM(rings, r), PySequence_Fast_GET_ITEM(fetch, r), entries, r,
                     &ring_views[r], &starts[r]) < 0)
            goto done;
        got_rings++;
        counts[r] = 0;
        capacity += (size_t)entries;
    }
    ranges = PyMem_Calloc(nranges ? nranges : 1, sizeof(struct vmm_range));
    jobs = PyMem_Calloc(nvcpus ? nvcpus : 1, sizeof(struct capture_job));
    if (!ranges || !jobs) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < nranges; i++) {
        if (get_range(PySequence_Fast_GET_ITEM(vmm, i), &ranges[i]) < 0)
            goto done;
        capacity += ranges[i].end - ranges[i].first;
    }
    for (Py_ssize_t i = 0; i < nslots; i++) {
        if (get_slot(PySequence_Fast_GET_ITEM(slots, i), &memory[i], &slot_ids[i], &slot_pages[i]) < 0)
            goto done;
        got_slots++;
    }
    if (PyObject_GetBuffer(out_arg, &out, PyBUF_WRITABLE) < 0)
        goto done;
    got_out = 1;
    for (Py_ssize_t v = 0; v < nvcpus; v++) {
        struct capture_job *job = &jobs[v];
        unsigned long long sync_address;
        PyObject *indices_arg;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(vcpus, v),
                              "iKnknO;a vCPU is (fd, sync address, sync size, xsave request, xsave size, msrs)",
                              &job->fd, &sync_address, &job->sync_size, &job->xsave_request, &job->xsave_size,
                              &indices_arg))
            goto done;
        job->sync_address = sync_address;
        PyObject *indices = PySequence_Fast(indices_arg, "msr indices must be a sequence of ints");
        if (!indices)
            goto done;
        Py_ssize_t nmsrs = PySequence_Fast_GET_SIZE(indices);
        if (nmsrs > MAX_CAPTURE_MSRS || job->xsave_size <= 0 || job->sync_size <= 0 || !sync_address) {
            Py_DECREF(indices);
            PyErr_Format(PyExc_ValueError, "at most %d MSRs, positive sizes and a kvm_run.s address",
                         MAX_CAPTURE_MSRS);
            goto done;
        }
        job->msrs.header.nmsrs = (uint32_t)nmsrs;
        for (Py_ssize_t i = 0; i < nmsrs; i++)
            job->msrs.entries[i].index = (uint32_t)PyLong_AsUnsignedLong(PySequence_Fast_GET_ITEM(indices, i));
        Py_DECREF(indices);
        if (PyErr_Occurred())
            goto done;
        job->sync = PyBytes_FromStringAndSize(NULL, job->sync_size);
        job->xsave = job->sync ? PyBytes_FromStringAndSize(NULL, job->xsave_size) : NULL;
        got_jobs++;
        if (!job->xsave)
            goto done;
        memset(PyBytes_AS_STRING(job->xsave), 0, (size_t)job->xsave_size);
    }
    keys = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(capacity * sizeof(uint64_t)));
    scratch = keys ? PyMem_RawMalloc(capacity ? capacity * sizeof(uint64_t) : 8) : NULL;
    if (!scratch) {
        if (keys)
            PyErr_NoMemory();
        goto done;
    }

    uint64_t *k = (uint64_t *)PyByteArray_AS_STRING(keys);
    size_t n = 0, unique = 0, out_pages = (size_t)out.len / PAGE_SIZE;
    struct bad_entry bad_at = {-1, 0, 0};
    uint64_t harvested = 0;
    int stopped, reset = 0, switched = 0, captured = 0, resumed = 0;
    long long gathered = -1;
    int64_t t0 = clock_ns(), times[5] = {0, 0, 0, 0, 0};

    Py_BEGIN_ALLOW_THREADS
    int boosted = boost_priority();
    stopped = gate_stop_nogil(gate, reason, (int64_t)(timeout * 1e9));
    times[0] = clock_ns() - t0;
    if (stopped) {
        n = walk_rings(ring_views, nrings, starts, (uint64_t)entries, ranges, nranges, k, counts, last, &bad_at);
        for (Py_ssize_t r = 0; r < nrings; r++)
            harvested += counts[r];
        unique = sort_unique(k, scratch, n, k);
        reset = harvested ? reset_blocked(vm_fd, &switched) : 0;
        times[1] = clock_ns() - t0;
        uint64_t error_key;              /* (a bad key: the caller's gather() names it) */
        if (unique <= out_pages &&
            copy_pages(k, unique, slot_ids, slot_pages, memory, nslots, out.buf, &error_key) == 0)
            gathered = (long long)unique;
        times[2] = clock_ns() - t0;
        /* capture: kvm_run.s by memcpy, XSAVE and MSRs by ioctl (as get_state) */
        captured = 1;
        for (Py_ssize_t v = 0; v < nvcpus && captured; v++) {
            struct capture_job *job = &jobs[v];
            memcpy(PyBytes_AS_STRING(job->sync), (const void *)(uintptr_t)job->sync_address, (size_t)job->sync_size);
            int r = -1;
            for (int tries = 0; tries < EINTR_RETRIES; tries++) {
                r = ioctl(job->fd, job->xsave_request, PyBytes_AS_STRING(job->xsave));
                if (r >= 0 || errno != EINTR)
                    break;
            }
            if (r < 0) {
                captured = 0;
                break;
            }
            if (job->msrs.header.nmsrs) {
                for (int tries = 0; tries < EINTR_RETRIES; tries++) {
                    r = ioctl(job->fd, KVM_GET_MSRS, &job->msrs);
                    if (r >= 0 || errno != EINTR)
                        break;
                }
                if (r != (int)job->msrs.header.nmsrs)
                    captured = 0;
                job->done_msrs = r;
            }
        }
        times[3] = clock_ns() - t0;
        if (resume && captured && gathered >= 0 && bad_at.ring < 0 && reset >= 0 &&
            (uint64_t)reset == harvested && !switched) {
            gate_go_nogil(gate, reason);
            resumed = 1;
        }
        times[4] = clock_ns() - t0;
    }
    if (boosted)
        restore_priority();
    Py_END_ALLOW_THREADS

    if (!stopped) {
        result = Py_BuildValue("(OOOOOOOO)", Py_False, Py_None, Py_None, Py_None, Py_None, Py_None, Py_False,
                               Py_None);
        goto done;
    }
    PyObject *harvest = harvest_result(keys, unique, nrings, counts, last, &bad_at);
    PyObject *captures = captured ? PyList_New(nvcpus) : Py_NewRef(Py_None);
    if (!harvest || !captures) {
        Py_XDECREF(harvest);
        Py_XDECREF(captures);
        goto done;
    }
    if (captured) {
        for (Py_ssize_t v = 0; v < nvcpus; v++) {
            struct capture_job *job = &jobs[v];
            PyObject *values = PyTuple_New(job->msrs.header.nmsrs);
            if (!values) {
                Py_DECREF(harvest);
                Py_DECREF(captures);
                goto done;
            }
            for (uint32_t i = 0; i < job->msrs.header.nmsrs; i++)
                PyTuple_SET_ITEM(values, i, PyLong_FromUnsignedLongLong(job->msrs.entries[i].data));
            PyList_SET_ITEM(captures, v, Py_BuildValue("(OON)", job->sync, job->xsave, values));
        }
    }
    result = Py_BuildValue("(ONiOLNO(LLLLLL))", Py_True, harvest, reset,
                           switched ? Py_True : Py_False, gathered, captures, resumed ? Py_True : Py_False,
                           (long long)t0, (long long)(t0 + times[0]), (long long)(t0 + times[1]),
                           (long long)(t0 + times[2]), (long long)(t0 + times[3]), (long long)(t0 + times[4]));

done:
    for (Py_ssize_t r = 0; r < got_rings; r++)
        PyBuffer_Release(&ring_views[r]);
    for (Py_ssize_t i = 0; i < got_slots; i++)
        PyBuffer_Release(&memory[i]);
    if (got_out)
        PyBuffer_Release(&out);
    for (Py_ssize_t v = 0; v < got_jobs; v++) {
        Py_XDECREF(jobs[v].sync);
        Py_XDECREF(jobs[v].xsave);
    }
    PyMem_Free(jobs);
    PyMem_Free(ranges);
    PyMem_RawFree(scratch);
    Py_XDECREF(keys);
    Py_XDECREF(rings);
    Py_XDECREF(fetch);
    Py_XDECREF(vmm);
    Py_XDECREF(slots);
    Py_XDECREF(vcpus);
    return result;
}

static PyMethodDef methods[] = {
    {"harvest", native_harvest, METH_VARARGS, harvest_doc},
    {"sort_unique", native_sort_unique, METH_O, sort_unique_doc},
    {"gather", native_gather, METH_VARARGS, gather_doc},
    {"reset_dirty_rings", native_reset, METH_VARARGS, reset_doc},
    {"get_state", native_get_state, METH_VARARGS, get_state_doc},
    {"checkpoint", native_checkpoint, METH_VARARGS, checkpoint_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "ring._native",
    "The per-page loops of a checkpoint's pause in C, without the GIL (see ring/native/core.c).",
    -1, methods,
};

int gate_register(PyObject *module);     /* ring/native/gate.c */
int stream_register(PyObject *module);   /* ring/native/stream.c */

PyMODINIT_FUNC PyInit__native(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "PAGE_SIZE", PAGE_SIZE) < 0 ||
              PyModule_AddIntConstant(m, "OFFSET_BITS", OFFSET_BITS) < 0 || gate_register(m) < 0 ||
              stream_register(m) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
