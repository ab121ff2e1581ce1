//! What every database-backed stream answers when a follower catches up.

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
    /// No rows: the follower is already at `token`.
    pub fn empty(token: i64) -> StreamUpdates<R> {
        StreamUpdates { rows: Vec::new(), token, limited: false }
    }
}
