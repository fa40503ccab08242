//! Runnable examples for the Keel crates: see the `[[example]]` entries in Cargo.toml.
