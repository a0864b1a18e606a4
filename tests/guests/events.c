/* A guest for the event tests: what it does is chosen by the workload seed. */
#include "runtime.h"

void guest_main(u64 vcpu, struct params *p) {
    switch (p->seed) {
    case 1:                       /* output, progress, then done(7) */
        output_string("hi");
        report_progress(41);
        done(7);
    case 2:                       /* an invalid opcode: no IDT, so a triple fault */
        output_string("x");
        __asm__ volatile("ud2");
        break;
    case 3:                       /* a write outside every memory slot */
        *(volatile u64 *)(p->data_gpa + p->data_pages * 4096 + 0x1000000) = 1;
        break;
    case 4:                       /* IN from the host, echoed back as progress */
        p->vcpu[vcpu].progress = inl(0x77) + 1;
        report_progress(p->vcpu[vcpu].progress);
        done(0);
    }
    done(99);
}
