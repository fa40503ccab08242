//! The debug-exit port: the guest ends the VM with a status of its choosing.

use std::sync::Arc;

use keel_bus::PioDevice;

use crate::exit::{ExitSignal, VmExit};

/// The debug-exit port (4 bytes wide).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Ends the VM with the value written (1, 2 or 4 bytes, little-endian) as exit status.
pub struct DebugExit(pub Arc<ExitSignal>);

impl PioDevice for DebugExit {
    fn pio_read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0)
    }
    fn pio_write(&self, offset: u64, data: &[u8]) {
        if offset != 0 {
            return;
        }
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        self.0.request(VmExit::DebugExit(u32::from_le_bytes(v)));
    }
}
