//! keel-qmp: serve QMP on a Unix socket with a tiny handler, then talk to it as a client
//! would: greeting, `qmp_capabilities`, a command, an error, an event.
//!
//! `cargo run -p keel-examples --example qmp_server`

use std::error::Error;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use keel_qmp::{Arguments, CommandError, Handler, Options, Server};
use serde_json::{json, Value};

/// A "VM" that can only be paused and resumed.
#[derive(Default)]
struct Toy {
    paused: AtomicBool,
}

impl Handler for Toy {
    fn commands(&self) -> &[&'static str] {
        &["query-status", "stop"]
    }

    fn execute(&self, command: &str, args: Arguments) -> Result<Value, CommandError> {
        args.none()?;
        if command == "stop" {
            self.paused.store(true, Ordering::SeqCst);
            return Ok(json!({}));
        }
        let paused = self.paused.load(Ordering::SeqCst);
        Ok(json!({"status": if paused { "paused" } else { "running" }, "running": !paused}))
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let path = std::env::temp_dir().join(format!("keel-qmp-example-{}.sock", std::process::id()));
    let server = Server::bind(&path, Arc::new(Toy::default()), Options::default())?;

    let mut client = UnixStream::connect(&path)?;
    let mut lines = BufReader::new(client.try_clone()?).lines();
    let mut next = move || -> Result<String, Box<dyn Error>> {
        Ok(lines.next().ok_or("the server hung up")??)
    };
    println!("greeting:  {}", next()?);
    for msg in [
        r#"{"execute": "query-status"}"#,
        r#"{"execute": "qmp_capabilities"}"#,
        r#"{"execute": "stop", "id": 1}"#,
        r#"{"execute": "query-status", "id": 2}"#,
        r#"{"execute": "stop", "arguments": {"now": true}}"#,
    ] {
        client.write_all(msg.as_bytes())?;
        println!("> {msg}\n< {}", next()?);
    }
    server.events().emit("STOP", None);
    println!("event:     {}", next()?);

    server.close();
    std::fs::remove_file(&path)?;
    Ok(())
}
