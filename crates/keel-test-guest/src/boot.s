/*
 * keel-test-guest: everything that runs at CPL0.
 *
 * CPL0 code is run one instruction at a time by KVM's emulator on the
 * machines this project targets (PVM nested KVM), so this file is kept to
 * straight-line set-up code and tiny interrupt stubs:
 *
 *   _start32      PVH entry (32-bit protected mode, paging off, EBX = start_info)
 *   ap_tramp_*    real-mode AP trampoline, copied below 1 MiB at run time
 *   ap_entry32    APs continue here in 32-bit protected mode
 *   common32/long64  shared: long mode, TSS, IDT, `iretq` to CPL3
 *   exc_*         exceptions: record, then leave for CPL3 (keel_fault)
 *   irq_*         interrupts: count (one counter per vector for irq_vec_*), EOI, iretq
 *
 * Page tables, GDT and TSS are static data; the IDT is filled in by the
 * BSP at CPL3 (idt.rs) before anything can raise an exception.
 */

    .set MAX_CPUS,      32
    .set KSTACK_SIZE,   2048          /* per-CPU CPL0 stack (interrupt frames only) */
    .set APSTACK_SIZE,  8192          /* per-AP CPL3 stack */
    .set BSPSTACK_SIZE, 65536         /* BSP CPL3 stack */
    .set FSTACK_SIZE,   16384         /* CPL3 stack for the fault reporter */
    .set TSS_STRIDE,    128
    .set IOMAP_OFF,     MAX_CPUS * TSS_STRIDE   /* shared I/O bitmap, after all TSSs */

    .set SEL_KCODE64,   0x08
    .set SEL_KDATA,     0x10
    .set SEL_UDATA,     0x1b
    .set SEL_UCODE64,   0x23
    .set SEL_KCODE32,   0x28
    .set SEL_TSS0,      0x30

/* ------------------------------------------------------------------ */
/* PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY = 18). 8-byte descriptor as  */
/* in Linux; loaders reading 4 bytes get the same (little-endian) value. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad _start32
    .balign 4

/* ------------------------------------------------------------------ */
    .section .text.boot, "ax", @progbits
    .code32
    .global _start32
_start32:
    cli
    cld
    movl %ebx, %ebp                 /* hvm_start_info, carried to CPL3 in rbp */
    lgdtl gdt_ptr
    movw $SEL_KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movb $0xff, %al                 /* mask both 8259s: IF is 1 at CPL3 */
    outb %al, $0x21
    outb %al, $0xa1
    xorl %esi, %esi                 /* CPU index 0 */
    jmp common32

    .global ap_entry32
ap_entry32:                         /* from the trampoline, CS = SEL_KCODE32 */
    movw $SEL_KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl ap_boot_index, %esi
    xorl %ebp, %ebp

common32:                           /* esi = CPU index, ebp = start_info or 0 */
    movl $0x620, %eax               /* CR4: PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx          /* EFER.LME */
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    andl $0xfffffff3, %eax          /* clear EM, TS: SSE usable */
    orl $0x80000023, %eax           /* PG | NE | MP | PE */
    movl %eax, %cr0
    ljmpl $SEL_KCODE64, $long64

    .code64
long64:
    movw $SEL_KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movl %esi, %esi
    /* CPL0 stack: kstacks + (idx + 1) * KSTACK_SIZE */
    leaq 1(%rsi), %rax
    shlq $11, %rax
    leaq kstacks(%rip), %rsp
    addq %rax, %rsp
    /* This CPU's TSS: rbx = tss_area + idx * TSS_STRIDE */
    movl %esi, %ecx
    shll $7, %ecx
    leaq tss_area(%rip), %rbx
    addq %rcx, %rbx
    movq %rsp, 4(%rbx)              /* RSP0 */
    movl $IOMAP_OFF, %eax
    subl %ecx, %eax                 /* iomap_base: the shared bitmap */
    movw %ax, 102(%rbx)
    addl $8192, %eax                /* limit: bitmap + 0xff terminator */
    /* 64-bit available-TSS descriptor (low half) in rdx */
    movzwl %ax, %edx
    andl $0xf0000, %eax
    shlq $32, %rax
    orq %rax, %rdx
    movl %ebx, %eax
    andl $0xffffff, %eax
    shlq $16, %rax
    orq %rax, %rdx
    movl %ebx, %eax
    andl $0xff000000, %eax
    shlq $32, %rax
    orq %rax, %rdx
    movabsq $0x0000890000000000, %rax
    orq %rax, %rdx
    movl %esi, %eax
    shll $4, %eax
    leaq gdt_tss(%rip), %rcx
    movq %rdx, (%rcx, %rax)
    addl $SEL_TSS0, %eax
    ltr %ax
    lidt idt_ptr(%rip)
    /* iretq to CPL3 */
    testl %esi, %esi
    jnz 1f
    leaq bsp_ustack_top(%rip), %rax
    leaq bsp_user_entry(%rip), %rcx
    jmp 2f
