//! The server: a listening Unix socket, a thread per client, capabilities negotiation per
//! client, dispatch to the VMM's [`Handler`], and events to every negotiated client.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{CommandError, ErrorClass};
use crate::message::{self, VersionInfo};
use crate::stream::{SplitError, Splitter};

/// Errors setting up or running the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Creating, binding or listening on the socket failed.
    #[error("cannot listen on {path}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Something is already at the socket path; the server neither replaces nor removes
    /// it (a socket there may be another VMM's).
    #[error("{} already exists ({what}): choose another path, or remove it if nothing uses it", path.display())]
    Exists {
        /// The socket path.
        path: PathBuf,
        /// What is there: "a socket", "a regular file", "a directory", ...
        what: &'static str,
    },
    /// The socket path does not fit in `sockaddr_un`.
    #[error("socket path {0} is too long")]
    PathTooLong(PathBuf),
    /// An OS resource (eventfd, thread, socket option) could not be set up.
    #[error("cannot set up {what}")]
    Os {
        /// What was being set up.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Result alias for the server.
pub type Result<T> = std::result::Result<T, Error>;

/// A command's arguments.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Arguments(pub Map<String, Value>);

impl Arguments {
    /// Deserializes the arguments into `T` (derive `Deserialize` with
    /// `#[serde(deny_unknown_fields)]` to refuse unexpected members). A mismatch is a
    /// `GenericError` naming it.
    pub fn parse<T: DeserializeOwned>(self) -> std::result::Result<T, CommandError> {
        serde_json::from_value(Value::Object(self.0))
            .map_err(|e| CommandError::generic(format!("Invalid arguments: {e}")))
    }

    /// Refuses any argument: for commands that take none.
    pub fn none(self) -> std::result::Result<(), CommandError> {
        match self.0.keys().next() {
            None => Ok(()),
            Some(k) => Err(CommandError::generic(format!(
                "Parameter '{k}' is unexpected"
            ))),
        }
    }
}

/// What a VMM implements: its commands. The protocol's own (`qmp_capabilities`,
/// `query-version`, `query-commands`) are answered by the server.
pub trait Handler: Send + Sync {
    /// The names of the commands [`Handler::execute`] implements.
    fn commands(&self) -> &[&'static str];
    /// Runs `command` (one of [`Handler::commands`]) and returns its `return` value.
    /// Called from the client's thread; several clients may call at once.
    fn execute(
        &self,
        command: &str,
        arguments: Arguments,
    ) -> std::result::Result<Value, CommandError>;
}

/// Server settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// Announced in the greeting and returned by `query-version`.
    pub version: VersionInfo,
    /// The longest message a client may send, in bytes; a longer one gets an error and
    /// the client is dropped (the stream cannot be resynchronised).
    pub max_message: usize,
    /// Clients served at once; further connections are closed at once.
    pub max_clients: usize,
    /// How long a reply to a client may block before the client is dropped. Events never
    /// wait: a client with no room for one is dropped at once (see [`Events::emit`]).
    pub write_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            version: VersionInfo::default(),
            max_message: 1 << 20,
            max_clients: 64,
            write_timeout: Duration::from_secs(5),
        }
    }
}

const BUILTIN: [&str; 3] = ["qmp_capabilities", "query-version", "query-commands"];

struct Client {
    stream: UnixStream,
    writer: Mutex<UnixStream>,
    /// Events that arrived while another thread held `writer` (a reply being written);
    /// whoever holds `writer` next sends them.
    pending: Mutex<Vec<u8>>,
    negotiated: AtomicBool,
}

/// Events held for one client at most: a client with more unsent (it has stopped
/// reading while a reply to it was being written) is cut off.
const MAX_PENDING: usize = 1 << 20;

impl Client {
    fn writer(&self) -> MutexGuard<'_, UnixStream> {
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pending(&self) -> MutexGuard<'_, Vec<u8>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends one message (a reply or the greeting), waiting up to the write timeout for
    /// room, then the events queued meanwhile; on failure the client is cut off (its
    /// reader then ends).
    fn send(&self, msg: &Value) -> bool {
        let mut bytes = msg.to_string().into_bytes();
        bytes.extend_from_slice(b"\r\n");
        let mut w = self.writer();
        let mut ok = w.write_all(&bytes).is_ok();
        if ok {
            let events = std::mem::take(&mut *self.pending());
            ok = w.write_all(&events).is_ok();
        }
        drop(w);
        if !ok {
            self.cut_off();
            return false;
        }
        // An event queued after the take above found `writer` held: send it now.
        self.flush_events();
        true
    }

