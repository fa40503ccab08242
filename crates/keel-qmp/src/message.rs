//! QMP's messages (docs/interop/qmp-spec): the greeting, commands, replies and events.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::error::{CommandError, ErrorClass};

/// The version a server announces in its greeting and returns from `query-version`
/// (QAPI `VersionInfo`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VersionInfo {
    /// `major`, `minor`, `micro`.
    pub qemu: VersionTriple,
    /// Free text naming the build (QEMU puts its package version here).
    pub package: String,
}

/// A three-part version number (QAPI `VersionTriple`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VersionTriple {
    /// Major version.
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Micro version.
    pub micro: u64,
}

/// The greeting sent when a client connects: `{"QMP": {"version": ..., "capabilities": []}}`.
/// No capability (such as `oob`) is offered.
pub fn greeting(version: &VersionInfo) -> Value {
    json!({"QMP": {"version": version, "capabilities": []}})
}

/// A command as the client sent it.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// `execute`.
    pub command: String,
    /// `arguments` (empty when absent).
    pub arguments: Map<String, Value>,
    /// `id`, echoed in the reply.
    pub id: Option<Value>,
}

/// A message the server could not take as a command, with the reply it gets.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejected {
    /// The message's `id`, if it had one.
    pub id: Option<Value>,
    /// Why.
    pub error: CommandError,
}

fn generic(desc: String, id: Option<Value>) -> Rejected {
    Rejected {
        id,
        error: CommandError::new(ErrorClass::GenericError, desc),
    }
}

/// Parses one complete JSON value (as cut by [`crate::stream::Splitter`]) into a command.
/// The checks and messages are QEMU's (qapi/qmp-dispatch.c).
///
/// # Examples
///
/// ```
/// use keel_qmp::message::parse_request;
///
/// let r = parse_request(br#"{"execute": "query-status", "id": 7}"#).unwrap();
/// assert_eq!((r.command.as_str(), r.id), ("query-status", Some(7.into())));
/// let bad = parse_request(b"[1]").unwrap_err();
/// assert_eq!(bad.error.desc, "QMP input must be a JSON object");
/// ```
pub fn parse_request(bytes: &[u8]) -> Result<Request, Rejected> {
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| generic(format!("JSON parse error, {e}"), None))?;
    let Value::Object(mut obj) = value else {
        return Err(generic("QMP input must be a JSON object".into(), None));
    };
    let id = obj.remove("id");
    let command = match obj.remove("execute") {
        Some(Value::String(s)) => s,
        Some(_) => {
            return Err(generic(
                "QMP input member 'execute' must be a string".into(),
                id,
            ))
        }
        None => return Err(generic("QMP input lacks member 'execute'".into(), id)),
    };
    let arguments = match obj.remove("arguments") {
        Some(Value::Object(a)) => a,
        Some(_) => {
            return Err(generic(
                "QMP input member 'arguments' must be an object".into(),
                id,
            ))
        }
        None => Map::new(),
    };
    if let Some(key) = obj.keys().next() {
        return Err(generic(
            format!("QMP input member '{key}' is unexpected"),
            id,
        ));
    }
    Ok(Request {
        command,
        arguments,
        id,
    })
}

/// A success reply: `{"return": value, "id": id}`.
pub fn reply(value: Value, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("return".into(), value);
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

/// An error reply: `{"error": {"class": ..., "desc": ...}, "id": id}`.
pub fn error_reply(error: &CommandError, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert(
        "error".into(),
        json!({"class": error.class.as_str(), "desc": error.desc}),
    );
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

/// An event: `{"event": name, "data": data, "timestamp": {"seconds", "microseconds"}}`;
/// `data` is left out for events that carry none, as QEMU does.
pub fn event(name: &str, data: Option<Value>, at: SystemTime) -> Value {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut m = Map::new();
    m.insert("event".into(), name.into());
    if let Some(d) = data {
        m.insert("data".into(), d);
    }
    m.insert(
        "timestamp".into(),
        json!({"seconds": since.as_secs(), "microseconds": since.subsec_micros()}),
    );
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn desc(bytes: &[u8]) -> (String, Option<Value>) {
        let r = parse_request(bytes).unwrap_err();
        assert_eq!(r.error.class, ErrorClass::GenericError);
        (r.error.desc, r.id)
    }

    #[test]
    fn requests_parse_with_qemus_checks() {
        let r =
            parse_request(br#"{"execute":"balloon","arguments":{"value":1},"id":"a"}"#).unwrap();
        assert_eq!(r.command, "balloon");
        assert_eq!(r.arguments["value"], 1);
        assert_eq!(r.id, Some("a".into()));
        assert!(desc(b"{\"execute\":").0.starts_with("JSON parse error, "));
        assert_eq!(desc(b"42").0, "QMP input must be a JSON object");
        assert_eq!(
            desc(br#"{"id": 3}"#),
            ("QMP input lacks member 'execute'".into(), Some(3.into()))
        );
        assert_eq!(
            desc(br#"{"execute": 1}"#).0,
            "QMP input member 'execute' must be a string"
        );
        assert_eq!(
            desc(br#"{"execute": "x", "arguments": []}"#).0,
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            desc(br#"{"execute": "x", "colour": 1}"#).0,
            "QMP input member 'colour' is unexpected"
        );
        // Deep nesting is refused by the parser, not by the stack.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(desc(deep.as_bytes()).0.starts_with("JSON parse error, "));
    }

    #[test]
    fn replies_and_events_have_qmps_shape() {
        assert_eq!(
            reply(json!({}), Some(json!(1))),
            json!({"return": {}, "id": 1})
        );
        let e = CommandError::new(ErrorClass::CommandNotFound, "nope");
        assert_eq!(
            error_reply(&e, None),
            json!({"error": {"class": "CommandNotFound", "desc": "nope"}})
        );
        let at = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(
            event("STOP", None, at),
            json!({"event": "STOP", "timestamp": {"seconds": 1_700_000_000u64, "microseconds": 123_456}})
        );
        assert_eq!(
            event("SHUTDOWN", Some(json!({"guest": true})), at)["data"],
            json!({"guest": true})
        );
        let g = greeting(&VersionInfo {
            qemu: VersionTriple {
                major: 0,
                minor: 1,
                micro: 0,
            },
            package: "keel".into(),
        });
        assert_eq!(g["QMP"]["version"]["qemu"]["minor"], 1);
        assert_eq!(g["QMP"]["capabilities"], json!([]));
    }
}
