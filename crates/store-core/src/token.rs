//! [`MultiWriterToken`]: a position on a stream with several writers, as a
//! vector clock that is cheap when the writers are level.
//!
//! A token is a `stream` position that every writer has reached, plus the
//! positions of the writers that are further ahead. A row written by writer `W`
//! at position `s` is covered by the token when `s ≤ pos_for(W)`. Tokens given
//! to clients are built from what this process has applied; a token coming
//! back from a client may be ahead of what a lagging process has applied, which
//! [`MultiWriterIdGenerator::wait_for_token`] waits out.

mod text;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub use text::{InstanceIds, RoomToken, TokenParseError};

use crate::{MultiWriterIdGenerator, StoreError};

/// A multi-writer stream position: `stream`, which every writer has reached,
/// and the writers ahead of it with their positions.
///
/// ```
/// use std::collections::BTreeMap;
/// use store_core::MultiWriterToken;
///
/// let token = MultiWriterToken::new(5, BTreeMap::from([("persister1".to_owned(), 7)]))?;
/// assert_eq!(token.pos_for("persister1"), 7);
/// assert_eq!(token.pos_for("persister2"), 5);
/// assert!(token.persisted_after("persister2", 6), "persister2's row 6 is not covered yet");
/// # Ok::<(), store_core::TokenError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MultiWriterToken {
    stream: i64,
    instance_map: BTreeMap<String, i64>,
}

/// A token that breaks the invariant: a listed writer not ahead of the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("writer `{writer}` at {position} is not ahead of the token's stream position {stream}")]
pub struct TokenError {
    /// The writer listed.
    pub writer: String,
    /// Its position in the token.
    pub position: i64,
    /// The token's stream position.
    pub stream: i64,
}

impl MultiWriterToken {
    /// A token at `stream` with the writers of `instance_map` ahead of it; every
    /// listed position must be greater than `stream`.
    pub fn new(stream: i64, instance_map: BTreeMap<String, i64>) -> Result<MultiWriterToken, TokenError> {
        if let Some((writer, position)) = instance_map.iter().find(|(_, position)| **position <= stream) {
            return Err(TokenError { writer: writer.clone(), position: *position, stream });
        }
        Ok(MultiWriterToken { stream, instance_map })
    }

    /// A token with every writer at `stream`.
    pub fn at(stream: i64) -> MultiWriterToken {
        MultiWriterToken { stream, instance_map: BTreeMap::new() }
    }

    /// Builds the invariant-keeping token from a current token and per-writer
    /// positions: only the writers ahead of `current` are listed.
    pub fn from_positions(current: i64, positions: &BTreeMap<String, i64>) -> MultiWriterToken {
        let ahead = positions
            .iter()
            .filter(|(_, position)| **position > current)
            .map(|(writer, position)| (writer.clone(), *position))
            .collect();
        MultiWriterToken { stream: current, instance_map: ahead }
    }

    /// What this process has applied of `generator`'s stream: a token to hand to
    /// a client.
    pub fn from_generator(generator: &MultiWriterIdGenerator) -> MultiWriterToken {
        MultiWriterToken::from_positions(generator.get_current_token(), &generator.get_positions())
    }

    /// The position every writer has reached.
    pub fn stream(&self) -> i64 {
        self.stream
    }

    /// The writers ahead of [`MultiWriterToken::stream`], with their positions.
    pub fn instance_map(&self) -> &BTreeMap<String, i64> {
        &self.instance_map
    }

    /// `writer`'s position in this token.
    pub fn pos_for(&self, writer: &str) -> i64 {
        self.instance_map.get(writer).copied().unwrap_or(self.stream)
    }

    /// The furthest position of any writer.
    pub fn max_pos(&self) -> i64 {
        self.instance_map.values().copied().max().unwrap_or(self.stream).max(self.stream)
    }

    /// The token covering both: the furthest of each writer's positions.
    #[must_use]
    pub fn copy_and_advance(&self, other: &MultiWriterToken) -> MultiWriterToken {
        let stream = self.stream.max(other.stream);
        let mut positions = BTreeMap::new();
        for writer in self.instance_map.keys().chain(other.instance_map.keys()) {
            positions.insert(writer.clone(), self.pos_for(writer).max(other.pos_for(writer)));
        }
        MultiWriterToken::from_positions(stream, &positions)
    }

    /// Whether everything this token covers, `other` covers too. A partial
    /// order: two tokens may each be ahead of the other for different writers.
    pub fn is_before_or_eq(&self, other: &MultiWriterToken) -> bool {
        self.stream <= other.stream
            && self
                .instance_map
                .keys()
                .chain(other.instance_map.keys())
                .all(|writer| self.pos_for(writer) <= other.pos_for(writer))
    }

    /// This token with no writer past `max`: for a token from a client that is
    /// ahead of anything allocated.
    #[must_use]
    pub fn bound(&self, max: i64) -> MultiWriterToken {
        if self.max_pos() <= max {
            return self.clone();
        }
        let stream = self.stream.min(max);
        let positions: BTreeMap<String, i64> = self
            .instance_map
            .iter()
            .map(|(writer, position)| (writer.clone(), (*position).min(max)))
            .collect();
        MultiWriterToken::from_positions(stream, &positions)
    }