1:  movl %esi, %eax
    shll $13, %eax
    leaq ap_ustacks(%rip), %rdx
    addq %rdx, %rax                 /* top of AP stack idx-1 */
    leaq ap_user_entry(%rip), %rcx
2:  pushq $SEL_UDATA
    pushq %rax
    pushq $0x3202                   /* IOPL=3, IF=1 */
    pushq $SEL_UCODE64
    pushq %rcx
    iretq

/* ------------------------------------------------------------------ */
/* Exceptions: record the first one, send that CPU to keel_fault at     */
/* CPL3 on the fault stack; later ones park their CPU.                   */
    .macro EXC_NOERR n
exc_\n:
    pushq $0
    pushq $\n
    jmp exc_common
    .endm
    .macro EXC_ERR n
exc_\n:
    pushq $\n
    jmp exc_common
    .endm

    EXC_NOERR 0
    EXC_NOERR 1
    EXC_NOERR 2
    EXC_NOERR 3
    EXC_NOERR 4
    EXC_NOERR 5
    EXC_NOERR 6
    EXC_NOERR 7
    EXC_ERR   8
    EXC_NOERR 9
    EXC_ERR   10
    EXC_ERR   11
    EXC_ERR   12
    EXC_ERR   13
    EXC_ERR   14
    EXC_NOERR 15
    EXC_NOERR 16
    EXC_ERR   17
    EXC_NOERR 18
    EXC_NOERR 19
    EXC_NOERR 20
    EXC_ERR   21
    EXC_NOERR 22
    EXC_NOERR 23
    EXC_NOERR 24
    EXC_NOERR 25
    EXC_NOERR 26
    EXC_NOERR 27
    EXC_NOERR 28
    EXC_ERR   29
    EXC_ERR   30
    EXC_NOERR 31

exc_common:                         /* rax, vector, error, rip, cs, rflags, rsp, ss */
    pushq %rax
    leaq keel_park_hlt(%rip), %rax      /* #GP from keel_park's hlt: park */
    cmpq %rax, 24(%rsp)
    je park
    leaq keel_idle_hlt(%rip), %rax      /* #GP from keel_idle_wait's hlt: wait */
    cmpq %rax, 24(%rsp)
    je idle_halt
    movl $1, %eax
    xchgl %eax, fault_claimed(%rip)
    testl %eax, %eax
    jnz park
    movq 8(%rsp), %rax
    movq %rax, fault_info(%rip)
    movq 16(%rsp), %rax
    movq %rax, fault_info+8(%rip)
    movq 24(%rsp), %rax
    movq %rax, fault_info+16(%rip)
    movq 32(%rsp), %rax
    movq %rax, fault_info+24(%rip)
    movq 48(%rsp), %rax
    movq %rax, fault_info+32(%rip)
    movq %cr2, %rax
    movq %rax, fault_info+40(%rip)
    leaq fault_user_entry(%rip), %rax
    movq %rax, 24(%rsp)
    movq $SEL_UCODE64, 32(%rsp)
    movq $0x3202, 40(%rsp)
    leaq fault_stack_top(%rip), %rax
    movq %rax, 48(%rsp)
    movq $SEL_UDATA, 56(%rsp)
    popq %rax
    addq $16, %rsp
    iretq

/* Wait for one interrupt with IF set, then return to CPL3 past the 1-byte
 * hlt (reached from keel_idle_wait below). The interrupt's handler runs on
 * this stack below the iretq frame. */
idle_halt:
    addq $1, 24(%rsp)
    popq %rax
    addq $16, %rsp
    sti
    hlt
    iretq

/* Stop this CPU for good (reached from keel_park below). */
park:
    cli
1:  hlt
    jmp 1b

/* ------------------------------------------------------------------ */
/* Interrupts: count, EOI, return.                                      */
irq_timer:
    lock incq irq_timer_count(%rip)
    jmp irq_eoi
irq_device:
    lock incq irq_device_count(%rip)
    jmp irq_eoi
irq_other:
    lock incq irq_other_count(%rip)
irq_eoi:
    pushq %rax
    movabsq $0xfee000b0, %rax
    movl $0, (%rax)
    popq %rax
    iretq
irq_spurious:
    iretq

/* Vectors VEC_COUNTED..VEC_COUNTED+7 (MSI, MSI-X, virtio): one counter each. */
    .macro IRQ_VEC n
irq_vec_\n:
    lock incq irq_vec_count + 8 * \n(%rip)
    jmp irq_eoi
    .endm
    IRQ_VEC 0
    IRQ_VEC 1
    IRQ_VEC 2
    IRQ_VEC 3
    IRQ_VEC 4
    IRQ_VEC 5
    IRQ_VEC 6
    IRQ_VEC 7

/* ------------------------------------------------------------------ */
/* CPL3 entry points.                                                    */
bsp_user_entry:                     /* rbp = start_info */
    leaq __bss_start(%rip), %rdi
    leaq __bss_end(%rip), %rcx
    subq %rdi, %rcx
    xorl %eax, %eax
    rep stosb
    movl %ebp, %edi
    xorl %ebp, %ebp
    call keel_bsp_main
    ud2
