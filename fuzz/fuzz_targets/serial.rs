//! keel's COM1 (a 16550 UART from vm-superio behind keel's port device) under arbitrary
//! guest port accesses (any offset in its 8 ports, 1 to 4 bytes) and host input, with its
//! output going to a size-capped file as with `--serial file:...`.
//!
//! Checks, against a model of the UART's data path: the file holds exactly the bytes the
//! guest transmitted (writes to offset 0 with DLAB clear, outside loopback), cut at the
//! cap; reads of the receive register return the host input and looped-back bytes in
//! order; the receive FIFO never holds more than its 64 bytes; nothing panics.
#![no_main]

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use keel_bus::PioDevice;
use keel_fuzz::irq::NullLine;
use keel_vmm::devices::{CappedFile, Serial, SerialOutput};
use libfuzzer_sys::fuzz_target;

const FIFO: usize = 64;
const CAP: u64 = 200;
const LCR_DLAB: u8 = 0x80;
const MCR_LOOP: u8 = 0x10;

/// The output file, in a tmpfs, created once per process (truncated per input).
fn out_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("keel-fuzz-serial-{}", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = out_path();
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    let capped = Arc::new(CappedFile::new(file, path.clone(), CAP));
    let uart = Serial::new(Arc::new(NullLine), SerialOutput::File(capped.clone()));

    let mut lcr = 0x03u8;
    let mut mcr = 0x08u8;
    let mut sent = Vec::new();
    let mut rx: VecDeque<u8> = VecDeque::new();
    for op in data.chunks_exact(3) {
        let off = u64::from(op[0] & 7);
        let len = [1usize, 1, 2, 4][usize::from(op[0] >> 3 & 3)];
        let bytes = [op[2], op[1], op[2], op[1]];
        match op[0] >> 5 {
            0..=2 => {
                uart.pio_write(off, &bytes[..len]);
                let v = bytes[0];
                match off {
                    0 if lcr & LCR_DLAB == 0 => {
                        if mcr & MCR_LOOP != 0 {
                            if rx.len() < FIFO {
                                rx.push_back(v);
                            }
                        } else {
                            sent.push(v);
                        }
                    }
                    3 => lcr = v,
                    4 => mcr = v,
                    _ => {}
                }
            }
            3..=5 => {
                let mut buf = [0xaau8; 4];
                uart.pio_read(off, &mut buf[..len]);
                assert!(buf[1..len].iter().all(|&b| b == 0), "upper bytes read 0");
                if off == 0 && lcr & LCR_DLAB == 0 {
                    assert_eq!(buf[0], rx.pop_front().unwrap_or(0), "receive order");
                }
                if off == 5 {
                    assert_eq!(buf[0] & 1 != 0, !rx.is_empty(), "LSR data ready");
                }
            }
            6 => {
                let input = &op[1..1 + usize::from(op[2] % 3)];
                let room = uart.input_room();
                assert_eq!(room, FIFO - rx.len());
                let n = uart.enqueue_input(input);
                if mcr & MCR_LOOP == 0 {
                    assert_eq!(n, input.len().min(room));
                    rx.extend(&input[..n]);
                } else {
                    assert_eq!(n, 0, "no host input in loopback");
                }
            }
            _ => uart.flush().unwrap(),
        }
        assert!(rx.len() <= FIFO);
    }
    uart.flush().unwrap();
    let mut got = Vec::new();
    File::open(path).unwrap().read_to_end(&mut got).unwrap();
    let keep = sent.len().min(CAP as usize);
    assert_eq!(
        got,
        sent[..keep],
        "the file holds what the guest sent, capped"
    );
    assert_eq!(capped.dropped(), (sent.len() - keep) as u64);
});