    /// Queues one event and sends what is queued without waiting for room: a client
    /// whose socket is full has not read hundreds of kilobytes, and whoever emits (often
    /// the VMM's event loop) must not wait on it; it is cut off instead. If a reply is
    /// being written to the client, the thread writing it sends the event afterwards.
    fn send_event(&self, bytes: &[u8]) {
        {
            let mut p = self.pending();
            if p.len() + bytes.len() > MAX_PENDING {
                drop(p);
                self.cut_off();
                return;
            }
            p.extend_from_slice(bytes);
        }
        self.flush_events();
    }

    /// Sends the queued events now, unless another thread holds `writer` (it sends them
    /// when it is done). All or nothing: a part of a message would leave the stream out
    /// of step, so a socket without room for all of them cuts the client off.
    fn flush_events(&self) {
        loop {
            {
                let w = match self.writer.try_lock() {
                    Ok(w) => w,
                    Err(TryLockError::Poisoned(p)) => p.into_inner(),
                    // The holder looks at `pending` after it lets go.
                    Err(TryLockError::WouldBlock) => return,
                };
                let events = std::mem::take(&mut *self.pending());
                if !events.is_empty() {
                    // SAFETY: `events` is a live buffer of `events.len()` bytes and `w` an
                    // open socket; MSG_DONTWAIT returns instead of blocking, MSG_NOSIGNAL
                    // reports a closed peer as EPIPE instead of raising SIGPIPE.
                    let n = unsafe {
                        libc::send(
                            w.as_raw_fd(),
                            events.as_ptr().cast(),
                            events.len(),
                            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                        )
                    };
                    if usize::try_from(n).ok() != Some(events.len()) {
                        drop(w);
                        self.cut_off();
                        return;
                    }
                }
            }
            // An event queued while `writer` was held here found it held and left it to
            // this thread; one queued from now on finds it free.
            if self.pending().is_empty() {
                return;
            }
        }
    }