ap_user_entry:                      /* rsi = CPU index */
    movq %rsi, %rdi
    xorl %ebp, %ebp
    call keel_ap_main
    ud2
fault_user_entry:
    xorl %ebp, %ebp
    call keel_fault
    ud2

/* keel_park(): CPL3 cannot halt, and `int n` from native CPL3 raises #UD
 * under PVM, so a CPU parks by executing hlt at CPL3: the #GP lands in
 * exc_common, which recognises this address and halts the CPU at CPL0. */
    .global keel_idle_wait
keel_idle_wait:                     /* wait for the next interrupt (see idle_halt) */
keel_idle_hlt:
    hlt
    ret

    .global keel_park
keel_park:
keel_park_hlt:
    hlt
    jmp keel_park

/* ------------------------------------------------------------------ */
/* AP trampoline: copied to a page below 1 MiB; SIPI starts it in real  */
/* mode with CS = page >> 4, IP = 0.                                      */
    .code16
    .global ap_tramp_start, ap_tramp_end
    .balign 16
ap_tramp_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl ap_tramp_gdt_ptr - ap_tramp_start
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $SEL_KCODE32, $ap_entry32
    .balign 4
ap_tramp_gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
ap_tramp_end:
    .code64

/* ------------------------------------------------------------------ */
    .section .rodata.keel_tables, "a", @progbits
    .balign 8
    .global exc_stubs, irq_stubs, irq_vec_stubs
exc_stubs:
    .quad exc_0, exc_1, exc_2, exc_3, exc_4, exc_5, exc_6, exc_7
    .quad exc_8, exc_9, exc_10, exc_11, exc_12, exc_13, exc_14, exc_15
    .quad exc_16, exc_17, exc_18, exc_19, exc_20, exc_21, exc_22, exc_23
    .quad exc_24, exc_25, exc_26, exc_27, exc_28, exc_29, exc_30, exc_31
irq_stubs:                          /* order matches idt.rs */
    .quad irq_timer, irq_device, irq_other, irq_spurious
irq_vec_stubs:                      /* VEC_COUNTED + i */
    .quad irq_vec_0, irq_vec_1, irq_vec_2, irq_vec_3
    .quad irq_vec_4, irq_vec_5, irq_vec_6, irq_vec_7

/* ------------------------------------------------------------------ */
/* Identity map of 0-4 GiB with 2 MiB pages, user-accessible (U/S),     */
/* writable; the top GiB (LAPIC, IOAPIC, other MMIO) uncached.           */
    .section .data.pagetables, "aw", @progbits
    .balign 4096
    .global pdpt
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x7
    .quad pd + 0x1000 + 0x7
    .quad pd + 0x2000 + 0x7
    .quad pd + 0x3000 + 0x7
    .fill 508, 8, 0
pd:
    .set pdi, 0
    .rept 2048
    .quad (pdi << 21) | 0x87 | ((pdi / 1536) * 0x18)
    .set pdi, pdi + 1
    .endr

/* TSSs (one per CPU, 128 bytes apart) sharing one all-zero I/O bitmap. */
    .section .data.tss, "aw", @progbits
    .balign 4096
tss_area:
    .fill MAX_CPUS * TSS_STRIDE, 1, 0
    .fill 8192, 1, 0
    .byte 0xff

    .section .data.keel_boot, "aw", @progbits
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff        /* 0x10 kernel data */
    .quad 0x00cff2000000ffff        /* 0x18 user data (DPL3) */
    .quad 0x00affa000000ffff        /* 0x20 user code, 64-bit (DPL3) */
    .quad 0x00cf9a000000ffff        /* 0x28 kernel code, 32-bit (AP trampoline) */
gdt_tss:
    .fill MAX_CPUS * 16, 1, 0       /* 0x30 + 16 * i: TSS of CPU i */
gdt_end:
    .balign 8
gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
    .balign 8
idt_ptr:
    .word 4095
    .quad idt

    .global ap_boot_index, fault_claimed, fault_info
    .global irq_timer_count, irq_device_count, irq_other_count, irq_vec_count
    .balign 8
ap_boot_index:      .long 0
fault_claimed:      .long 0
fault_info:         .fill 6, 8, 0   /* vector, error, rip, cs, rsp, cr2 */
irq_timer_count:    .quad 0
irq_device_count:   .quad 0
irq_other_count:    .quad 0
irq_vec_count:      .fill 8, 8, 0

    .section .bss.keel_idt, "aw", @nobits
    .balign 4096
    .global idt
idt:
    .skip 4096

    .section .stacks, "aw", @nobits
    .balign 4096
kstacks:
    .skip MAX_CPUS * KSTACK_SIZE
    .balign 16
    .skip BSPSTACK_SIZE
bsp_ustack_top:
ap_ustacks:                         /* AP i (i >= 1) uses [ap_ustacks + (i-1)*size, +size) */
    .skip (MAX_CPUS - 1) * APSTACK_SIZE
    .skip FSTACK_SIZE
fault_stack_top:
