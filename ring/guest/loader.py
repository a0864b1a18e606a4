"""Start a guest in 64-bit long mode at CPL3, identity mapped.

Why CPL3: on this host (kvm_pvm, nested, shadow paging) code at CPL0 is run
by KVM's instruction emulator, which logs a ring entry per emulated store and
can overflow the ring; 64-bit code at CPL3 runs natively and logs one entry
per page per reset, as on real hardware (../shared/KVM-NOTES.md).

So the loader writes page tables (2 MiB pages, user bit set, accessed and
dirty bits preset so that the CPU never writes them back into guest memory),
a GDT and a TSS, and sets every segment register directly with KVM_SET_SREGS:
CS is a 64-bit user code segment, the data segments are user data, RFLAGS has
IOPL=3 so that OUT reaches the VMM. There is no IDT: a fault shuts the guest
down, which the runner reports as a fault event.
"""

from __future__ import annotations

import numpy as np

from .. import abi
from ..errors import ConfigError
from ..memory import GuestMemory
from . import layout

PTE_PRESENT, PTE_WRITE, PTE_USER, PTE_ACCESSED, PTE_DIRTY, PTE_HUGE = 1, 2, 4, 0x20, 0x40, 0x80
TABLE_FLAGS = PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_ACCESSED
LEAF_2M_FLAGS = TABLE_FLAGS | PTE_DIRTY | PTE_HUGE

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_AM, CR0_PG = 1, 2, 0x10, 0x20, 0x10000, 0x40000, 0x80000000
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 0x20, 0x200, 0x400
EFER_LME, EFER_LMA = 0x100, 0x400
RFLAGS_IOPL3 = 0x3000
RFLAGS_RESERVED = 0x2

USER_DATA_SELECTOR = 0x1B    # GDT index 3, RPL 3
USER_CODE_SELECTOR = 0x23    # GDT index 4, RPL 3
TSS_SELECTOR = 0x28          # GDT index 5 (16-byte system descriptor)
GDT_ENTRIES = [
    0,
    0x00AF9B000000FFFF,      # kernel code (unused, kept for a conventional table)
    0x00CF93000000FFFF,      # kernel data
    0x00CFF3000000FFFF,      # user data, DPL 3
    0x00AFFB000000FFFF,      # user code, 64-bit, DPL 3
]


def write_page_tables(memory: GuestMemory, mapped_bytes: int) -> None:
    """Identity-map [0, mapped_bytes) with 2 MiB pages."""
    gib = -(-mapped_bytes // (1 << 30))
    if gib > layout.MAX_MAPPED_GIB:
        raise ConfigError(f"guest-physical space of {gib} GiB exceeds the {layout.MAX_MAPPED_GIB} GiB "
                          f"the loader's page-table area can map")
    pml4 = memory.view(layout.PML4_GPA, 4096).view(np.uint64)
    pdpt = memory.view(layout.PDPT_GPA, 4096).view(np.uint64)
    pml4[:] = 0
    pml4[0] = layout.PDPT_GPA | TABLE_FLAGS
    pdpt[:] = 0
    pdpt[:gib] = layout.PD_GPA + 4096 * np.arange(gib, dtype=np.uint64) | TABLE_FLAGS
    directories = memory.view(layout.PD_GPA, 4096 * gib).view(np.uint64)
    directories[:] = (np.arange(512 * gib, dtype=np.uint64) << np.uint64(21)) | np.uint64(LEAF_2M_FLAGS)


def write_descriptor_tables(memory: GuestMemory) -> None:
    """GDT with user segments and a 64-bit TSS descriptor; a zeroed TSS."""
    gdt = memory.view(layout.GDT_GPA, 4096).view(np.uint64)
    gdt[:] = 0
    gdt[:len(GDT_ENTRIES)] = np.array(GDT_ENTRIES, dtype=np.uint64)
    base, limit = layout.TSS_GPA, 0x67
    low = ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89 << 40)   # present, type 9 (available)
           | (((limit >> 16) & 0xF) << 48) | (((base >> 24) & 0xFF) << 56))
    gdt[5] = low
    gdt[6] = base >> 32
    memory.view(layout.TSS_GPA, 0x68)[:] = 0


def _segment(selector: int, type_: int, *, code: bool) -> abi.Segment:
    return abi.Segment(base=0, limit=0xFFFFFFFF, selector=selector, type=type_, present=1, dpl=3,
                       db=0 if code else 1, s=1, l=1 if code else 0, g=1)


def initial_sregs(sregs: abi.Sregs) -> abi.Sregs:
    """Long mode at CPL3 over the tables written above (starting from KVM's own sregs)."""
    sregs.cs = _segment(USER_CODE_SELECTOR, 11, code=True)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, _segment(USER_DATA_SELECTOR, 3, code=False))
    sregs.tr = abi.Segment(base=layout.TSS_GPA, limit=0x67, selector=TSS_SELECTOR, type=11, present=1,
                           dpl=0, db=0, s=0, l=0, g=0)
    sregs.ldt = abi.Segment(selector=0, type=2, present=1, unusable=1)
    sregs.gdt = abi.DTable(base=layout.GDT_GPA, limit=8 * 7 - 1)
    sregs.idt = abi.DTable(base=0, limit=0)
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG
    sregs.cr3 = layout.PML4_GPA
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.efer = EFER_LME | EFER_LMA
    return sregs


def initial_regs(vcpu_index: int, entry: int = layout.PROGRAM_GPA) -> abi.Regs:
    """RIP at the program's entry, RSP at this vCPU's stack top, RDI/RSI the arguments."""
    regs = abi.Regs()
    regs.rip = entry
    regs.rsp = layout.STACK_GPA + (vcpu_index + 1) * layout.STACK_SIZE
    regs.rdi = vcpu_index
    regs.rsi = layout.PARAMS_GPA
    regs.rflags = RFLAGS_IOPL3 | RFLAGS_RESERVED
    return regs


def load_program(memory: GuestMemory, image: bytes) -> None:
    """Copy a flat program image to PROGRAM_GPA."""
    if len(image) > layout.PROGRAM_MAX:
        raise ConfigError(f"guest program of {len(image)} bytes exceeds {layout.PROGRAM_MAX}")
    memory.write(layout.PROGRAM_GPA, image)
