//! keel end to end with small PVH and ELF64 guests: serial, the ways a VM ends, signals.

mod support;

use std::time::Duration;

use keel_testutil::require_kvm;
use support::{pvh_guest, run_keel, Running, TempDir};

const LIMIT: Duration = Duration::from_secs(30);

/// Prints `text` on COM1 (32-bit code).
fn print(text: &str) -> String {
    let mut s = String::from("    mov $0x3f8, %dx\n");
    for b in text.bytes() {
        s.push_str(&format!("    mov ${b}, %al\n    out %al, %dx\n"));
    }
    s
}

#[test]
fn serial_output_and_debug_exit_status() {
    require_kvm!();
    let dir = TempDir::new("vmm");
    let body = format!(
        "{}    mov $42, %eax\n    out %eax, $0xf4\n    hlt\n",
        print("hello\n")
    );
    let guest = pvh_guest(&dir, &body);
    let out = run_keel(
        &["--kernel", guest.to_str().unwrap(), "--memory", "64"],
        LIMIT,
    );
    assert_eq!(out.stdout, "hello\n");
    assert_eq!(out.code(), Some(42), "stderr: {}", out.stderr);
    assert_eq!(out.stderr, "");
}

#[test]
fn serial_to_file() {
    require_kvm!();
    let dir = TempDir::new("vmm");
    let guest = pvh_guest(&dir, &format!("{}    out %al, $0xf4\n", print("to file\n")));
    let log = dir.path().join("serial.log");
    let out = run_keel(
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--serial",
            &format!("file={}", log.display()),
        ],
        LIMIT,
    );
    assert_eq!(out.stdout, "");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "to file\n");
    // `out %al` after printing leaves AL = '\n' = 10.
    assert_eq!(out.code(), Some(10));
}

/// Serial output to a file stops at its size limit: the rest is dropped, and keel says so
/// once on stderr (and how much it dropped at the end).
#[test]
fn serial_file_output_is_capped() {
    require_kvm!();
    let dir = TempDir::new("vmm");
    // 5000 'x' characters, then the debug-exit port.
    let body = "    mov $5000, %ecx\n    mov $0x3f8, %dx\n    mov $0x78, %al\n1:  out %al, %dx\n    loop 1b\n    mov $7, %eax\n    out %eax, $0xf4\n";
    let guest = pvh_guest(&dir, body);
    let log = dir.path().join("serial.log");
    let out = run_keel(
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--serial",
            &format!("file={},limit=1000", log.display()),
        ],
        LIMIT,
    );
    assert_eq!(out.code(), Some(7), "stderr: {}", out.stderr);
    assert_eq!(std::fs::read(&log).unwrap(), vec![b'x'; 1000]);
    assert_eq!(
        out.stderr
            .matches("reached its limit of 1000 bytes")
            .count(),
        1,
        "stderr: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("4000 bytes of serial output dropped"),
        "stderr: {}",
        out.stderr
    );
}

#[test]
fn i8042_reset_ends_cleanly() {
    require_kvm!();
    let dir = TempDir::new("vmm");
    let guest = pvh_guest(
        &dir,
        "    mov $0xfe, %al\n    out %al, $0x64\n1:  hlt\n    jmp 1b\n",
    );
    let out = run_keel(&["--kernel", guest.to_str().unwrap()], LIMIT);
    assert_eq!(out.code(), Some(0), "stderr: {}", out.stderr);
}

#[test]
fn acpi_s5_powers_off() {
    require_kvm!();
    let dir = TempDir::new("vmm");
    // SLP_TYP=5 | SLP_EN to PM1a_CNT.
    let guest = pvh_guest(
        &dir,
        "    mov $0x600, %dx\n    mov $0x3400, %ax\n    out %ax, %dx\n1:  hlt\n    jmp 1b\n",
    );
    let out = run_keel(&["--kernel", guest.to_str().unwrap()], LIMIT);
    assert_eq!(out.code(), Some(0), "stderr: {}", out.stderr);
}

#[test]
fn triple_fault_is_an_error_naming_the_rip() {
    require_kvm!();
    let dir = TempDir::new("vmm");
    // No IDT entries: ud2 escalates to a triple fault (or, on hosts whose KVM emulates CPL0
    // code, may end as an emulation failure; both must name the RIP).
    let guest = pvh_guest(&dir, "    nop\n    ud2\n");
    let out = run_keel(&["--kernel", guest.to_str().unwrap()], LIMIT);
    assert_eq!(out.code(), Some(1));
    let line = out.stderr.trim();
    assert!(
        line == "keel: vCPU 0 triple fault (KVM_EXIT_SHUTDOWN) at RIP 0x100001"
            || (line.contains("KVM internal error") && line.contains("RIP 0x100001")),
        "{line}"
    );
}

