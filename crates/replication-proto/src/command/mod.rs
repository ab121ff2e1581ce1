//! [`Command`]: the replication commands, parsed from and written to lines.

use std::fmt;

use serde::de::IgnoredAny;

use crate::MAX_LINE_LENGTH;

/// A row of a stream as it travels in `RDATA`: JSON text, checked to be valid
/// strict JSON (no `NaN` or infinities) and kept byte for byte, so that a line
/// read and written again is the same line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowJson(String);

impl RowJson {
    /// Checks `text` is strict JSON.
    pub fn new(text: &str) -> Result<RowJson, ParseError> {
        serde_json::from_str::<IgnoredAny>(text).map_err(|err| ParseError::Json(err.to_string()))?;
        Ok(RowJson(text.to_owned()))
    }

    /// Serialises a row compactly, as Synapse does.
    pub fn from_row<T: serde::Serialize>(row: &T) -> Result<RowJson, SendError> {
        serde_json::to_string(row).map(RowJson).map_err(|err| SendError::Json(err.to_string()))
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Decodes the row into its stream's type.
    pub fn decode<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.0)
    }
}

/// A secret carried by a command (`AUTH`): its `Debug` never shows it, so a
/// command logged whole cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `text`.
    pub fn new(text: impl Into<String>) -> Secret {
        Secret(text.into())
    }

    /// The secret itself, for comparing and sending.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// Which end of a TCP connection a process is: the server (the master) or a
/// client (a worker). Over Redis every process is both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The end that listens.
    Server,
    /// The end that connects.
    Client,
}

/// A replication command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `SERVER <server_name>`: the first line from a server.
    Server {
        /// The server's name, which the client checks.
        server_name: String,
    },
    /// `RDATA <stream> <instance> <token|batch> <row>`: one row of a stream.
    Rdata {
        /// The stream.
        stream: String,
        /// The writer that wrote the row.
        instance: String,
        /// The row's token; `None` (`batch`) when more rows share the next token.
        token: Option<i64>,
        /// The row.
        row: RowJson,
    },
    /// `POSITION <stream> <instance> <prev> <new>`: the writer's stream moved from
    /// `prev` to `new` and it wrote nothing in between that was not sent.
    Position {
        /// The stream.
        stream: String,
        /// The writer.
        instance: String,
        /// The position before.
        prev_token: i64,
        /// The position now.
        new_token: i64,
    },
    /// `ERROR <message>`: the sender closes after it.
    Error {
        /// Why.
        message: String,
    },
    /// `PING <data>`: keepalive; the data is the sender's clock in milliseconds.
    Ping {
        /// Whatever the sender put there.
        data: String,
    },
    /// `NAME <name>`: the client names the connection.
    Name {
        /// The client's name.
        name: String,
    },
    /// `REPLICATE`: every writer, announce your positions.
    Replicate,
    /// `USER_SYNC <instance_id> <user_id> <device_id|None> <start|end> <last_sync_ms>`.
    UserSync {
        /// A random per-process ID.
        instance_id: String,
        /// The syncing user.
        user_id: String,
        /// The device, if known.
        device_id: Option<String>,
        /// `start` (true) or `end` (false).
        is_syncing: bool,
        /// When, in milliseconds.
        last_sync_ms: i64,
    },
    /// `CLEAR_USER_SYNC <instance_id>`: the process is shutting down.
    ClearUserSync {
        /// The per-process ID used in `USER_SYNC`.
        instance_id: String,
    },
    /// `FEDERATION_ACK <instance> <token>`.
    FederationAck {
        /// The federation sender.
        instance: String,
        /// The position it has handled.
        token: i64,
    },
    /// `USER_IP <user_id> [access_token, ip, user_agent, device_id, last_seen]`.
    UserIp {
        /// The user.
        user_id: String,
        /// The access token used.
        access_token: String,
        /// The client's IP address.
        ip: String,
        /// The client's user agent.
        user_agent: String,
        /// The device, if known.
        device_id: Option<String>,
        /// When, in milliseconds.
        last_seen: i64,
    },
    /// `REMOTE_SERVER_UP <server_name>`.
    RemoteServerUp {
        /// The server that came back.
        server_name: String,
    },
    /// `LOCK_RELEASED [instance, lock_name, lock_key]`.
    LockReleased {
        /// Who held the lock.
        instance: String,
        /// The lock's name.
        lock_name: String,
        /// The lock's key.
        lock_key: String,
    },
    /// `NEW_ACTIVE_TASK <task_id>` (Redis only).
    NewActiveTask {
        /// The task.
        task_id: String,
    },
    /// `CANCEL_TASK <task_id>` (Redis only).
    CancelTask {
        /// The task.
        task_id: String,
    },
    /// `AUTH <secret>`: a TCP client's first line, proving it holds the
    /// deployment's `worker_replication_secret`. Our extension: Synapse's TCP
    /// replication had no authentication and relied on firewalls.
    Auth {
        /// The secret presented.
        secret: Secret,
    },
}

