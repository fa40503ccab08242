//! The i8042 keyboard controller, reduced to what guests use to reset the machine.

use std::sync::{Arc, Mutex, PoisonError};

use keel_bus::PioDevice;
use vm_superio::I8042Device;

use crate::exit::{ExitSignal, VmExit};

/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_CMD_PORT: u16 = 0x64;

/// Turns vm-superio's reset event into a VM exit.
struct ResetTrigger(Arc<ExitSignal>);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(VmExit::Reset);
        Ok(())
    }
}

/// The i8042 at ports 0x60 and 0x64 (insert it at 0x60 with length 5: offsets 0 and 4).
pub struct I8042(Mutex<I8042Device<ResetTrigger>>);

impl I8042 {
    /// An i8042 whose reset command (0xfe to port 0x64) ends the VM with [`VmExit::Reset`].
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        I8042(Mutex::new(I8042Device::new(ResetTrigger(exit))))
    }
}

impl PioDevice for I8042 {
    fn pio_read(&self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            0 | 4 => self
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .read(offset as u8),
            _ => 0xff,
        };
        data.fill(0);
        data[0] = v;
    }
    fn pio_write(&self, offset: u64, data: &[u8]) {
        if matches!(offset, 0 | 4) && data.len() == 1 {
            let mut dev = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            let _ = dev.write(offset as u8, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_reset() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let dev = I8042::new(exit.clone());
        dev.pio_write(4, &[0x20]); // read command byte: harmless
        assert!(exit.reason().is_none());
        dev.pio_write(4, &[0xfe]);
        assert!(matches!(exit.reason(), Some(VmExit::Reset)));
    }
}