#[test]
fn elf64_payload_starts_in_long_mode_with_boot_params() {
    require_kvm!();
    let dir = TempDir::new("vmm");
    let path = dir.path().join("payload.elf");
    // No PVH note: 64-bit entry with RSI pointing at the zero page, whose setup header
    // carries "HdrS" at 0x202. The payload checks it and reports through the exit port.
    keel_testutil::assemble_elf(
        r#"
        .text
        .code64
        .globl _start
    _start:
        mov $0x3f8, %dx
        mov $'6', %al
        out %al, %dx
        mov $'4', %al
        out %al, %dx
        mov $1, %eax
        cmpl $0x53726448, 0x202(%rsi)
        jne 1f
        mov $7, %eax
    1:  out %eax, $0xf4
        hlt
        "#,
        0x20_0000,
        &path,
    );
    let out = run_keel(&["--kernel", path.to_str().unwrap()], LIMIT);
    assert_eq!(out.stdout, "64");
    assert_eq!(out.code(), Some(7), "stderr: {}", out.stderr);
}

#[test]
fn stdin_reaches_the_guest_uart() {
    require_kvm!();
    let dir = TempDir::new("vmm");
    // Print a prompt, poll LSR.DR, read one byte and exit with it.
    let body = format!(
        "{}    mov $0x3fd, %dx\n1:  in %dx, %al\n    test $1, %al\n    jz 1b\n    mov $0x3f8, %dx\n    in %dx, %al\n    movzbl %al, %eax\n    out %eax, $0xf4\n",
        print("> ")
    );
    let guest = pvh_guest(&dir, &body);
    let mut cmd = support::keel();
    cmd.args(["--kernel", guest.to_str().unwrap()]);
    let mut keel = Running::start(cmd);
    keel.wait_for("the prompt", LIMIT, |s| s.contains("> "));
    keel.input(b"A");
    let out = keel.finish(LIMIT);
    assert_eq!(out.code(), Some(i32::from(b'A')), "stderr: {}", out.stderr);
}

#[test]
fn sigterm_stops_a_running_guest() {
    require_kvm!();
    let dir = TempDir::new("vmm");
    let guest = pvh_guest(&dir, &format!("{}1:  jmp 1b\n", print("spinning\n")));
    let mut cmd = support::keel();
    cmd.args(["--kernel", guest.to_str().unwrap(), "--cpus", "2"]);
    let mut keel = Running::start(cmd);
    keel.wait_for("the guest to start", LIMIT, |s| s.contains("spinning"));
    keel.signal(15);
    let out = keel.finish(LIMIT);
    assert_eq!(out.code(), Some(128 + 15));
    assert_eq!(out.stderr.trim(), "keel: stopped by signal 15");
}

/// On a terminal keel switches to raw mode: one key, with no Enter, reaches the guest.
/// script(1) (util-linux) gives keel a pseudo-terminal.
#[test]
fn a_terminal_console_is_raw() {
    require_kvm!();
    let dir = TempDir::new("vmm");
    let body = format!(
        "{}    mov $0x3fd, %dx\n1:  in %dx, %al\n    test $1, %al\n    jz 1b\n    mov $0x3f8, %dx\n    in %dx, %al\n    movzbl %al, %eax\n    out %eax, $0xf4\n",
        print(">")
    );
    let guest = pvh_guest(&dir, &body);
    let mut cmd = std::process::Command::new("script");
    cmd.args([
        "-qec",
        &format!(
            "{} --debug-exit --kernel {}",
            env!("CARGO_BIN_EXE_keel"),
            guest.display()
        ),
        "/dev/null",
    ]);
    let mut keel = Running::start(cmd);
    keel.wait_for("the prompt", LIMIT, |s| s.contains('>'));
    keel.input(b"A");
    let out = keel.finish(LIMIT);
    assert_eq!(out.code(), Some(i32::from(b'A')), "stderr: {}", out.stderr);
}

/// The debug-exit write ends the guest at that instruction: nothing it would print after
/// the write reaches the console.
#[test]
fn debug_exit_stops_the_guest_at_once() {
    require_kvm!();
    let dir = TempDir::new("vmm");
    let body = format!(
        "{}    mov $3, %eax\n    out %eax, $0xf4\n{}1:  jmp 1b\n",
        print("before\n"),
        print("after\n")
    );
    let guest = pvh_guest(&dir, &body);
    let out = run_keel(&["--kernel", guest.to_str().unwrap()], LIMIT);
    assert_eq!(out.code(), Some(3));
    assert_eq!(out.stdout, "before\n");
}

/// Without `--debug-exit` the port is not there: a guest cannot choose keel's exit status.
/// The write goes nowhere and the guest runs on (here to an i8042 reset: status 0).
#[test]
fn without_the_option_the_debug_exit_port_is_absent() {
    require_kvm!();
    let dir = TempDir::new("vmm");
    let body = format!(
        "    mov $42, %eax\n    out %eax, $0xf4\n{}    mov $0xfe, %al\n    out %al, $0x64\n1:  hlt\n    jmp 1b\n",
        print("ran on\n")
    );
    let guest = pvh_guest(&dir, &body);
    let mut cmd = support::keel_without_debug_exit();
    cmd.args(["--kernel", guest.to_str().unwrap()]);
    let out = Running::start(cmd).finish(LIMIT);
    assert_eq!(out.stdout, "ran on\n", "stderr: {}", out.stderr);
    assert_eq!(out.code(), Some(0), "stderr: {}", out.stderr);
}