/// The name of a command, as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[expect(missing_docs, reason = "each variant is the command of the same name")]
pub enum CommandName {
    Server,
    Rdata,
    Position,
    Error,
    Ping,
    Name,
    Replicate,
    UserSync,
    ClearUserSync,
    FederationAck,
    UserIp,
    RemoteServerUp,
    LockReleased,
    NewActiveTask,
    CancelTask,
    Auth,
}

impl CommandName {
    /// Every command.
    pub const ALL: [CommandName; 16] = [
        CommandName::Server,
        CommandName::Rdata,
        CommandName::Position,
        CommandName::Error,
        CommandName::Ping,
        CommandName::Name,
        CommandName::Replicate,
        CommandName::UserSync,
        CommandName::ClearUserSync,
        CommandName::FederationAck,
        CommandName::UserIp,
        CommandName::RemoteServerUp,
        CommandName::LockReleased,
        CommandName::NewActiveTask,
        CommandName::CancelTask,
        CommandName::Auth,
    ];

    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandName::Server => "SERVER",
            CommandName::Rdata => "RDATA",
            CommandName::Position => "POSITION",
            CommandName::Error => "ERROR",
            CommandName::Ping => "PING",
            CommandName::Name => "NAME",
            CommandName::Replicate => "REPLICATE",
            CommandName::UserSync => "USER_SYNC",
            CommandName::ClearUserSync => "CLEAR_USER_SYNC",
            CommandName::FederationAck => "FEDERATION_ACK",
            CommandName::UserIp => "USER_IP",
            CommandName::RemoteServerUp => "REMOTE_SERVER_UP",
            CommandName::LockReleased => "LOCK_RELEASED",
            CommandName::NewActiveTask => "NEW_ACTIVE_TASK",
            CommandName::CancelTask => "CANCEL_TASK",
            CommandName::Auth => "AUTH",
        }
    }

    fn from_wire(name: &str) -> Option<CommandName> {
        CommandName::ALL.into_iter().find(|command| command.as_str() == name)
    }

    /// Whether a TCP peer on `receiver`'s side may receive this command. Over
    /// Redis there are no sides and every command is accepted.
    ///
    /// Two extensions to Synapse's rules: a server also accepts `RDATA` and
    /// `POSITION` from its clients (Synapse dropped TCP replication before
    /// workers could write streams; here a worker that writes, an event
    /// persister, sends its rows to the master, which relays them), and `AUTH`,
    /// a client's first line. Nothing a server sends is new: a line a server
    /// writes is one Synapse's client reads.
    pub fn accepted_by(self, receiver: Side) -> bool {
        use CommandName::*;
        match receiver {
            // What clients send.
            Side::Server => {
                matches!(
                    self,
                    Auth | Rdata
                        | Position
                        | Error
                        | Ping
                        | Name
                        | Replicate
                        | UserSync
                        | ClearUserSync
                        | FederationAck
                        | UserIp
                        | RemoteServerUp
                        | LockReleased
                )
            }
            // What servers send.
            Side::Client => {
                matches!(self, Server | Rdata | Position | Error | Ping | RemoteServerUp | LockReleased)
            }
        }
    }
}

impl fmt::Display for CommandName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a line is not a valid command. The peer is sent `ERROR` with this text
/// and the connection closes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// The line starts with no known command name.
    #[error("unknown command {0}")]
    UnknownCommand(String),
    /// The arguments are not what the command takes.
    #[error("{command}: {problem}")]
    Arguments {
        /// The command.
        command: CommandName,
        /// What is wrong.
        problem: String,
    },
    /// A JSON part is not strict JSON.
    #[error("invalid JSON: {0}")]
    Json(String),
}

/// Why a command cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The line would hold a newline, which would split it in two.
    #[error("a {0} command would contain a newline")]
    Newline(CommandName),
    /// The line would exceed [`MAX_LINE_LENGTH`].
    #[error("a {command} line of {length} bytes exceeds the limit of {MAX_LINE_LENGTH}")]
    TooLong {
        /// The command.
        command: CommandName,
        /// The line's length.
        length: usize,
    },
    /// A JSON part could not be written.
    #[error("cannot write JSON: {0}")]
    Json(String),
}

