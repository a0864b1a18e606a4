/* Entry: RDI = vCPU index, RSI = parameter block, RSP = this vCPU's stack top (set by the host). */
    .section .text.start, "ax"
    .globl _start
_start:
    andq $-16, %rsp
    call guest_main
1:  movl $0, %eax
    movw $0x12, %dx
    outl %eax, %dx
    jmp 1b