#[test]
fn sigint_stops_a_running_guest() {
    require_kvm!();
    let dir = TempDir::new("vmm");
    let guest = pvh_guest(&dir, &format!("{}1:  jmp 1b\n", print("spinning\n")));
    let mut cmd = support::keel();
    cmd.args(["--kernel", guest.to_str().unwrap()]);
    let mut keel = Running::start(cmd);
    keel.wait_for("the guest to start", LIMIT, |s| s.contains("spinning"));
    keel.signal(2);
    let out = keel.finish(LIMIT);
    assert_eq!(out.code(), Some(128 + 2));
    assert_eq!(out.stderr.trim(), "keel: stopped by signal 2");
}

#[test]
fn serial_none_discards_output() {
    require_kvm!();
    let dir = TempDir::new("vmm");
    let guest = pvh_guest(&dir, &format!("{}    out %al, $0xf4\n", print("unseen\n")));
    let out = run_keel(
        &["--kernel", guest.to_str().unwrap(), "--serial", "none"],
        LIMIT,
    );
    assert_eq!(out.stdout, "");
    assert_eq!(out.code(), Some(10), "stderr: {}", out.stderr);
}

/// Writes a 37-byte initrd starting with "INRD".
fn initrd(dir: &TempDir) -> std::path::PathBuf {
    let path = dir.path().join("initrd.img");
    let mut data = b"INRD".to_vec();
    data.resize(37, 0xa5);
    std::fs::write(&path, data).unwrap();
    path
}

/// Prints the 4 bytes at the address in `reg` on COM1 (32- or 64-bit code alike).
fn print_bytes_at(reg: &str) -> String {
    let mut s = String::from("    mov $0x3f8, %dx\n");
    for i in 0..4 {
        s.push_str(&format!("    movb {i}(%{reg}), %al\n    out %al, %dx\n"));
    }
    s
}

#[test]
fn pvh_guest_finds_the_initrd_in_its_module_list() {
    require_kvm!();
    let dir = TempDir::new("vmm");
    // hvm_start_info (EBX): nr_modules at 12, modlist_paddr at 16; a module entry holds
    // paddr at 0 and size at 8. Print the module's first bytes; exit with
    // nr_modules * 64 + size.
    let body = format!(
        "    mov 16(%ebx), %esi\n    mov (%esi), %edi\n{}    mov 12(%ebx), %eax\n    shl $6, %eax\n    add 8(%esi), %eax\n    out %eax, $0xf4\n    hlt\n",
        print_bytes_at("edi")
    );
    let guest = pvh_guest(&dir, &body);
    let rd = initrd(&dir);
    let out = run_keel(
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--initrd",
            rd.to_str().unwrap(),
        ],
        LIMIT,
    );
    assert_eq!(out.stdout, "INRD", "stderr: {}", out.stderr);
    assert_eq!(out.code(), Some(64 + 37), "stderr: {}", out.stderr);
}

#[test]
fn boot_params_carry_the_initrd() {
    require_kvm!();
    let dir = TempDir::new("vmm");
    let path = dir.path().join("payload.elf");
    // The zero page (RSI): ramdisk_image at 0x218, ramdisk_size at 0x21c.
    keel_testutil::assemble_elf(
        &format!(
            "    .text\n    .code64\n    .globl _start\n_start:\n    mov 0x218(%rsi), %edi\n{}    mov 0x21c(%rsi), %eax\n    out %eax, $0xf4\n    hlt\n",
            print_bytes_at("rdi")
        ),
        0x20_0000,
        &path,
    );
    let rd = initrd(&dir);
    let out = run_keel(
        &[
            "--kernel",
            path.to_str().unwrap(),
            "--initrd",
            rd.to_str().unwrap(),
        ],
        LIMIT,
    );
    assert_eq!(out.stdout, "INRD", "stderr: {}", out.stderr);
    assert_eq!(out.code(), Some(37), "stderr: {}", out.stderr);
}

#[test]
fn a_missing_initrd_is_a_clear_error() {
    require_kvm!();
    let dir = TempDir::new("vmm");
    let guest = pvh_guest(&dir, "    hlt\n");
    let out = run_keel(
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--initrd",
            "/nonexistent/initrd",
        ],
        LIMIT,
    );
    assert_eq!(out.code(), Some(1), "stderr: {}", out.stderr);
    assert!(out.stderr.starts_with("keel: "), "{}", out.stderr);
    assert!(
        out.stderr.contains("initrd") && out.stderr.contains("/nonexistent/initrd"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.stderr);
}

/// An initrd that is not a regular file is refused before it is read: `/dev/zero` (whose
/// stated size is 0) was read until the host ran out of memory.
#[test]
fn an_initrd_that_is_not_a_file_is_refused() {
    require_kvm!();
    let out = run_keel(&["--initrd", "/dev/zero"], LIMIT);
    assert_eq!(out.code(), Some(1), "stderr: {}", out.stderr);
    assert!(
        out.stderr
            .contains("the initrd /dev/zero is not a regular file"),
        "stderr: {}",
        out.stderr
    );
}