fn arguments(command: CommandName, problem: impl Into<String>) -> ParseError {
    ParseError::Arguments { command, problem: problem.into() }
}

/// Parses an integer argument the way Synapse's `int()` does: surrounding
/// whitespace, an optional sign, and digits that single underscores may group.
fn integer(command: CommandName, what: &str, text: &str) -> Result<i64, ParseError> {
    let invalid = || arguments(command, format!("{what} {:?} is not an integer", truncate(text)));
    let trimmed = text.trim();
    let digits = trimmed.strip_prefix(['-', '+']).unwrap_or(trimmed);
    let well_formed = !digits.is_empty()
        && digits.split('_').all(|group| !group.is_empty() && group.bytes().all(|b| b.is_ascii_digit()));
    if !well_formed {
        return Err(invalid());
    }
    trimmed.replace('_', "").parse().map_err(|_| arguments(command, format!("{what} is out of range")))
}

/// Splits `rest` at the first `n - 1` spaces into exactly `n` parts.
fn split_exact(command: CommandName, rest: &str, n: usize) -> Result<Vec<&str>, ParseError> {
    let parts: Vec<&str> = rest.splitn(n, ' ').collect();
    if parts.len() == n {
        Ok(parts)
    } else {
        Err(arguments(command, format!("expected {n} arguments, got {}", parts.len())))
    }
}

impl Command {
    /// Parses one line (without its newline).
    pub fn parse(line: &str) -> Result<Command, ParseError> {
        let (name, rest) = line.split_once(' ').unwrap_or((line, ""));
        let command =
            CommandName::from_wire(name).ok_or_else(|| ParseError::UnknownCommand(truncate(name)))?;
        Ok(match command {
            CommandName::Server => Command::Server { server_name: rest.to_owned() },
            CommandName::Error => Command::Error { message: rest.to_owned() },
            CommandName::Ping => Command::Ping { data: rest.to_owned() },
            CommandName::Name => Command::Name { name: rest.to_owned() },
            CommandName::Replicate => Command::Replicate,
            CommandName::ClearUserSync => Command::ClearUserSync { instance_id: rest.to_owned() },
            CommandName::RemoteServerUp => Command::RemoteServerUp { server_name: rest.to_owned() },
            CommandName::NewActiveTask => Command::NewActiveTask { task_id: rest.to_owned() },
            CommandName::CancelTask => Command::CancelTask { task_id: rest.to_owned() },
            CommandName::Auth => Command::Auth { secret: Secret::new(rest) },
            CommandName::Rdata => {
                let parts = split_exact(command, rest, 4)?;
                let token = match parts[2] {
                    "batch" => None,
                    text => Some(integer(command, "token", text)?),
                };
                Command::Rdata {
                    stream: parts[0].to_owned(),
                    instance: parts[1].to_owned(),
                    token,
                    row: RowJson::new(parts[3])?,
                }
            }
            CommandName::Position => {
                let parts = split_exact(command, rest, 4)?;
                Command::Position {
                    stream: parts[0].to_owned(),
                    instance: parts[1].to_owned(),
                    prev_token: integer(command, "previous token", parts[2])?,
                    new_token: integer(command, "new token", parts[3])?,
                }
            }
            CommandName::UserSync => {
                let parts = split_exact(command, rest, 5)?;
                let is_syncing = match parts[3] {
                    "start" => true,
                    "end" => false,
                    other => {
                        return Err(arguments(command, format!("state {other:?} is neither start nor end")));
                    }
                };
                Command::UserSync {
                    instance_id: parts[0].to_owned(),
                    user_id: parts[1].to_owned(),
                    device_id: (parts[2] != "None").then(|| parts[2].to_owned()),
                    is_syncing,
                    last_sync_ms: integer(command, "last sync", parts[4])?,
                }
            }
            CommandName::FederationAck => {
                let parts: Vec<&str> = rest.split(' ').collect();
                let [instance, token] = parts.as_slice() else {
                    return Err(arguments(command, format!("expected 2 arguments, got {}", parts.len())));
                };
                Command::FederationAck {
                    instance: (*instance).to_owned(),
                    token: integer(command, "token", token)?,
                }
            }
            CommandName::UserIp => {
                let (user_id, json) = rest
                    .split_once(' ')
                    .ok_or_else(|| arguments(command, "expected a user ID and a JSON list"))?;
                type Fields = (String, String, String, Option<String>, i64);
                let (access_token, ip, user_agent, device_id, last_seen): Fields =
                    serde_json::from_str(json).map_err(|err| ParseError::Json(err.to_string()))?;
                Command::UserIp {
                    user_id: user_id.to_owned(),
                    access_token,
                    ip,
                    user_agent,
                    device_id,
                    last_seen,
                }
            }
            CommandName::LockReleased => {
                let (instance, lock_name, lock_key): (String, String, String) =
                    serde_json::from_str(rest).map_err(|err| ParseError::Json(err.to_string()))?;
                Command::LockReleased { instance, lock_name, lock_key }
            }
        })
    }

