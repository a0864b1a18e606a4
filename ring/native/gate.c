/* ring._native.Gate: the vCPUs' run loop and the pause barrier, without the GIL.

   Why it exists: a pause written with a Python condition variable costs 170 to 200 us of kick
   on this host (ring/vcpus.py before the gate; /work/profile-report-issue10.md section 3): the
   kicked vCPU thread has to take the GIL to see its EINTR, take the condition's lock, and
   notify the pausing thread, which has to take the GIL back. Here a vCPU thread loops in
   KVM_RUN and parks on a futex in C, and the pausing thread kicks and waits in C: nobody
   needs the GIL until the barrier is done.

   The protocol (each vCPU has a state; `stop` is a bit mask of reasons to stop):

     vCPU thread (run_kvm, or enter for a simulated vCPU)      stopper (stop)
       immediate_exit = 0                                       stop |= reason
       state = RUNNING                                          (seq_cst fence)
       (seq_cst fence)                                          for each vCPU in RUNNING:
       if stop: state = PARKED, wake the stopper,                   immediate_exit = 1
                futex-wait while stop is non-zero                   pthread_kill(SIGUSR1)
       else: KVM_RUN                                            wait until every vCPU is
       EINTR: again from the top; other exits: state = BUSY     PARKED, HELD or EXITED

   Either the vCPU sees the stop bit before it enters KVM_RUN, or the stopper sees it RUNNING
   and kicks it: immediate_exit closes the window between the vCPU's check and its entry into
   KVM_RUN (KVM returns EINTR at once), and the signal gets it out of a KVM_RUN it is already in.
   Because the vCPU clears immediate_exit before it publishes RUNNING, a kick of that round is
   never cleared before KVM_RUN sees it. A vCPU that left with an exit is BUSY: Python handles
   the exit (its events reach their sink before the barrier completes), then either calls
   run_kvm again, which parks, or parks on its own park reason (a limit, the idle port, a full
   ring), which Python reports with set_held(). Only run_kvm and enter let a vCPU into the
   guest, and both check the stop bits first: a stopped gate has no vCPU in the guest.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define KVM_RUN_REQUEST _IO(0xAE, 0x80)

enum { BUSY = 0, RUNNING = 1, PARKED = 2, HELD = 3, EXITED = 4 };
enum { CLOSED = 1 };                     /* run_kvm's return when the gate closes */
#define REKICK_NS 10000000L              /* a signal is a nudge; the barrier is the count */
#define SPIN_NS 100000L                  /* the stopper polls this long before it sleeps: a kicked
                                            vCPU is out in 40-100 us here, and a futex sleep and
                                            wake-up add tens of microseconds on top */
#define KICK_SIGNAL SIGUSR1

struct gate_vcpu {
    _Atomic uint32_t state;
    _Atomic int have_thread;
    pthread_t thread;
    _Atomic(volatile uint8_t *) immediate_exit;   /* kvm_run.immediate_exit, or NULL (simulated) */
    uint64_t kicks;
};

typedef struct {
    PyObject_HEAD
    int count;
    _Atomic uint32_t stop;               /* reasons to stop; the word parked vCPUs futex-wait on */
    _Atomic uint32_t changes;            /* bumped when a vCPU parks, is held or exits */
    _Atomic uint32_t stoppers;           /* threads waiting on `changes` */
    _Atomic uint32_t closing;
    long long spin_ns;                   /* how long stop() polls before it sleeps (SPIN_NS) */
    struct gate_vcpu *vcpus;
} Gate;

static long futex(_Atomic uint32_t *word, int op, uint32_t value, const struct timespec *timeout)
{
    return syscall(SYS_futex, (uint32_t *)word, op | FUTEX_PRIVATE_FLAG, value, timeout, NULL, 0);
}

static void note_change(Gate *gate)
{
    atomic_fetch_add(&gate->changes, 1);
    if (atomic_load(&gate->stoppers))
        futex(&gate->changes, FUTEX_WAKE, INT_MAX, NULL);
}

