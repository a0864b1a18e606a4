/* The colo-ring guest runtime: what a guest program may rely on.
 *
 * Guests run in 64-bit long mode at CPL3 (see ../shared/KVM-NOTES.md: code at
 * CPL0 is emulated on this host and breaks the ring's accounting), identity
 * mapped, with RFLAGS.IOPL = 3 so that OUT/IN reach the VMM as port exits.
 * There are no interrupts and no IDT: a fault ends the guest (shutdown).
 *
 * The host passes the vCPU index in RDI and the parameter block in RSI.
 * Its layout is mirrored by ring/guest/layout.py (PARAMS_DTYPE): change both.
 */
#ifndef COLO_RUNTIME_H
#define COLO_RUNTIME_H

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define PORT_PROGRESS 0x10  /* outl: low 32 bits of the vCPU's progress counter */
#define PORT_OUTPUT   0x11  /* outb: one byte of console output */
#define PORT_DONE     0x12  /* outl: the program finished, with this exit code */
#define PORT_LIMIT    0x13  /* outl: progress reached the host's limit; waits for a new one */

#define MAX_VCPUS 8
#define PARAMS_MAGIC 0x474e4952304c4f43ULL /* "COLO0RNG" */

struct vcpu_status {
    volatile u64 progress;   /* written by the guest: work items completed */
    volatile u64 limit;      /* written by the host: stop (PORT_LIMIT) when progress reaches it */
    u64 reserved[6];
};

struct params {
    u64 magic;
    u64 workload;
    u64 seed;
    u64 data_gpa;
    u64 data_pages;
    u64 working_set;       /* pages of the data region the workload touches */
    u64 hot_pages;         /* hot/cold: the hot set's size in pages */
    u64 hot_percent;       /* hot/cold: share of writes that go to the hot set */
    u64 report_every;      /* progress OUT every this many items (0: never) */
    u64 nr_vcpus;
    volatile u64 iteration; /* the selftest oracle's iteration, written by the host */
    u64 stride;            /* sequential: pages between consecutive writes */
    u64 total;             /* items per vCPU before PORT_DONE (0: forever) */
    u64 reserved[3];
    struct vcpu_status vcpu[MAX_VCPUS];
};

static inline void outl(u16 port, u32 value) { __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port) : "memory"); }
static inline void outb(u16 port, u8 value) { __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port) : "memory"); }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }

static inline void report_progress(u64 value) { outl(PORT_PROGRESS, (u32)value); }
static inline void output_byte(u8 byte) { outb(PORT_OUTPUT, byte); }
static inline void output_string(const char *s) { while (*s) outb(PORT_OUTPUT, (u8)*s++); }
__attribute__((noreturn)) static inline void done(u32 code) { for (;;) outl(PORT_DONE, code); }

/* Wait at the host's limit: returns once progress < limit again. */
static inline void wait_for_limit(struct vcpu_status *st) {
    while (st->progress >= st->limit) outl(PORT_LIMIT, (u32)st->progress);
}

/* splitmix64 in counter mode: the same function ring/workloads.py vectorises. */
#define GOLDEN 0x9e3779b97f4a7c15ULL
#define STREAM 0xd1b54a32d192ed03ULL
static inline u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void *memset(void *d, int c, u64 n);
void *memcpy(void *d, const void *s, u64 n);
void *memmove(void *d, const void *s, u64 n);
int memcmp(const void *a, const void *b, u64 n);

void guest_main(u64 vcpu, struct params *p);

#endif
