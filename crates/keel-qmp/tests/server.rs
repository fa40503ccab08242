//! The server end to end over real sockets: negotiation per client, dispatch, events,
//! bad input, limits.

use std::io::{BufRead, BufReader, Lines, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use keel_qmp::{Arguments, CommandError, Handler, Options, Server};
use serde_json::{json, Value};

/// Counts `bump`s; `slow` takes a while (a client can vanish meanwhile).
#[derive(Default)]
struct Counter(AtomicU64);

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct By {
    by: u64,
}

impl Handler for Counter {
    fn commands(&self) -> &[&'static str] {
        &["bump", "slow"]
    }
    fn execute(&self, command: &str, args: Arguments) -> Result<Value, CommandError> {
        match command {
            "bump" => {
                let by: By = args.parse()?;
                Ok(json!(self.0.fetch_add(by.by, Ordering::SeqCst) + by.by))
            }
            _ => {
                std::thread::sleep(Duration::from_millis(200));
                Ok(json!(self.0.load(Ordering::SeqCst)))
            }
        }
    }
}

struct Client {
    w: UnixStream,
    r: Lines<BufReader<UnixStream>>,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let w = UnixStream::connect(path).unwrap();
        w.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let r = BufReader::new(w.try_clone().unwrap()).lines();
        let mut c = Client { w, r };
        assert!(c.recv()["QMP"]["capabilities"].is_array());
        c
    }
    fn recv(&mut self) -> Value {
        serde_json::from_str(&self.r.next().unwrap().unwrap()).unwrap()
    }
    fn send(&mut self, raw: &[u8]) -> Value {
        self.w.write_all(raw).unwrap();
        self.recv()
    }
    fn negotiate(&mut self) {
        assert_eq!(
            self.send(br#"{"execute":"qmp_capabilities"}"#),
            json!({"return": {}})
        );
    }
}

fn class(v: &Value) -> &str {
    v["error"]["class"].as_str().unwrap_or("")
}

fn server(options: Options) -> (tempfile::TempDir, std::path::PathBuf, Server, Arc<Counter>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp");
    let h = Arc::new(Counter::default());
    let s = Server::bind(&path, h.clone(), options).unwrap();
    (dir, path, s, h)
}

#[test]
fn negotiation_dispatch_and_errors() {
    let (_d, path, server, _) = server(Options::default());
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let mut c = Client::connect(&path);
    let r = c.send(br#"{"execute":"bump","arguments":{"by":1},"id":"x"}"#);
    assert_eq!(class(&r), "CommandNotFound");
    assert_eq!(r["id"], "x");
    c.negotiate();
    assert_eq!(
        class(&c.send(br#"{"execute":"qmp_capabilities"}"#)),
        "CommandNotFound"
    );
    assert_eq!(
        c.send(br#"{"execute":"bump","arguments":{"by":2},"id":[1,{"a":2}]}"#),
        json!({"return": 2, "id": [1, {"a": 2}]})
    );
    for bad in [
        &br#"{"execute":"bump","arguments":{"by":"two"}}"#[..],
        br#"{"execute":"bump","arguments":{"by":1,"extra":0}}"#,
        br#"{"execute":"bump"}"#,
        br#"{"execute":"query-version","arguments":{"x":1}}"#,
        b"{\"execute\": nonsense}",
        b"[1,2]",
        b"}",
        b"\"just a string\"",
    ] {
        assert_eq!(class(&c.send(bad)), "GenericError", "{bad:?}");
    }
    assert_eq!(
        class(&c.send(br#"{"execute":"frobnicate"}"#)),
        "CommandNotFound"
    );
    let cmds = c.send(br#"{"execute":"query-commands"}"#);
    let names: Vec<&str> = cmds["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "qmp_capabilities",
            "query-version",
            "query-commands",
            "bump",
            "slow"
        ]
    );
    // Still serving after all that.
    assert_eq!(
        c.send(br#"{"execute":"bump","arguments":{"by":1}}"#),
        json!({"return": 3})
    );
    server.close();
}

#[test]
fn events_reach_negotiated_clients_only() {
    let (_d, path, server, _) = server(Options::default());
    let mut a = Client::connect(&path);
    let mut b = Client::connect(&path);
    a.negotiate();
    server.events().emit("RESUME", None);
    assert_eq!(a.recv()["event"], "RESUME");
    // b has not negotiated: its next message is the reply to its own command.
    b.negotiate();
    server.events().emit(
        "SHUTDOWN",
        Some(json!({"guest": false, "reason": "host-qmp-quit"})),
    );
    for c in [&mut a, &mut b] {
        let e = c.recv();
        assert_eq!(e["data"]["reason"], "host-qmp-quit");
        assert!(e["timestamp"]["seconds"].as_u64().unwrap() > 0);
    }
    server.close();
}

#[test]
fn oversized_messages_vanishing_clients_and_crowds_leave_others_served() {
    let (_d, path, server, h) = server(Options {
        max_message: 4096,
        max_clients: 8,
        ..Default::default()
    });
    let mut good = Client::connect(&path);
    good.negotiate();

    // Over the limit: an error, then the connection is closed.
    let mut big = Client::connect(&path);
    let mut msg = br#"{"execute":"bump","arguments":{"by":1,"pad":""#.to_vec();
    msg.extend(std::iter::repeat_n(b'x', 8192));
    let r = big.send(&msg);
    assert_eq!(class(&r), "GenericError");
    // EOF, or a reset: the server closed with unread input.
    assert!(
        !matches!(big.r.next(), Some(Ok(_))),
        "dropped after an oversized message"
    );

    // A client that sends a slow command and vanishes.
    {
        let mut gone = Client::connect(&path);
        gone.negotiate();
        gone.w.write_all(br#"{"execute":"slow"}"#).unwrap();
    }

    // A crowd: more connections than allowed; the extra ones are closed at once.
    let crowd: Vec<UnixStream> = (0..20)
        .map(|_| UnixStream::connect(&path).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert!(server.clients() <= 8);
    drop(crowd);

    assert_eq!(
        good.send(br#"{"execute":"bump","arguments":{"by":5}}"#),
        json!({"return": 5})
    );
    assert_eq!(h.0.load(Ordering::SeqCst), 5);
    server.close();
}

#[test]
fn finish_commands_answers_what_is_in_progress_then_events_still_go_out() {
    let (_d, path, mut server, _) = server(Options::default());
    let mut c = Client::connect(&path);
    c.negotiate();
    c.w.write_all(br#"{"execute":"slow","id":1}"#).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    server.finish_commands();
    assert_eq!(c.recv(), json!({"return": 0, "id": 1}));
    server
        .events()
        .emit("SHUTDOWN", Some(json!({"guest": false})));
    assert_eq!(c.recv()["event"], "SHUTDOWN");
    server.close();
    assert!(c.r.next().is_none());
}

/// Events never wait for a client to read: one that stops reading is cut off once its
/// socket is full, at once rather than after the write timeout (an hour here), also while
/// a reply to it is stuck in a full socket; a client that reads gets every event.
#[test]
fn a_client_that_stops_reading_is_cut_off_without_holding_up_events() {
    let (_d, path, server, _) = server(Options {
        write_timeout: Duration::from_secs(3600),
        ..Default::default()
    });
    let mut reading = Client::connect(&path);
    reading.negotiate();
    let mut stalled = Client::connect(&path);
    stalled.negotiate();
    // A client that stops reading with replies outstanding: the server's thread for it
    // ends up waiting (for the write timeout) to write a reply into its full socket.
    let mut stuck = Client::connect(&path);
    stuck.negotiate();
    let mut w = stuck.w.try_clone().unwrap();
    std::thread::spawn(move || {
        let cmd = br#"{"execute":"query-commands"}"#.repeat(20000);
        let _ = w.write_all(&cmd);
    });
    std::thread::sleep(Duration::from_millis(500));
    // 64 events of 16 KiB: far more than a socket holds unread. The reading client
    // acknowledges each before the next is sent.
    const EVENTS: usize = 64;
    let pad = "x".repeat(16 * 1024);
    let events = server.events();
    let (ack, acked) = std::sync::mpsc::channel::<()>();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for i in 0..EVENTS {
            events.emit("TEST_EVENT", Some(json!({"i": i, "pad": pad})));
            if acked.recv().is_err() {
                return;
            }
        }
        let _ = done.send(());
    });
    for i in 0..EVENTS {
        let e = reading.recv();
        assert_eq!(e["event"], "TEST_EVENT");
        assert_eq!(e["data"]["i"], i);
        ack.send(()).unwrap();
    }
    assert!(
        finished.recv_timeout(Duration::from_secs(60)).is_ok(),
        "emitting waited for a client that does not read"
    );
    // The stalled client gets what fitted, then the end of the stream.
    let mut got = 0;
    while let Some(Ok(line)) = stalled.r.next() {
        let e: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(e["data"]["i"], got);
        got += 1;
    }
    assert!(
        got < EVENTS,
        "all {got} events fitted: the test proves nothing"
    );
    // The reading client is still served.
    assert_eq!(
        reading.send(br#"{"execute":"bump","arguments":{"by":2}}"#),
        json!({"return": 2})
    );
    server.close();
}

/// Something already at the path is named, and left alone: a regular file, a directory,
/// and the socket of a server still running (binding over any of them said "Address
/// already in use").
#[test]
fn a_path_already_taken_is_named_and_left_alone() {
    let (dir, live, s, _) = server(Options::default());
    let file = dir.path().join("r.img");
    std::fs::write(&file, b"keep").unwrap();
    for (path, what) in [
        (&file, "a regular file"),
        (&dir.path().to_path_buf(), "a directory"),
        (&live, "a socket"),
    ] {
        let h = Arc::new(Counter::default());
        let e = Server::bind(path, h, Options::default())
            .err()
            .expect("refused");
        assert!(
            matches!(&e, keel_qmp::server::Error::Exists { what: w, .. } if *w == what),
            "{path:?}: {e}"
        );
        assert!(e.to_string().contains("already exists"), "{e}");
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    // The running server still answers.
    assert!(UnixStream::connect(&live).is_ok());
    s.close();
}