    /// Whether a row `writer` wrote at `position` lies after this token (is
    /// not covered by it).
    pub fn persisted_after(&self, writer: &str, position: i64) -> bool {
        self.pos_for(writer) < position
    }

    /// Whether a row `writer` wrote at `position` lies in `(low, high]`; a
    /// missing bound is open. A row with no writer recorded counts as the
    /// tokens' `stream` positions say.
    pub fn in_range(
        low: Option<&MultiWriterToken>,
        high: Option<&MultiWriterToken>,
        writer: Option<&str>,
        position: i64,
    ) -> bool {
        let pos_in = |token: &MultiWriterToken| writer.map_or(token.stream, |writer| token.pos_for(writer));
        low.is_none_or(|low| position > pos_in(low)) && high.is_none_or(|high| position <= pos_in(high))
    }
}

impl MultiWriterIdGenerator {
    /// Waits until this process has applied everything `token` covers: every
    /// writer it knows, and every writer the token lists, at or past its
    /// position in the token. The one wait every read that takes a token from a
    /// client does first, so that a lagging process never answers with less
    /// than the token promised. Fails with [`StoreError::Timeout`] naming the
    /// first writer still behind after `timeout`. For positive streams.
    pub async fn wait_for_token(
        &self,
        token: &MultiWriterToken,
        timeout: Duration,
    ) -> Result<(), StoreError> {
        let deadline = Instant::now() + timeout;
        let mut writers: Vec<String> = self.get_positions().into_keys().collect();
        writers.extend(token.instance_map().keys().cloned());
        writers.sort();
        writers.dedup();
        for writer in writers {
            let left = deadline.saturating_duration_since(Instant::now());
            self.wait_for(&writer, token.pos_for(&writer), left).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::MultiWriterToken;

    fn token(stream: i64, ahead: &[(&str, i64)]) -> MultiWriterToken {
        let map = ahead.iter().map(|(writer, position)| ((*writer).to_owned(), *position)).collect();
        MultiWriterToken::new(stream, map).expect("a valid token")
    }

    #[test]
    fn listed_writers_must_be_ahead_of_the_stream() {
        for position in [5, 4] {
            let error = MultiWriterToken::new(5, BTreeMap::from([("foo".to_owned(), position)]))
                .expect_err("not ahead of the stream");
            assert_eq!((error.writer.as_str(), error.position, error.stream), ("foo", position, 5));
        }
        assert_eq!(token(5, &[("foo", 6)]).pos_for("foo"), 6);
    }

    #[test]
    fn the_spec_token_algebra() {
        let a = token(5, &[("x", 7)]);
        let b = token(6, &[("y", 8)]);
        assert_eq!(a.copy_and_advance(&b), token(6, &[("x", 7), ("y", 8)]));
        let level = token(6, &[]);
        assert!(!a.is_before_or_eq(&level), "x is at 7 in a, 6 in level");
        assert!(!level.is_before_or_eq(&a), "level's stream 6 is past a's 5");
        let wide = token(5, &[("x", 9), ("y", 7)]);
        assert_eq!(wide.bound(8), token(5, &[("x", 8), ("y", 7)]));
        assert_eq!(wide.bound(4), token(4, &[]));
        assert_eq!(wide.bound(9), wide);
        let positions =
            BTreeMap::from([("first".to_owned(), 3), ("second".to_owned(), 9), ("third".to_owned(), 7)]);
        assert_eq!(MultiWriterToken::from_positions(7, &positions), token(7, &[("second", 9)]));
    }

    #[test]
    fn copy_and_advance_drops_writers_the_stream_caught_up_with() {
        let a = token(5, &[("x", 7)]);
        let b = token(8, &[]);
        assert_eq!(a.copy_and_advance(&b), token(8, &[]));
        assert!(a.is_before_or_eq(&a.copy_and_advance(&b)) && b.is_before_or_eq(&a.copy_and_advance(&b)));
    }

    #[test]
    fn rows_are_in_range_by_their_writer_s_positions() {
        let low = token(5, &[("x", 7)]);
        let high = token(9, &[("y", 12)]);
        assert!(!MultiWriterToken::in_range(Some(&low), Some(&high), Some("x"), 7), "x's 7 is in low");
        assert!(MultiWriterToken::in_range(Some(&low), Some(&high), Some("x"), 8));
        assert!(MultiWriterToken::in_range(Some(&low), Some(&high), Some("y"), 6), "y was at 5 in low");
        assert!(MultiWriterToken::in_range(Some(&low), Some(&high), Some("y"), 12));
        assert!(!MultiWriterToken::in_range(Some(&low), Some(&high), Some("y"), 13));
        assert!(!MultiWriterToken::in_range(Some(&low), Some(&high), Some("z"), 10), "z is at 9 in high");
        assert!(MultiWriterToken::in_range(None, Some(&high), None, 1));
        assert!(MultiWriterToken::in_range(Some(&low), None, Some("x"), 1_000));
        assert!(low.persisted_after("y", 6) && !low.persisted_after("x", 7));
        assert_eq!((low.max_pos(), token(4, &[]).max_pos()), (7, 4));
    }
}
