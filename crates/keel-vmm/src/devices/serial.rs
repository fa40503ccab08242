//! COM1: a 16550 UART (vm-superio) interrupting on ISA IRQ 4.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use keel_bus::interrupt::InterruptLine;
use keel_bus::PioDevice;
use vm_superio::serial::NoEvents;

/// COM1's base port.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's interrupt line (ISA IRQ 4, IOAPIC pin 4).
pub const COM1_IRQ: u32 = 4;

/// A file that takes at most `limit` bytes of serial output: a guest cannot fill the
/// host's disk. Past the limit, output is dropped and counted; the first drop is reported
/// once on stderr. Shared by every boot of the VM (the limit covers them all).
pub struct CappedFile {
    file: File,
    path: PathBuf,
    limit: u64,
    written: AtomicU64,
    dropped: AtomicU64,
}

impl CappedFile {
    /// Output to `file` (named `path` in messages), at most `limit` bytes.
    pub fn new(file: File, path: PathBuf, limit: u64) -> Self {
        CappedFile {
            file,
            path,
            limit,
            written: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Bytes dropped over the limit so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn write_capped(&self, buf: &[u8]) -> io::Result<usize> {
        let len = buf.len() as u64;
        // Only the UART (under its lock) writes: no two writers race for the room.
        let written = self.written.load(Ordering::Relaxed);
        let room = self.limit.saturating_sub(written).min(len);
        let n = if room > 0 {
            let n = (&self.file).write(&buf[..room as usize])?;
            self.written.fetch_add(n as u64, Ordering::Relaxed);
            if (n as u64) < room {
                // A short write: the caller retries the rest.
                return Ok(n);
            }
            n
        } else {
            0
        };
        let over = len - n as u64;
        if over > 0 && self.dropped.fetch_add(over, Ordering::Relaxed) == 0 {
            eprintln!(
                "keel: serial output to {} reached its limit of {} bytes; further output is dropped",
                self.path.display(),
                self.limit
            );
        }
        Ok(buf.len())
    }
}

/// Where the guest's serial output goes.
pub enum SerialOutput {
    /// keel's standard output.
    Stdout,
    /// A file, up to its size limit.
    File(Arc<CappedFile>),
    /// Discarded.
    Sink,
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            // Unbuffered on purpose: the guest's output must appear as it is produced.
            SerialOutput::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(buf)?;
                out.flush()?;
                Ok(buf.len())
            }
            SerialOutput::File(f) => f.write_capped(buf),
            SerialOutput::Sink => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            SerialOutput::Stdout => io::stdout().flush(),
            SerialOutput::File(f) => (&f.file).flush(),
            SerialOutput::Sink => Ok(()),
        }
    }
}

/// Raises the UART's interrupt: an edge on its line (an irqfd with KVM's irqchip, keel's
/// IOAPIC with the split one).
pub struct LineTrigger(pub Arc<dyn InterruptLine>);

impl vm_superio::Trigger for LineTrigger {
    type E = keel_bus::interrupt::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.trigger()
    }
}

type Uart = vm_superio::Serial<LineTrigger, NoEvents, SerialOutput>;

/// The UART on the port bus (8 ports at [`COM1_PORT`]).
pub struct Serial(Mutex<Uart>);

impl Serial {
    /// A UART writing to `out` and interrupting through `line`.
    pub fn new(line: Arc<dyn InterruptLine>, out: SerialOutput) -> Self {
        Serial(Mutex::new(vm_superio::Serial::new(LineTrigger(line), out)))
    }

    fn uart(&self) -> std::sync::MutexGuard<'_, Uart> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues host input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&self, bytes: &[u8]) -> usize {
        let mut uart = self.uart();
        let room = uart.fifo_capacity().min(bytes.len());
        match uart.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial input dropped: {e:?}");
                0
            }
        }
    }

    /// Free space in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart().fifo_capacity()
    }

    /// Flushes buffered output.
    pub fn flush(&self) -> io::Result<()> {
        self.uart().writer_mut().flush()
    }
}

impl PioDevice for Serial {
    fn pio_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(off), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.uart().read(off);
        }
    }
    fn pio_write(&self, offset: u64, data: &[u8]) {
        if let (Ok(off), Some(&v)) = (u8::try_from(offset), data.first()) {
            if let Err(e) = self.uart().write(off, v) {
                log::warn!("serial: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts the edges raised on it.
    #[derive(Default)]
    struct Edges(std::sync::atomic::AtomicU64);

    impl InterruptLine for Edges {
        fn trigger(&self) -> keel_bus::interrupt::Result<()> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
        fn set_level(&self, _: bool) -> keel_bus::interrupt::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_the_file_and_input_raises_the_interrupt() {
        let dir = std::env::temp_dir().join(format!("keel-serial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out");
        let irq = Arc::new(Edges::default());
        let uart = Serial::new(
            irq.clone(),
            SerialOutput::File(Arc::new(CappedFile::new(
                File::create(&path).unwrap(),
                path.clone(),
                1 << 20,
            ))),
        );
        for b in b"hi\n" {
            uart.pio_write(0, &[*b]);
        }
        uart.flush().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hi\n");

        // Enable the "received data available" interrupt, then feed input.
        uart.pio_write(1, &[0x01]);
        assert_eq!(uart.enqueue_input(b"ok"), 2);
        assert!(irq.0.load(std::sync::atomic::Ordering::SeqCst) >= 1);
        let mut b = [0u8];
        uart.pio_read(0, &mut b);
        assert_eq!(b, [b'o']);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn file_output_stops_at_the_limit_and_counts_the_rest() {
        let dir = std::env::temp_dir().join(format!("keel-serial-cap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out");
        let file = Arc::new(CappedFile::new(
            File::create(&path).unwrap(),
            path.clone(),
            5,
        ));
        let mut out = SerialOutput::File(file.clone());
        out.write_all(b"abc").unwrap();
        out.write_all(b"defg").unwrap();
        out.write_all(b"h").unwrap();
        // A second output on the same file (the next boot) shares the limit.
        let mut again = SerialOutput::File(file.clone());
        again.write_all(b"ij").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"abcde");
        assert_eq!(file.dropped(), 5);
        std::fs::remove_dir_all(&dir).ok();
    }
}
