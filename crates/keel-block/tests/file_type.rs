//! Only regular files and block devices are images. A FIFO, named as an image or as the
//! backing file a qcow2 image states, is refused at once: opening one for reading used to
//! wait for a writer for ever.

use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use keel_block::chain::Chain;
use keel_block::error::Unsupported;
use keel_block::image::{Format, Image, ImageOptions};
use keel_block::qcow2::{self, CreateOptions};
use keel_block::{Error, Qcow2Options, RawFile, RawOptions};

/// Runs `f` on another thread; fails the test if it does not return within 10 s.
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{what} did not return"))
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path; mkfifo reads it only.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

fn is_fifo_refusal<T>(r: &Result<T, Error>) -> bool {
    fn fifo(e: &Error) -> bool {
        match e {
            Error::Unsupported(Unsupported::FileType { kind, .. }) => *kind == "FIFO",
            Error::Backing { source, .. } => fifo(source),
            _ => false,
        }
    }
    r.as_ref().err().is_some_and(fifo)
}

#[test]
fn a_fifo_is_refused_as_an_image_and_as_a_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let p = fifo.clone();
    let r = within("opening a FIFO read-only", move || {
        RawFile::open(
            &p,
            RawOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .map(|_| ())
    });
    assert!(is_fifo_refusal(&r), "{:?}", r.as_ref().err());
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains(&format!("{}: a FIFO", fifo.display())),
        "the message names the file: {e}"
    );

    // A qcow2 overlay whose backing file is the FIFO, stated as raw.
    let top = dir.path().join("top.qcow2");
    qcow2::create_path(
        &top,
        &CreateOptions {
            size: 1 << 20,
            backing_file: Some(fifo.to_str().unwrap().to_string()),
            backing_format: Some(Format::Raw),
            ..Default::default()
        },
    )
    .unwrap();
    let t = top.clone();
    let r = within("opening the overlay", move || {
        Image::open(&t, Format::Qcow2, ImageOptions::default()).map(|_| ())
    });
    assert!(is_fifo_refusal(&r), "{:?}", r.as_ref().err());
    let t = top.clone();
    let r = within("opening the chain", move || {
        Chain::open(&t, Format::Qcow2, Qcow2Options::default()).map(|_| ())
    });
    assert!(is_fifo_refusal(&r), "{:?}", r.as_ref().err());
}
