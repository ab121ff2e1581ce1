//! The replication line protocol, compatible with Synapse's: every command, its
//! parsing and serialisation, and the framing of lines on a byte stream.
//!
//! A command is one UTF-8 line: its name, then one space and its arguments. What
//! we send is exactly what Synapse sends (argument-less commands keep their
//! trailing space: `REPLICATE `), and what we accept is exactly what Synapse's
//! parser accepts. Parsing is total: any input gives a [`Command`] or a
//! [`ParseError`], never a panic.
//!
//! ```
//! use replication_proto::Command;
//!
//! let command = Command::parse("POSITION events persister1 1200 1205")?;
//! assert_eq!(
//!     command,
//!     Command::Position { stream: "events".into(), instance: "persister1".into(), prev_token: 1200, new_token: 1205 }
//! );
//! assert_eq!(command.to_line()?, "POSITION events persister1 1200 1205");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! This crate does no I/O and knows no database: transports and streams live in
//! `replication`.

#![warn(missing_docs)]

mod command;
mod framing;

pub use command::{Command, CommandName, ParseError, RowJson, Secret, SendError, Side};
pub use framing::{LineDecoder, LineError};

/// The longest line either side sends or accepts, in bytes (without the newline).
pub const MAX_LINE_LENGTH: usize = 16_384;
