//! Streams as replication sees them: the [`Stream`] trait and the
//! [`StreamRegistry`] of a process, [`StreamUpdates`] (what every
//! database-backed stream answers when a follower catches up), and
//! [`MultiWriterSource`], which makes a [`Stream`] of a store reader whose
//! stream has a [`MultiWriterIdGenerator`](crate::MultiWriterIdGenerator).

mod caches;
mod multi_writer;
mod replicated;
mod spec;

pub use caches::CachesStreamAdapter;
pub use multi_writer::{MultiWriterSource, decode_rows, to_wire};
pub use replicated::{Stream, StreamRegistry};
pub use spec::{StreamSpec, WriterRule, agree_on_writers, check_stream_writers};

use crate::{Database, Row, StoreError};

/// A batch of stream rows for catch-up: the rows, the token reached, and whether
/// the limit cut the batch (so more rows remain after the token and the follower
/// asks again from there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamUpdates<R> {
    /// `(token, row)` pairs, ascending by token; several rows may share one.
    pub rows: Vec<(i64, R)>,
    /// The token the rows reach.
    pub token: i64,
    /// Whether rows remain after `token`.
    pub limited: bool,
}

impl<R> StreamUpdates<R> {
    /// The result of a query for rows up to `to` that returned `rows` (ascending)
    /// under a limit of `limit`: a full page means the limit cut it, so the
    /// token reached is its last row's and the follower asks again from there.
    pub fn from_page(rows: Vec<(i64, R)>, to: i64, limit: usize) -> StreamUpdates<R> {
        let limited = limit > 0 && rows.len() >= limit;
        let token = match rows.last() {
            Some((last, _)) if limited => *last,
            _ => to,
        };
        StreamUpdates { rows, token, limited }
    }

    /// Runs a store's catch-up query: `sql` takes `$1` the writer, `$2` and `$3`
    /// the bounds (`from < id ≤ to`) and `$4` the limit, and returns rows in
    /// ascending order, which `decode` turns into `(token, row)` pairs.
    #[expect(clippy::too_many_arguments, reason = "the query's four parameters plus what runs it")]
    pub async fn fetch(
        db: &Database,
        interaction: &'static str,
        sql: &str,
        writer: &str,
        from: i64,
        to: i64,
        limit: usize,
        decode: fn(&Row) -> Result<(i64, R), StoreError>,
    ) -> Result<StreamUpdates<R>, StoreError>
    where
        R: Send + 'static,
    {
        if from >= to {
            return Ok(StreamUpdates::empty(to));
        }
        let (sql, writer) = (sql.to_owned(), writer.to_owned());
        let limit_param = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = db
            .run_autocommit(interaction, move |txn| {
                let (sql, writer) = (sql.clone(), writer.clone());
                Box::pin(async move {
                    let rows = txn.query(&sql, &[&writer, &from, &to, &limit_param]).await?;
                    rows.iter().map(decode).collect::<Result<Vec<_>, StoreError>>()
                })
            })
            .await?;
        Ok(StreamUpdates::from_page(rows, to, limit))
    }

    /// No rows: the follower is already at `token`.
    pub fn empty(token: i64) -> StreamUpdates<R> {
        StreamUpdates { rows: Vec::new(), token, limited: false }
    }
}