static void set_state(Gate *gate, int index, uint32_t state)
{
    atomic_store(&gate->vcpus[index].state, state);
    if (state != RUNNING && state != BUSY)
        note_change(gate);
}

/* Park until no stop bit is set (or the gate closes). Returns 0 to run, CLOSED to leave. */
static int park(Gate *gate, int index)
{
    set_state(gate, index, PARKED);
    for (;;) {
        if (atomic_load(&gate->closing))
            return CLOSED;
        uint32_t stop = atomic_load(&gate->stop);
        if (!stop)
            return 0;
        futex(&gate->stop, FUTEX_WAIT, stop, NULL);
    }
}

/* The vCPU's way in: 0 to enter the guest (state RUNNING), CLOSED to leave the thread. */
static int enter(Gate *gate, int index)
{
    struct gate_vcpu *vcpu = &gate->vcpus[index];
    for (;;) {
        volatile uint8_t *immediate_exit = atomic_load(&vcpu->immediate_exit);
        if (immediate_exit)
            *immediate_exit = 0;
        atomic_store(&vcpu->state, RUNNING);
        atomic_thread_fence(memory_order_seq_cst);
        if (atomic_load(&gate->closing))
            return CLOSED;
        if (!atomic_load(&gate->stop))
            return 0;
        if (park(gate, index) == CLOSED)
            return CLOSED;
    }
}

static int check_index(Gate *gate, int index)
{
    if (index < 0 || index >= gate->count) {
        PyErr_Format(PyExc_IndexError, "vCPU %d is not on this gate of %d", index, gate->count);
        return -1;
    }
    return 0;
}

static void register_thread(struct gate_vcpu *vcpu)
{
    vcpu->thread = pthread_self();
    atomic_store(&vcpu->have_thread, 1);
}

PyDoc_STRVAR(run_kvm_doc,
"run_kvm(index, vcpu_fd, immediate_exit_address, run_counter_address) -> int\n\n"
"The vCPU thread's run loop: KVM_RUN until an exit Python must handle, parking on the gate\n"
"whenever a stop bit is set, without the GIL. Returns 0 (an exit: read kvm_run), -errno (a\n"
"KVM_RUN error other than EINTR), or CLOSED. Every KVM_RUN that returns 0 or EINTR adds one\n"
"to the uint64 at run_counter_address (kvm_run.s is fresh after each: KVM_CAP_SYNC_REGS).");

static PyObject *gate_run_kvm(Gate *gate, PyObject *args)
{
    int index, fd;
    unsigned long long immediate_exit_address, counter_address;
    if (!PyArg_ParseTuple(args, "iiKK", &index, &fd, &immediate_exit_address, &counter_address))
        return NULL;
    if (check_index(gate, index) < 0)
        return NULL;
    struct gate_vcpu *vcpu = &gate->vcpus[index];
    _Atomic uint64_t *runs = (_Atomic uint64_t *)(uintptr_t)counter_address;
    int result;
    Py_BEGIN_ALLOW_THREADS
    register_thread(vcpu);
    atomic_store(&vcpu->immediate_exit, (volatile uint8_t *)(uintptr_t)immediate_exit_address);
    for (;;) {
        if (enter(gate, index) == CLOSED) {
            result = CLOSED;
            break;
        }
        int r = ioctl(fd, KVM_RUN_REQUEST, 0);
        int err = r < 0 ? errno : 0;
        if (r == 0 || err == EINTR)
            atomic_fetch_add(runs, 1);
        if (r == 0) {
            result = 0;
            break;
        }
        if (err != EINTR && err != EAGAIN) {
            result = -err;
            break;
        }
    }
    atomic_store(&vcpu->state, BUSY);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(result);
}

PyDoc_STRVAR(enter_doc,
"enter(index) -> bool\n\n"
"A simulated vCPU's way in: parks (without the GIL) while a stop bit is set, then marks the\n"
"vCPU running. False if the gate closed. The vCPU polls `stopping` and calls leave() on exit.");

