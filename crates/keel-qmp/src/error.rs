//! QMP's error classes and the error a command returns.

/// QMP's error classes (QAPI `QapiErrorClass`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorClass {
    /// Most errors.
    GenericError,
    /// The command does not exist, or is not allowed yet (before `qmp_capabilities`).
    CommandNotFound,
    /// The device exists but has not been activated by the guest (`balloon`).
    DeviceNotActive,
    /// The named device does not exist.
    DeviceNotFound,
    /// The host's KVM lacks a capability the command needs.
    KVMMissingCap,
}

impl ErrorClass {
    /// The class as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

/// A command's failure as the client sees it: a class and a human-readable description.
/// This is the protocol edge: a VMM maps its typed errors to this, printing their causes
/// into `desc`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct CommandError {
    /// The error class.
    pub class: ErrorClass,
    /// The description.
    pub desc: String,
}

impl CommandError {
    /// An error of `class` saying `desc`.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        CommandError {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// QEMU's reply to an unknown command.
    pub fn not_found(command: &str) -> Self {
        Self::new(
            ErrorClass::CommandNotFound,
            format!("The command {command} has not been found"),
        )
    }
}