    /// The command's name.
    pub fn name(&self) -> CommandName {
        match self {
            Command::Server { .. } => CommandName::Server,
            Command::Rdata { .. } => CommandName::Rdata,
            Command::Position { .. } => CommandName::Position,
            Command::Error { .. } => CommandName::Error,
            Command::Ping { .. } => CommandName::Ping,
            Command::Name { .. } => CommandName::Name,
            Command::Replicate => CommandName::Replicate,
            Command::UserSync { .. } => CommandName::UserSync,
            Command::ClearUserSync { .. } => CommandName::ClearUserSync,
            Command::FederationAck { .. } => CommandName::FederationAck,
            Command::UserIp { .. } => CommandName::UserIp,
            Command::RemoteServerUp { .. } => CommandName::RemoteServerUp,
            Command::LockReleased { .. } => CommandName::LockReleased,
            Command::NewActiveTask { .. } => CommandName::NewActiveTask,
            Command::CancelTask { .. } => CommandName::CancelTask,
            Command::Auth { .. } => CommandName::Auth,
        }
    }

    /// The arguments, as Synapse writes them.
    fn arguments(&self) -> Result<String, SendError> {
        let json = |value: &dyn erased::Json| value.to_json().map_err(|err| SendError::Json(err.to_string()));
        Ok(match self {
            Command::Server { server_name: text }
            | Command::Error { message: text }
            | Command::Ping { data: text }
            | Command::Name { name: text }
            | Command::ClearUserSync { instance_id: text }
            | Command::RemoteServerUp { server_name: text }
            | Command::NewActiveTask { task_id: text }
            | Command::CancelTask { task_id: text } => text.clone(),
            Command::Auth { secret } => secret.expose().to_owned(),
            Command::Replicate => String::new(),
            Command::Rdata { stream, instance, token, row } => {
                let token = token.map_or_else(|| "batch".to_owned(), |token| token.to_string());
                format!("{stream} {instance} {token} {}", row.as_str())
            }
            Command::Position { stream, instance, prev_token, new_token } => {
                format!("{stream} {instance} {prev_token} {new_token}")
            }
            Command::UserSync { instance_id, user_id, device_id, is_syncing, last_sync_ms } => {
                let device = device_id.as_deref().unwrap_or("None");
                let state = if *is_syncing { "start" } else { "end" };
                format!("{instance_id} {user_id} {device} {state} {last_sync_ms}")
            }
            Command::FederationAck { instance, token } => format!("{instance} {token}"),
            Command::UserIp { user_id, access_token, ip, user_agent, device_id, last_seen } => {
                let fields = (access_token, ip, user_agent, device_id, last_seen);
                format!("{user_id} {}", json(&fields)?)
            }
            Command::LockReleased { instance, lock_name, lock_key } => {
                json(&(instance, lock_name, lock_key))?
            }
        })
    }

    /// The line to send (without its newline): refused if it would hold a newline
    /// or exceed [`MAX_LINE_LENGTH`].
    pub fn to_line(&self) -> Result<String, SendError> {
        let line = format!("{} {}", self.name(), self.arguments()?);
        if line.contains('\n') {
            return Err(SendError::Newline(self.name()));
        }
        if line.len() > MAX_LINE_LENGTH {
            return Err(SendError::TooLong { command: self.name(), length: line.len() });
        }
        Ok(line)
    }
}

/// Keeps error messages about hostile input short.
fn truncate(text: &str) -> String {
    let mut end = text.len().min(64);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Compact JSON of the few shapes commands carry, behind one object-safe call.
mod erased {
    pub(super) trait Json {
        fn to_json(&self) -> Result<String, serde_json::Error>;
    }

    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Result<String, serde_json::Error> {
            serde_json::to_string(self)
        }
    }
}

#[cfg(test)]
mod tests;