static PyObject *gate_enter(Gate *gate, PyObject *arg)
{
    int index = _PyLong_AsInt(arg);
    if ((index == -1 && PyErr_Occurred()) || check_index(gate, index) < 0)
        return NULL;
    int result;
    register_thread(&gate->vcpus[index]);
    if (!atomic_load(&gate->stop) && !atomic_load(&gate->closing)) {
        result = enter(gate, index);          /* no stop: no wait, keep the GIL */
    } else {
        Py_BEGIN_ALLOW_THREADS
        result = enter(gate, index);
        Py_END_ALLOW_THREADS
    }
    return PyBool_FromLong(result != CLOSED);
}

static PyObject *gate_leave(Gate *gate, PyObject *arg)
{
    int index = _PyLong_AsInt(arg);
    if ((index == -1 && PyErr_Occurred()) || check_index(gate, index) < 0)
        return NULL;
    atomic_store(&gate->vcpus[index].state, BUSY);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(set_held_doc,
"set_held(index, held)\n\n"
"The vCPU waits in Python for its own park reason (held: counts as stopped), or no longer.");

static PyObject *gate_set_held(Gate *gate, PyObject *args)
{
    int index, held;
    if (!PyArg_ParseTuple(args, "ip", &index, &held) || check_index(gate, index) < 0)
        return NULL;
    set_state(gate, index, held ? HELD : BUSY);
    Py_RETURN_NONE;
}

static PyObject *gate_set_exited(Gate *gate, PyObject *arg)
{
    int index = _PyLong_AsInt(arg);
    if ((index == -1 && PyErr_Occurred()) || check_index(gate, index) < 0)
        return NULL;
    set_state(gate, index, EXITED);
    Py_RETURN_NONE;
}

static void kick_running(Gate *gate)
{
    atomic_thread_fence(memory_order_seq_cst);
    for (int i = 0; i < gate->count; i++) {
        struct gate_vcpu *vcpu = &gate->vcpus[i];
        if (atomic_load(&vcpu->state) != RUNNING)
            continue;
        volatile uint8_t *immediate_exit = atomic_load(&vcpu->immediate_exit);
        if (!immediate_exit)
            continue;                          /* simulated: it polls the stop bits */
        *immediate_exit = 1;
        atomic_thread_fence(memory_order_seq_cst);
        if (atomic_load(&vcpu->have_thread))
            pthread_kill(vcpu->thread, KICK_SIGNAL);
        vcpu->kicks++;
    }
}

static int all_stopped(Gate *gate)
{
    for (int i = 0; i < gate->count; i++) {
        uint32_t state = atomic_load(&gate->vcpus[i].state);
        if (state == RUNNING || state == BUSY)
            return 0;
    }
    return 1;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Wait until every vCPU is stopped; re-kick every REKICK_NS. 1 if stopped, 0 on timeout. */
static int wait_stopped(Gate *gate, int64_t timeout_ns)
{
    int64_t start = now_ns(), deadline = start + timeout_ns;
    int64_t spin_until = start + (timeout_ns < gate->spin_ns ? timeout_ns : gate->spin_ns);
    while (now_ns() < spin_until) {
        if (all_stopped(gate))
            return 1;
        __builtin_ia32_pause();
    }
    atomic_fetch_add(&gate->stoppers, 1);
    int stopped = 0;
    for (;;) {
        uint32_t seen = atomic_load(&gate->changes);
        if (all_stopped(gate)) {
            stopped = 1;
            break;
        }
        int64_t left = deadline - now_ns();
        if (left <= 0)
            break;
        int64_t wait = left < REKICK_NS ? left : REKICK_NS;
        struct timespec ts = {wait / 1000000000, wait % 1000000000};
        if (futex(&gate->changes, FUTEX_WAIT, seen, &ts) < 0 && errno == ETIMEDOUT)
            kick_running(gate);
    }
    atomic_fetch_sub(&gate->stoppers, 1);
    return stopped;
}

PyDoc_STRVAR(stop_doc,
"stop(reason, wait=True, timeout=10.0) -> bool\n\n"
"Set the stop bit `reason`, kick every vCPU in the guest, and (wait) return once every vCPU\n"
"is parked, held or gone, without the GIL: True, or False after `timeout` seconds.");

static PyObject *gate_stop(Gate *gate, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"reason", "wait", "timeout", NULL};
    unsigned int reason;
    int wait = 1;
    double timeout = 10.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "I|pd", keywords, &reason, &wait, &timeout))
        return NULL;
    if (!reason) {
        PyErr_SetString(PyExc_ValueError, "a stop reason is a non-zero bit");
        return NULL;
    }
    atomic_fetch_or(&gate->stop, reason);
    kick_running(gate);
    if (!wait)
        Py_RETURN_TRUE;
    if (all_stopped(gate))
        Py_RETURN_TRUE;
    int stopped;
    Py_BEGIN_ALLOW_THREADS
    stopped = wait_stopped(gate, (int64_t)(timeout * 1e9));
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(stopped);
}