    /// Closes the connection both ways: the client's reader ends, and so do its writes.
    fn cut_off(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

struct Shared {
    handler: Arc<dyn Handler>,
    options: Options,
    clients: Mutex<HashMap<u64, Arc<Client>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    next_id: AtomicU64,
    /// Set by `finish_commands`: client threads that end leave their client registered,
    /// so events still reach it until `close`.
    finishing: AtomicBool,
}

impl Shared {
    fn clients(&self) -> MutexGuard<'_, HashMap<u64, Arc<Client>>> {
        self.clients.lock().unwrap_or_else(PoisonError::into_inner)
    }
    fn threads(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Sends events to every negotiated client. Cheap to clone.
#[derive(Clone)]
pub struct Events(Arc<Shared>);

impl Events {
    /// Sends event `name` with `data` (if the event carries any), time-stamped now.
    /// Never waits for a client to read: one whose socket has no room for the event is
    /// cut off (it has left hundreds of kilobytes unread).
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let msg = message::event(name, data, SystemTime::now());
        let mut bytes = msg.to_string().into_bytes();
        bytes.extend_from_slice(b"\r\n");
        let clients: Vec<Arc<Client>> = self.0.clients().values().cloned().collect();
        for c in clients {
            if c.negotiated.load(Ordering::SeqCst) {
                c.send_event(&bytes);
            }
        }
    }
}

/// A QMP server on a listening Unix socket.
///
/// # Examples
///
/// ```
/// use std::io::{BufRead, BufReader, Write};
/// use std::os::unix::net::UnixStream;
/// use std::sync::Arc;
/// use keel_qmp::{Arguments, CommandError, Handler, Options, Server};
/// use serde_json::{json, Value};
///
/// struct Vmm;
/// impl Handler for Vmm {
///     fn commands(&self) -> &[&'static str] {
///         &["query-status"]
///     }
///     fn execute(&self, _: &str, args: Arguments) -> Result<Value, CommandError> {
///         args.none()?;
///         Ok(json!({"status": "running", "running": true}))
///     }
/// }
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("qmp.sock");
/// let server = Server::bind(&path, Arc::new(Vmm), Options::default())?;
/// let mut client = UnixStream::connect(&path)?;
/// let mut lines = BufReader::new(client.try_clone()?).lines();
/// let greeting: Value = serde_json::from_str(&lines.next().unwrap()?)?;
/// assert!(greeting["QMP"]["version"].is_object());
/// client.write_all(br#"{"execute": "qmp_capabilities"}{"execute": "query-status", "id": 1}"#)?;
/// let _: Value = serde_json::from_str(&lines.next().unwrap()?)?;
/// let reply: Value = serde_json::from_str(&lines.next().unwrap()?)?;
/// assert_eq!(reply, json!({"return": {"status": "running", "running": true}, "id": 1}));
/// server.events().emit("STOP", None);
/// let event: Value = serde_json::from_str(&lines.next().unwrap()?)?;
/// assert_eq!(event["event"], "STOP");
/// server.close();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Server {
    shared: Arc<Shared>,
    stop: EventFd,
    acceptor: Option<JoinHandle<()>>,
}

/// A listening Unix socket at `path` whose file is created with mode 0600: the socket's
/// inode mode is set before `bind`, which is what `bind` gives the file (less the
/// umask), so there is no moment when others may connect.
fn listen_private(path: &Path) -> Result<UnixListener> {
    let listen = |source| Error::Listen {
        path: path.to_path_buf(),
        source,
    };
    // SAFETY: plain socket(2); the result is checked and owned at once.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(listen(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fchmod on a descriptor we own.
    if unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) } < 0 {
        return Err(listen(io::Error::last_os_error()));
    }
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(Error::PathTooLong(path.to_path_buf()));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `addr` is an initialised sockaddr_un and the length is its size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EADDRINUSE) {
            if let Ok(m) = std::fs::symlink_metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                let t = m.file_type();
                let what = if t.is_socket() {
                    "a socket"
                } else if t.is_file() {
                    "a regular file"
                } else if t.is_dir() {
                    "a directory"
                } else if t.is_symlink() {
                    "a symbolic link"
                } else {
                    "a special file"
                };
                return Err(Error::Exists {
                    path: path.to_path_buf(),
                    what,
                });
            }
        }
        return Err(listen(e));
    }
    // SAFETY: listen(2) on our bound socket.
    if unsafe { libc::listen(fd.as_raw_fd(), libc::SOMAXCONN) } < 0 {
        return Err(listen(io::Error::last_os_error()));
    }
    Ok(UnixListener::from(fd))
}

impl Server {
    /// Creates the socket at `path` (mode 0600; an existing file there is an error) and
    /// starts serving.
    pub fn bind(path: &Path, handler: Arc<dyn Handler>, options: Options) -> Result<Server> {
        Self::serve(listen_private(path)?, handler, options)
    }

    /// Serves on a listening socket made by someone else (an inherited descriptor).
    pub fn serve(
        listener: UnixListener,
        handler: Arc<dyn Handler>,
        options: Options,
    ) -> Result<Server> {
        let os = |what| move |source| Error::Os { what, source };
        listener
            .set_nonblocking(true)
            .map_err(os("a non-blocking listener"))?;
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(os("an eventfd"))?;
        let stop_fd = stop.try_clone().map_err(os("an eventfd"))?;
        let shared = Arc::new(Shared {
            handler,
            options,
            clients: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
            finishing: AtomicBool::new(false),
        });
        let s = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("keel-qmp".into())
            .spawn(move || accept_loop(&s, &listener, &stop_fd))
            .map_err(os("the QMP thread"))?;
        Ok(Server {
            shared,
            stop,
            acceptor: Some(acceptor),
        })
    }

    /// A handle for sending events.
    pub fn events(&self) -> Events {
        Events(self.shared.clone())
    }

    /// Clients connected now.
    pub fn clients(&self) -> usize {
        self.shared.clients().len()
    }

    /// Stops accepting, stops reading commands and waits for the commands in progress to
    /// be answered. Events can still be sent afterwards (a VMM sends `SHUTDOWN` here).
    pub fn finish_commands(&mut self) {
        if let Some(t) = self.acceptor.take() {
            let _ = self.stop.write(1);
            let _ = t.join();
        }
        self.shared.finishing.store(true, Ordering::SeqCst);
        for c in self.shared.clients().values() {
            let _ = c.stream.shutdown(std::net::Shutdown::Read);
        }
        let threads = std::mem::take(&mut *self.shared.threads());
        for t in threads {
            let _ = t.join();
        }
    }

