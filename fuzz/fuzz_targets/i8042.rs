//! keel's i8042 (vm-superio's, reduced to the CPU reset line) under arbitrary port
//! accesses: any offset in its 5 ports, 1 to 4 bytes.
//!
//! Checks: the VM is asked to reset exactly when the guest wrote the one-byte command
//! 0xfe to the command port (offset 4), and never for any other reason; every read fills
//! the whole buffer; nothing panics.
#![no_main]

use std::sync::Arc;

use keel_bus::PioDevice;
use keel_vmm::devices::I8042;
use keel_vmm::exit::{ExitSignal, VmExit};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let exit = Arc::new(ExitSignal::new().unwrap());
    let dev = I8042::new(exit.clone());
    let mut reset = false;
    for op in data.chunks_exact(2) {
        let off = u64::from(op[0] % 5);
        let len = [1usize, 2, 4, 1][usize::from(op[0] >> 3 & 3)];
        let bytes = [op[1]; 4];
        if op[0] & 0x80 != 0 {
            dev.pio_write(off, &bytes[..len]);
            reset |= off == 4 && len == 1 && op[1] == 0xfe;
        } else {
            let mut buf = [0xaau8; 4];
            dev.pio_read(off, &mut buf[..len]);
            assert!(buf[1..len].iter().all(|&b| b == 0), "upper bytes read 0");
            if !matches!(off, 0 | 4) {
                assert_eq!(buf[0], 0xff, "unused ports float");
            }
        }
        match exit.reason() {
            None => assert!(!reset, "0xfe to the command port resets"),
            Some(VmExit::Reset) => assert!(reset, "reset without the command"),
            Some(other) => panic!("the i8042 asked for {other:?}"),
        }
    }
});
