//! The text forms of tokens, as clients see them, and the instance IDs they
//! carry in place of instance names.
//!
//! - A multi-writer token: `5`, or `m5~1.6~3.7` when writers are ahead (instance
//!   1 at 6, instance 3 at 7).
//! - A room token: `s5` (live), `t3-5` (historical: topological 3, stream 5;
//!   it cannot carry writers), or the `m` form.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::{Database, MultiWriterToken, StoreError};

/// Why a token from a client was refused; clients get a 400 for
/// [`TokenParseError::Invalid`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenParseError {
    /// The text is not a token (or names an instance nobody knows).
    #[error("{0}")]
    Invalid(String),
    /// Looking up an instance failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Instance names and the small integers tokens carry for them, from table
/// `instance_map`; an ID is assigned on first use, and both directions are
/// cached for good (an ID never changes).
#[derive(Debug)]
pub struct InstanceIds {
    db: Database,
    ids: Mutex<HashMap<String, i64>>,
    names: Mutex<HashMap<i64, String>>,
}

/// The maps only ever gain entries: a poisoned lock is still consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl InstanceIds {
    /// The instance IDs of `db`.
    pub fn new(db: Database) -> InstanceIds {
        InstanceIds { db, ids: Mutex::default(), names: Mutex::default() }
    }

    fn remember(&self, name: &str, id: i64) {
        lock(&self.ids).insert(name.to_owned(), id);
        lock(&self.names).insert(id, name.to_owned());
    }

    /// `name`'s ID, assigned now if it has none.
    pub async fn id_for(&self, name: &str) -> Result<i64, StoreError> {
        if let Some(id) = lock(&self.ids).get(name) {
            return Ok(*id);
        }
        let owned = name.to_owned();
        let id = self
            .db
            .run_interaction("get_id_for_instance", move |txn| {
                let name = owned.clone();
                Box::pin(async move {
                    const SELECT: &str = "SELECT instance_id FROM instance_map WHERE instance_name = $1";
                    // Look first: an upsert that conflicts still uses up a sequence value.
                    if let Some(row) = txn.query_opt(SELECT, &[&name]).await? {
                        return row.get::<i64>(0);
                    }
                    txn.execute(
                        "INSERT INTO instance_map (instance_name) VALUES ($1) ON CONFLICT (instance_name) DO NOTHING",
                        &[&name],
                    )
                    .await?;
                    txn.query_one(SELECT, &[&name]).await?.get::<i64>(0)
                })
            })
            .await?;
        self.remember(name, id);
        Ok(id)
    }

    /// The instance with ID `id`, if any.
    pub async fn name_for(&self, id: i64) -> Result<Option<String>, StoreError> {
        if let Some(name) = lock(&self.names).get(&id) {
            return Ok(Some(name.clone()));
        }
        let name = self
            .db
            .run_autocommit("get_name_for_instance_id", move |txn| {
                Box::pin(async move {
                    let row = txn
                        .query_opt("SELECT instance_name FROM instance_map WHERE instance_id = $1", &[&id])
                        .await?;
                    row.map(|row| row.get::<String>(0)).transpose()
                })
            })
            .await?;
        if let Some(name) = &name {
            self.remember(name, id);
        }
        Ok(name)
    }
}

/// A position on the `events` stream as clients hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomToken {
    /// A live position.
    Live(MultiWriterToken),
    /// A position in a room's history, from pagination.
    Historical {
        /// The event's depth in the room.
        topological: i64,
        /// Its stream ordering.
        stream: i64,
    },
}

impl MultiWriterToken {
    /// `5`, or `m5~1.6…` when writers are ahead of the stream position.
    pub async fn to_text(&self, ids: &InstanceIds) -> Result<String, StoreError> {
        if self.instance_map().is_empty() {
            return Ok(self.stream().to_string());
        }
        vector_text(self, ids).await
    }

    /// Parses what [`MultiWriterToken::to_text`] wrote.
    pub async fn parse(text: &str, ids: &InstanceIds) -> Result<MultiWriterToken, TokenParseError> {
        let invalid = || TokenParseError::Invalid(format!("Invalid stream token: {text:?}"));
        match text.chars().next() {
            Some(first) if first.is_ascii_digit() => {
                position(text).map(MultiWriterToken::at).ok_or_else(invalid)
            }
            Some('m') => parse_vector(&text[1..], ids).await?.ok_or_else(invalid),
            _ => Err(invalid()),
        }
    }
}

impl RoomToken {
    /// `s5`, `t3-5`, or `m5~1.6…`.
    pub async fn to_text(&self, ids: &InstanceIds) -> Result<String, StoreError> {
        match self {
            RoomToken::Historical { topological, stream } => Ok(format!("t{topological}-{stream}")),
            RoomToken::Live(token) if token.instance_map().is_empty() => Ok(format!("s{}", token.stream())),
            RoomToken::Live(token) => vector_text(token, ids).await,
        }
    }

    /// Parses what [`RoomToken::to_text`] wrote.
    pub async fn parse(text: &str, ids: &InstanceIds) -> Result<RoomToken, TokenParseError> {
        let invalid = || TokenParseError::Invalid(format!("Invalid room stream token: {text:?}"));
        let Some(first) = text.chars().next() else { return Err(invalid()) };
        let rest = &text[first.len_utf8()..];
        match first {
            's' => {
                position(rest).map(|stream| RoomToken::Live(MultiWriterToken::at(stream))).ok_or_else(invalid)
            }
            't' => {
                let (topological, stream) = rest.split_once('-').ok_or_else(invalid)?;
                Ok(RoomToken::Historical {
                    topological: position(topological).ok_or_else(invalid)?,
                    // Backfilled events have negative stream orderings: `t3--5`.
                    stream: match stream.strip_prefix('-') {
                        Some(magnitude) => position(magnitude).map(|magnitude| -magnitude),
                        None => position(stream),
                    }
                    .ok_or_else(invalid)?,
                })
            }
            'm' => parse_vector(rest, ids).await?.map(RoomToken::Live).ok_or_else(invalid),
            _ => Err(invalid()),
        }
    }
}

/// A position or ID in a token: decimal digits only (no sign), as written.
fn position(text: &str) -> Option<i64> {
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// `m<stream>~<id>.<pos>…`, by instance ID.
async fn vector_text(token: &MultiWriterToken, ids: &InstanceIds) -> Result<String, StoreError> {
    let mut by_id = BTreeMap::new();
    for (writer, position) in token.instance_map() {
        by_id.insert(ids.id_for(writer).await?, *position);
    }
    let mut text = format!("m{}", token.stream());
    for (id, position) in by_id {
        let _ = write!(text, "~{id}.{position}");
    }
    Ok(text)
}

/// `<stream>~<id>.<pos>…` (after the `m`); `None` when malformed, when an
/// instance ID is unknown, or when the positions break the token's invariant.
/// Empty parts (`m5~`, from an old bug) are skipped.
async fn parse_vector(text: &str, ids: &InstanceIds) -> Result<Option<MultiWriterToken>, StoreError> {
    let mut parts = text.split('~');
    let Some(stream) = parts.next().and_then(position) else { return Ok(None) };
    let mut writers = BTreeMap::new();
    for part in parts.filter(|part| !part.is_empty()) {
        let Some((id, position)) = part.split_once('.') else { return Ok(None) };
        let (Some(id), Some(position)) = (self::position(id), self::position(position)) else {
            return Ok(None);
        };
        let Some(name) = ids.name_for(id).await? else { return Ok(None) };
        writers.insert(name, position);
    }
    Ok(MultiWriterToken::new(stream, writers).ok())
}
