/* Seeded, deterministic dirtying workloads (ring/workloads.py is their numpy twin).
 *
 * Item i of vCPU v picks a page from r = mix64(seed + v*STREAM + i*GOLDEN)
 * and writes i+1 into word ((i & 63) << 3 | v) of it, so that vCPUs never
 * write the same word and a run is deterministic whatever the interleaving.
 * The oracle (the kernel selftest's dirty_log_test) instead writes the host's
 * current iteration number into word v of a random page.
 */
#include "runtime.h"

enum { W_UNIFORM = 1, W_HOTCOLD = 2, W_SEQUENTIAL = 3, W_ORACLE = 4 };

/* One instruction reads the iteration and stores it (movsq), so a vCPU stopped
 * between two instructions never stores an iteration it read before the stop.
 * A store that faulted (logged, not retired) re-reads the iteration when it
 * is re-executed after the resume. */
static inline void copy_word(volatile u64 *dst, volatile u64 *src) {
    __asm__ volatile("movsq" : "+D"(dst), "+S"(src) : : "memory");
}

static inline u64 pick_page(const struct params *p, u64 vcpu, u64 i) {
    u64 r = mix64(p->seed + vcpu * STREAM + i * GOLDEN);
    switch (p->workload) {
    case W_HOTCOLD: {
        u64 choice = (r >> 32) % 100, index = r & 0xffffffffULL;
        if (choice < p->hot_percent) return index % p->hot_pages;
        return p->hot_pages + index % (p->working_set - p->hot_pages);
    }
    case W_SEQUENTIAL:
        return (vcpu * (p->working_set / p->nr_vcpus) + i * p->stride) % p->working_set;
    default:
        return r % p->working_set;
    }
}

void guest_main(u64 vcpu, struct params *p) {
    struct vcpu_status *st = &p->vcpu[vcpu];
    volatile u64 *data = (volatile u64 *)p->data_gpa;
    for (;;) {
        u64 i = st->progress;
        if (i >= st->limit) { wait_for_limit(st); continue; }
        if (p->total && i >= p->total) done(0);
        u64 page = pick_page(p, vcpu, i);
        if (p->workload == W_ORACLE)
            copy_word(&data[page * 512 + vcpu], &p->iteration);
        else
            data[page * 512 + (((i & 63) << 3) | vcpu)] = i + 1;
        st->progress = i + 1;
        if (p->report_every && (i + 1) % p->report_every == 0) report_progress(i + 1);
    }
}
