//! [`Outbound`]: what a process that writes streams tells the others — the rows
//! it wrote as `RDATA`, and its positions as `POSITION`.

use std::sync::{Arc, Mutex};

use replication_proto::Command;
use store_core::StoreError;

use crate::lock;
use store_core::Stream;

/// How many rows one poll of a stream sends at most; the rest follow on the
/// next poll (or the follower fetches them after the `POSITION`).
pub const ROWS_PER_POLL: usize = 100;

/// The sending side of replication for one process: for every stream it is a
/// source of, the token up to which it has told the others.
///
/// Starts at the current tokens: rows written before the process (or its
/// connection) started are never sent as `RDATA`; followers catch up from the
/// database after the `POSITION` they get on connecting.
#[derive(Debug)]
pub struct Outbound {
    instance_name: String,
    sources: Vec<Source>,
}

#[derive(Debug)]
struct Source {
    stream: Arc<dyn Stream>,
    /// What the others have been told.
    last_token: Mutex<i64>,
}

impl Outbound {
    /// The sending side of `instance_name` for the streams it writes.
    pub fn new(instance_name: &str, sources: impl IntoIterator<Item = Arc<dyn Stream>>) -> Outbound {
        let sources = sources
            .into_iter()
            .map(|stream| {
                let last_token = Mutex::new(stream.current_token(instance_name));
                Source { stream, last_token }
            })
            .collect();
        Outbound { instance_name: instance_name.to_owned(), sources }
    }

    /// `POSITION <stream> <self> <last> <last>` for every source stream: the
    /// answer to `REPLICATE`, and what a process says after (re)connecting. It
    /// announces what was already sent, not the live token, so a position never
    /// overtakes rows still to be sent.
    pub fn announce(&self) -> Vec<Command> {
        self.sources
            .iter()
            .filter(|source| source.stream.is_writer(&self.instance_name))
            .map(|source| {
                let last = *lock(&source.last_token);
                self.position(source, last, last)
            })
            .collect()
    }

    /// The stream called `name`, if this process writes it.
    pub fn source(&self, name: &str) -> Option<&Arc<dyn Stream>> {
        self.sources.iter().map(|source| &source.stream).find(|stream| stream.name() == name)
    }

    /// Passes a follower's acknowledgement to the stream it concerns.
    pub fn acknowledge(&self, stream: &str, follower: &str, token: i64) {
        if let Some(source) = self.source(stream) {
            source.acknowledge(follower, token);
        }
    }

    /// Whether every stream's sent token is its current one: nothing is waiting
    /// to be sent.
    pub fn is_caught_up(&self) -> bool {
        self.sources
            .iter()
            .filter(|source| source.stream.is_writer(&self.instance_name))
            .all(|source| *lock(&source.last_token) == source.stream.current_token(&self.instance_name))
    }

    /// With nobody connected there is no one to tell: move every stream's sent
    /// token to the current one. Followers catch up from the database later.
    pub fn skip_to_current(&self) {
        for source in &self.sources {
            *lock(&source.last_token) = source.stream.current_token(&self.instance_name);
        }
    }

    fn position(&self, source: &Source, prev_token: i64, new_token: i64) -> Command {
        Command::Position {
            stream: source.stream.name().to_owned(),
            instance: self.instance_name.clone(),
            prev_token,
            new_token,
        }
    }

    /// The commands telling the others what changed since the last poll. Rows
    /// sharing a token go out as `RDATA` with all but the last marked `batch`.
    /// When more rows were written than one poll sends, the rest are not
    /// streamed: a `POSITION` at the current token tells followers to read them
    /// from the database themselves.
    pub async fn poll(&self) -> Result<Vec<Command>, StoreError> {
        let mut commands = Vec::new();
        for source in &self.sources {
            let stream = source.stream.as_ref();
            let current = stream.current_token(&self.instance_name);
            if !stream.is_writer(&self.instance_name) {
                // A stream this process may join (or has left): nothing of
                // ours to tell, and when it joins, nothing before now.
                *lock(&source.last_token) = current;
                continue;
            }
            let last = *lock(&source.last_token);
            if last == current {
                continue;
            }
            let written_locally = stream.minimal_local_current_token() > last;
            let (rows, reached, limited) = if written_locally {
                let updates =
                    stream.get_updates_since(&self.instance_name, last, current, ROWS_PER_POLL).await?;
                (updates.rows, updates.token, updates.limited)
            } else {
                (Vec::new(), current, false)
            };
            // A cut batch is completed by the followers' own catch-up.
            let target = if limited { current } else { reached };
            *lock(&source.last_token) = target;
            if rows.is_empty() {
                if !written_locally && !stream.announces_moves_without_rows() {
                    continue;
                }
                commands.push(self.position(source, last, reached));
                continue;
            }
            let last_row_token = rows.last().map_or(reached, |(token, _)| *token);
            let mut unsendable = false;
            let mut rows = rows.into_iter().peekable();
            while let Some((token, row)) = rows.next() {
                let more_with_this_token = rows.peek().is_some_and(|(next, _)| *next == token);
                let command = Command::Rdata {
                    stream: stream.name().to_owned(),
                    instance: self.instance_name.clone(),
                    token: (!more_with_this_token).then_some(token),
                    row,
                };
                if let Err(err) = command.to_line() {
                    // A row too long for a line: stop, and announce a position whose
                    // start lies past every follower, so each sees a gap and reads
                    // this row and the rest from the database instead of moving
                    // past them.
                    tracing::warn!(
                        stream = stream.name(),
                        token,
                        "a row cannot be replicated as a line ({err}); followers will read it from the database"
                    );
                    unsendable = true;
                    break;
                }
                commands.push(command);
            }
            if unsendable || limited {
                // A start past every follower: each sees a gap and reads the rest
                // from the database.
                commands.push(self.position(source, target, target));
            } else if last_row_token < reached {
                commands.push(self.position(source, last_row_token, reached));
            }
        }
        Ok(commands)
    }
}