    /// Finishes the commands in progress and disconnects every client.
    pub fn close(mut self) {
        self.finish_commands();
        for (_, c) in self.shared.clients().drain() {
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.finish_commands();
        for (_, c) in self.shared.clients().drain() {
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &UnixListener, stop: &EventFd) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("QMP: poll failed: {}", io::Error::last_os_error());
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of descriptors, say: keep serving the clients we have.
                log::warn!("QMP: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        shared.threads().retain(|t| !t.is_finished());
        if shared.clients().len() >= shared.options.max_clients {
            drop(stream);
            continue;
        }
        if let Err(e) = start_client(shared, stream) {
            log::warn!("QMP: cannot serve a client: {e}");
        }
    }
}

fn start_client(shared: &Arc<Shared>, stream: UnixStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(shared.options.write_timeout))?;
    let client = Arc::new(Client {
        writer: Mutex::new(stream.try_clone()?),
        pending: Mutex::new(Vec::new()),
        stream,
        negotiated: AtomicBool::new(false),
    });
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    shared.clients().insert(id, client.clone());
    let s = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("keel-qmp-client".into())
        .spawn(move || {
            serve_client(&s, &client);
            if !s.finishing.load(Ordering::SeqCst) {
                s.clients().remove(&id);
            }
        });
    match spawned {
        Ok(t) => {
            shared.threads().push(t);
            Ok(())
        }
        Err(e) => {
            shared.clients().remove(&id);
            Err(e)
        }
    }
}

fn serve_client(shared: &Shared, client: &Client) {
    if !client.send(&message::greeting(&shared.options.version)) {
        return;
    }
    let mut splitter = Splitter::new(shared.options.max_message);
    let mut buf = [0u8; 4096];
    let mut reader = &client.stream;
    loop {
        while let Some(next) = splitter.next_value() {
            let reply = match next {
                Ok(bytes) => answer(shared, client, &bytes),
                Err(e @ SplitError::Unbalanced(_)) => message::error_reply(
                    &CommandError::generic(format!("JSON parse error, {e}")),
                    None,
                ),
                Err(e @ SplitError::TooLong { .. }) => {
                    let err = CommandError::generic(format!("JSON parse error, {e}"));
                    client.send(&message::error_reply(&err, None));
                    let _ = client.stream.shutdown(std::net::Shutdown::Both);
                    return;
                }
            };
            if !client.send(&reply) {
                return;
            }
        }
        match reader.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => splitter.push(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// The reply to one message.
fn answer(shared: &Shared, client: &Client, bytes: &[u8]) -> Value {
    let request = match message::parse_request(bytes) {
        Ok(r) => r,
        Err(r) => return message::error_reply(&r.error, r.id),
    };
    let id = request.id;
    let result = dispatch(
        shared,
        client,
        &request.command,
        Arguments(request.arguments),
    );
    match result {
        Ok(v) => message::reply(v, id),
        Err(e) => message::error_reply(&e, id),
    }
}

fn dispatch(
    shared: &Shared,
    client: &Client,
    command: &str,
    args: Arguments,
) -> std::result::Result<Value, CommandError> {
    if !client.negotiated.load(Ordering::SeqCst) {
        if command != "qmp_capabilities" {
            return Err(CommandError::new(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ));
        }
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Caps {
            #[serde(default)]
            enable: Vec<String>,
        }
        let caps: Caps = args.parse()?;
        if let Some(c) = caps.enable.first() {
            return Err(CommandError::generic(format!(
                "Capability '{c}' not available"
            )));
        }
        client.negotiated.store(true, Ordering::SeqCst);
        return Ok(json!({}));
    }
    match command {
        "qmp_capabilities" => Err(CommandError::new(
            ErrorClass::CommandNotFound,
            "Capabilities negotiation is already complete, command ignored",
        )),
        "query-version" => {
            args.none()?;
            Ok(serde_json::to_value(&shared.options.version).unwrap_or_default())
        }
        "query-commands" => {
            args.none()?;
            let names = BUILTIN.iter().chain(shared.handler.commands());
            Ok(Value::Array(names.map(|n| json!({"name": n})).collect()))
        }
        c if shared.handler.commands().contains(&c) => shared.handler.execute(c, args),
        c => Err(CommandError::not_found(c)),
    }
}
