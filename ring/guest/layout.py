"""The guest-physical layout and the parameter block, mirrored from programs/runtime.h.

    0x0000_0000  page 0, unused
    0x0000_1000  parameter block (host writes settings; guest writes progress)
    0x0000_2000  GDT                 0x0000_3000  TSS
    0x0001_0000  PML4, PDPT, then one page directory per GiB mapped (2 MiB pages)
    0x0010_0000  the guest program (text, data, bss)
    0x0040_0000  vCPU stacks, STACK_SIZE each
    LOW_SIZE     end of slot 0
    0x4000_0000  slot 1: the data region, up to 64 GiB and more
"""

from __future__ import annotations

import numpy as np

PARAMS_GPA = 0x1000
GDT_GPA = 0x2000
TSS_GPA = 0x3000
PML4_GPA = 0x10000
PDPT_GPA = 0x11000
PD_GPA = 0x12000
PD_END = 0x100000
PROGRAM_GPA = 0x100000
PROGRAM_MAX = 0x300000
STACK_GPA = 0x400000
STACK_SIZE = 0x10000
LOW_SIZE = 0x800000
DATA_GPA = 0x40000000
MAX_VCPUS = 8
MAX_MAPPED_GIB = (PD_END - PD_GPA) // 0x1000      # one page directory per GiB

LOW_SLOT = 0
DATA_SLOT = 1

PORT_PROGRESS = 0x10
PORT_OUTPUT = 0x11
PORT_DONE = 0x12
PORT_LIMIT = 0x13

PARAMS_MAGIC = 0x474E4952304C4F43
NO_LIMIT = (1 << 64) - 1

VCPU_STATUS_DTYPE = np.dtype([("progress", "<u8"), ("limit", "<u8"), ("reserved", "<u8", 6)])
PARAMS_DTYPE = np.dtype([
    ("magic", "<u8"), ("workload", "<u8"), ("seed", "<u8"), ("data_gpa", "<u8"),
    ("data_pages", "<u8"), ("working_set", "<u8"), ("hot_pages", "<u8"), ("hot_percent", "<u8"),
    ("report_every", "<u8"), ("nr_vcpus", "<u8"), ("iteration", "<u8"), ("stride", "<u8"),
    ("total", "<u8"), ("reserved", "<u8", 3), ("vcpu", VCPU_STATUS_DTYPE, MAX_VCPUS),
])
assert PARAMS_DTYPE.itemsize == 128 + 64 * MAX_VCPUS
