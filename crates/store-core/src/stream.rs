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

    /// No rows: the follower is already at `token`.
    pub fn empty(token: i64) -> StreamUpdates<R> {
        StreamUpdates { rows: Vec::new(), token, limited: false }
    }
}