PyDoc_STRVAR(go_doc,
"go(reason) -> bool\n\n"
"Clear the stop bit `reason`; the parked vCPUs run again once no bit is left (True then).");

static PyObject *gate_go(Gate *gate, PyObject *arg)
{
    unsigned long reason = PyLong_AsUnsignedLong(arg);
    if (reason == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    uint32_t before = atomic_fetch_and(&gate->stop, ~(uint32_t)reason);
    if ((before & ~(uint32_t)reason) == 0) {
        if (before)
            futex(&gate->stop, FUTEX_WAKE, INT_MAX, NULL);
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

static PyObject *gate_close(Gate *gate, PyObject *unused)
{
    atomic_store(&gate->closing, 1);
    atomic_fetch_or(&gate->stop, 0x80000000u);
    futex(&gate->stop, FUTEX_WAKE, INT_MAX, NULL);
    kick_running(gate);
    Py_RETURN_NONE;
}

static PyObject *gate_state(Gate *gate, PyObject *arg)
{
    int index = _PyLong_AsInt(arg);
    if ((index == -1 && PyErr_Occurred()) || check_index(gate, index) < 0)
        return NULL;
    static const char *names[] = {"busy", "running", "parked", "held", "exited"};
    return PyUnicode_FromString(names[atomic_load(&gate->vcpus[index].state)]);
}

static PyObject *gate_get_stopping(Gate *gate, void *unused)
{
    return PyLong_FromUnsignedLong(atomic_load(&gate->stop));
}

static PyObject *gate_get_kicks(Gate *gate, void *unused)
{
    uint64_t total = 0;
    for (int i = 0; i < gate->count; i++)
        total += gate->vcpus[i].kicks;
    return PyLong_FromUnsignedLongLong(total);
}

static int gate_init(Gate *gate, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"count", "stop", NULL};
    int count;
    unsigned int stop = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "i|I", keywords, &count, &stop))
        return -1;
    if (count <= 0 || count > 4096) {
        PyErr_Format(PyExc_ValueError, "a gate is for 1 to 4096 vCPUs, not %d", count);
        return -1;
    }
    if (gate->vcpus) {
        PyErr_SetString(PyExc_RuntimeError, "a gate is initialised once");
        return -1;
    }
    gate->vcpus = PyMem_Calloc((size_t)count, sizeof(struct gate_vcpu));
    if (!gate->vcpus) {
        PyErr_NoMemory();
        return -1;
    }
    gate->count = count;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    gate->spin_ns = cpus > count ? SPIN_NS : 0;     /* spin only on a core no vCPU needs */
    atomic_store(&gate->stop, stop);
    return 0;
}

static void gate_dealloc(Gate *gate)
{
    PyMem_Free(gate->vcpus);
    Py_TYPE(gate)->tp_free((PyObject *)gate);
}

static PyMethodDef gate_methods[] = {
    {"run_kvm", (PyCFunction)gate_run_kvm, METH_VARARGS, run_kvm_doc},
    {"enter", (PyCFunction)gate_enter, METH_O, enter_doc},
    {"leave", (PyCFunction)gate_leave, METH_O, "leave(index): a simulated vCPU left the guest (busy)."},
    {"set_held", (PyCFunction)gate_set_held, METH_VARARGS, set_held_doc},
    {"set_exited", (PyCFunction)gate_set_exited, METH_O, "set_exited(index): the vCPU's thread ends."},
    {"stop", (PyCFunction)(void (*)(void))gate_stop, METH_VARARGS | METH_KEYWORDS, stop_doc},
    {"go", (PyCFunction)gate_go, METH_O, go_doc},
    {"close", (PyCFunction)gate_close, METH_NOARGS, "close(): every vCPU leaves its loop (CLOSED)."},
    {"state", (PyCFunction)gate_state, METH_O, "state(index) -> busy, running, parked, held or exited."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef gate_getset[] = {
    {"stopping", (getter)gate_get_stopping, NULL, "the stop bits now (0: the vCPUs may run)", NULL},
    {"kicks", (getter)gate_get_kicks, NULL, "signals sent to vCPU threads so far", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef gate_members[] = {
    {"spin_ns", T_LONGLONG, offsetof(Gate, spin_ns), 0, "how long stop() polls before it sleeps"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject GateType;

/* For ring/native/core.c's checkpoint(): the same stop and go, called without the GIL. */
int gate_is(PyObject *object)
{
    return PyObject_TypeCheck(object, &GateType);
}

int gate_stop_nogil(PyObject *object, uint32_t reason, int64_t timeout_ns)
{
    Gate *gate = (Gate *)object;
    atomic_fetch_or(&gate->stop, reason);
    kick_running(gate);
    return all_stopped(gate) || wait_stopped(gate, timeout_ns);
}

void gate_go_nogil(PyObject *object, uint32_t reason)
{
    Gate *gate = (Gate *)object;
    uint32_t before = atomic_fetch_and(&gate->stop, ~reason);
    if (before && (before & ~reason) == 0)
        futex(&gate->stop, FUTEX_WAKE, INT_MAX, NULL);
}

static PyTypeObject GateType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "ring._native.Gate",
    .tp_basicsize = sizeof(Gate),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Gate(count, stop=0): the vCPUs' run loop and pause barrier (see ring/native/gate.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)gate_init,
    .tp_dealloc = (destructor)gate_dealloc,
    .tp_methods = gate_methods,
    .tp_getset = gate_getset,
    .tp_members = gate_members,
};

static void ignore_kick(int signum)
{
    (void)signum;                        /* only there so that the signal interrupts KVM_RUN */
}

PyDoc_STRVAR(install_kick_handler_doc,
"install_kick_handler()\n\n"
"A no-op C handler for the kick signal (SIGUSR1), from any thread: without a handler the\n"
"signal would kill the process, and a Python handler would wake the main thread (and an\n"
"asyncio loop's wakeup fd) at every kick. No SA_RESTART: KVM_RUN must return EINTR.");

static PyObject *install_kick_handler(PyObject *self, PyObject *unused)
{
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_handler = ignore_kick;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_ONSTACK;
    if (sigaction(KICK_SIGNAL, &action, NULL) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyMethodDef gate_functions[] = {
    {"install_kick_handler", install_kick_handler, METH_NOARGS, install_kick_handler_doc},
    {NULL, NULL, 0, NULL},
};

int gate_register(PyObject *module)
{
    if (PyModule_AddFunctions(module, gate_functions) < 0)
        return -1;
    if (PyType_Ready(&GateType) < 0)
        return -1;
    Py_INCREF(&GateType);
    if (PyModule_AddObject(module, "Gate", (PyObject *)&GateType) < 0) {
        Py_DECREF(&GateType);
        return -1;
    }
    if (PyModule_AddIntConstant(module, "KICK_SIGNAL", KICK_SIGNAL) < 0)
        return -1;
    return PyModule_AddIntConstant(module, "GATE_CLOSED", CLOSED);
}
