//! `GET /_matrix/client/v3/rooms/{roomId}/messages`: a room's history, a page
//! at a time, from the `prev_batch` sync hands out or from the `start`/`end`
//! tokens of a page before.
//!
//! A page's position is a room token on the `events` stream (`s5`, or
//! `m5~1.6`: one position per writer), so pages are read as sync reads its
//! timelines: one range per writer, each event placed by its own writer's
//! position. Going back from token `T`, a page is the newest `limit` events
//! `T` covers, and the next page starts at `T` bounded below the oldest of
//! them; going forward, the oldest `limit` events past `T`, and the next page
//! starts at `T` advanced to the newest of them (by no writer past what this
//! process has seen). Either way the pages split the room's events between
//! them: every event once, in stream order, even when writers committed out
//! of order. Backfilled history (negative stream orderings) is not paged.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use store_core::{MultiWriterToken, RoomToken, TokenParseError};
use store_events::{Event, WriterFilter};

use super::rooms::check_room_id;
use super::sync::{SyncToken, catch_up_with_events, client_events, listed_writers};
use super::{ClientError, authenticate, writes};
use crate::http::AppState;

/// Events per page when the client does not say.
const DEFAULT_LIMIT: usize = 10;
/// The most events a page holds, whatever the client asks.
const MAX_LIMIT: usize = 1_000;

/// The routes of this module.
pub(super) fn router() -> Router<AppState> {
    Router::new().route("/_matrix/client/v3/rooms/{room_id}/messages", get(messages))
}

/// Which way a page goes through the room's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Towards the room's creation (`dir=b`): newest first.
    Backwards,
    /// Towards the present (`dir=f`): oldest first.
    Forwards,
}

#[derive(Debug, Deserialize)]
pub(super) struct MessagesParams {
    from: Option<String>,
    to: Option<String>,
    dir: Option<String>,
    limit: Option<String>,
    filter: Option<String>,
}

/// `GET /rooms/{roomId}/messages?from=&to=&dir=&limit=&filter=` →
/// `{"chunk", "start", "end"?}`; `end` is left out when nothing lies further.
async fn messages(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(room_id): Path<String>,
    Query(params): Query<MessagesParams>,
) -> Result<Json<Value>, ClientError> {
    let user_id = authenticate(&state, &headers).await?;
    check_room_id(&room_id)?;
    let direction = match params.dir.as_deref() {
        Some("b") => Direction::Backwards,
        Some("f") => Direction::Forwards,
        Some(_) => return Err(ClientError::invalid_param("dir must be `b` or `f`")),
        None => return Err(ClientError::new(StatusCode::BAD_REQUEST, "M_MISSING_PARAM", "dir is needed")),
    };
    let limit = page_limit(params.limit.as_deref(), params.filter.as_deref())?;
    let from = match params.from.as_deref() {
        Some(text) => Some(parse_token(&state, text).await?),
        None => None,
    };
    let to = match params.to.as_deref() {
        Some(text) => Some(parse_token(&state, text).await?),
        None => None,
    };
    let left_at = visible_until(&state, &room_id, &user_id).await?;
    for token in from.iter().chain(&to) {
        catch_up_with_events(&state, token).await?;
    }

    // What this process has seen, and no further than the user may see.
    let mut now = MultiWriterToken::from_generator(state.store.events().events_stream());
    if let Some(left_at) = left_at {
        now = now.bound(left_at);
    }
    let from = from.unwrap_or_else(|| match direction {
        Direction::Backwards => now.clone(),
        Direction::Forwards => MultiWriterToken::at(0),
    });
    let page = match direction {
        Direction::Backwards => {
            // A user who left sees nothing past the leave, whatever the token.
            let high = left_at.map_or_else(|| from.clone(), |left_at| from.bound(left_at));
            page_backwards(&state, &room_id, &high, to.as_ref(), limit).await?
        }
        Direction::Forwards => {
            // `to` was waited for: this process has seen what it covers.
            let high = to.unwrap_or_else(|| now.clone());
            let high = left_at.map_or_else(|| high.clone(), |left_at| high.bound(left_at));
            page_forwards(&state, &room_id, &from, &high, limit).await?
        }
    };

    let ids = &state.instance_ids;
    let mut answer = json!({
        "chunk": client_events(&state, &user_id, &page.events).await?,
        "start": RoomToken::Live(from).to_text(ids).await?,
    });
    if let Some(end) = page.end {
        answer["end"] = json!(RoomToken::Live(end).to_text(ids).await?);
    }
    Ok(Json(answer))
}

/// The page size: `limit`, and an inline filter's `limit` (the smaller when
/// both are given).
fn page_limit(limit: Option<&str>, filter: Option<&str>) -> Result<usize, ClientError> {
    let positive = |limit: Option<u64>| {
        limit
            .filter(|limit| *limit > 0)
            .map(|limit| usize::try_from(limit).unwrap_or(MAX_LIMIT).min(MAX_LIMIT))
            .ok_or_else(|| ClientError::invalid_param("limit must be a positive integer"))
    };
    let from_query = limit.map(|limit| positive(limit.parse().ok())).transpose()?;
    let from_filter = match filter {
        None => None,
        Some(filter) => {
            let filter: Value =
                serde_json::from_str(filter).ok().filter(Value::is_object).ok_or_else(|| {
                    ClientError::invalid_param(
                        "filter must be an inline JSON filter; stored filter IDs are not supported",
                    )
                })?;
            match &filter["limit"] {
                Value::Null => None,
                limit => Some(positive(limit.as_u64())?),
            }
        }
    };
    Ok(match (from_query, from_filter) {
        (Some(query), Some(filter)) => query.min(filter),
        (query, filter) => query.or(filter).unwrap_or(DEFAULT_LIMIT),
    })
}

/// A position on the `events` stream from a client: a room token (`s5`,
/// `m5~1.6`, or `t3-5`, taken at its stream position) or a sync token's
/// events part. One past anything this deployment's stream handed out is
/// refused at once; one this process has not reached yet is waited for
/// later, as sync waits.
async fn parse_token(state: &AppState, text: &str) -> Result<MultiWriterToken, ClientError> {
    let invalid = || ClientError::invalid_param(format!("Invalid pagination token: {text:?}"));
    let token = match RoomToken::parse(text, &state.instance_ids).await {
        Ok(RoomToken::Live(token)) => token,
        // This server has no topological order of its own: a room's events
        // are ordered by stream, and a backfilled position is before them all.
        Ok(RoomToken::Historical { stream, .. }) => MultiWriterToken::at(stream.max(0)),
        Err(TokenParseError::Store(err)) => return Err(err.into()),
        Err(_) if text.contains('_') => SyncToken::parse(text, &state.instance_ids).await?.events().clone(),
        Err(_) => return Err(invalid()),
    };
    let generator = state.store.events().events_stream();
    let furthest = token.max_pos();
    if furthest > MultiWriterToken::from_generator(generator).max_pos()
        && !generator.is_handed_out(furthest).await?
    {
        return Err(ClientError::invalid_param(format!("{text:?} is past anything this server handed out")));
    }
    Ok(token)
}

/// Whether `user_id` may read `room_id`'s history, and up to where: `None`
/// while joined, the stream position of the membership that ended it after a
/// leave. A user never joined is refused (404 for a room this server does not
/// know). Members see the room's history from its creation, as sync shows
/// it to a newly joined member.
async fn visible_until(state: &AppState, room_id: &str, user_id: &str) -> Result<Option<i64>, ClientError> {
    let history = state.store.events().get_membership_history(user_id).await?;
    let in_room: Vec<_> = history.iter().filter(|change| change.room_id == room_id).collect();
    if !in_room.iter().any(|change| change.membership == "join") {
        if !writes::room_exists(state, room_id).await? {
            return Err(ClientError::not_found(format!("unknown room {room_id}")));
        }
        return Err(ClientError::forbidden(format!("{user_id} is not in the room")));
    }
    Ok(in_room.last().filter(|last| last.membership != "join").map(|last| last.stream_ordering))
}

/// A page of a room's history and where the next one starts, if anything
/// lies beyond it.
#[derive(Debug)]
struct Page {
    events: Vec<Event>,
    end: Option<MultiWriterToken>,
}

/// The newest `limit` events of `room_id` that `high` covers and `low` (if
/// given) does not, newest first.
async fn page_backwards(
    state: &AppState,
    room_id: &str,
    high: &MultiWriterToken,
    low: Option<&MultiWriterToken>,
    limit: usize,
) -> Result<Page, ClientError> {
    let mut events = read_range(state, room_id, low, high, limit + 1, Direction::Backwards).await?;
    events.sort_by_key(|event| std::cmp::Reverse(event.stream_ordering));
    let more = events.len() > limit;
    events.truncate(limit);
    // What is left lies below the oldest event of the page, by every writer.
    let end = match events.last() {
        Some(oldest) if more => Some(high.bound(oldest.stream_ordering - 1)),
        _ => None,
    };
    Ok(Page { events, end })
}

/// The oldest `limit` events of `room_id` that `high` covers and `low` does
/// not, oldest first.
async fn page_forwards(
    state: &AppState,
    room_id: &str,
    low: &MultiWriterToken,
    high: &MultiWriterToken,
    limit: usize,
) -> Result<Page, ClientError> {
    let mut events = read_range(state, room_id, Some(low), high, limit + 1, Direction::Forwards).await?;
    events.sort_by_key(|event| event.stream_ordering);
    let more = events.len() > limit;
    events.truncate(limit);
    // What is left lies above the newest event of the page, by every writer,
    // and within `high` (a writer behind it may still commit below it).
    let end = match events.last() {
        Some(newest) if more => Some(low.copy_and_advance(&high.bound(newest.stream_ordering))),
        _ => None,
    };
    Ok(Page { events, end })
}

/// Up to `limit` events of `room_id` from each writer's range `(low, high]`,
/// from the end `direction` starts at (unsorted across writers).
///
/// The writers neither token lists are all at the tokens' stream positions:
/// one query per listed writer and one for the rest, as sync's timelines.
async fn read_range(
    state: &AppState,
    room_id: &str,
    low: Option<&MultiWriterToken>,
    high: &MultiWriterToken,
    limit: usize,
    direction: Direction,
) -> Result<Vec<Event>, ClientError> {
    let reader = state.store.events();
    let listed = listed_writers(low, high);
    let after = |writer: Option<&str>| {
        low.map_or(0, |low| writer.map_or(low.stream(), |writer| low.pos_for(writer))).max(0)
    };
    let mut ranges: Vec<(WriterFilter, i64, i64)> = listed
        .iter()
        .map(|writer| (WriterFilter::Only(writer.clone()), after(Some(writer)), high.pos_for(writer)))
        .collect();
    ranges.push((WriterFilter::AllBut(listed.clone()), after(None), high.stream()));
    let mut events = Vec::new();
    for (writers, from, to) in &ranges {
        events.extend(match direction {
            Direction::Backwards => {
                reader.get_room_events_of_writers(room_id, writers, *from, *to, limit).await?
            }
            Direction::Forwards => {
                reader.get_oldest_room_events_of_writers(room_id, writers, *from, *to, limit).await?
            }
        });
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::{DEFAULT_LIMIT, MAX_LIMIT, page_limit};

    #[test]
    fn the_page_size_comes_from_the_query_and_an_inline_filter() {
        assert_eq!(page_limit(None, None).ok(), Some(DEFAULT_LIMIT));
        assert_eq!(page_limit(Some("7"), None).ok(), Some(7));
        assert_eq!(page_limit(None, Some(r#"{"limit":5}"#)).ok(), Some(5));
        assert_eq!(page_limit(Some("7"), Some(r#"{"limit":5}"#)).ok(), Some(5));
        assert_eq!(page_limit(Some("3"), Some(r#"{"limit":5}"#)).ok(), Some(3));
        assert_eq!(page_limit(Some("7"), Some(r#"{"types":["m.room.message"]}"#)).ok(), Some(7));
        assert_eq!(page_limit(Some("5000"), None).ok(), Some(MAX_LIMIT));
        for (limit, filter) in [
            (Some("0"), None),
            (Some("-1"), None),
            (Some("a"), None),
            (None, Some("12")),
            (None, Some("{")),
            (None, Some(r#"{"limit":0}"#)),
            (None, Some(r#"{"limit":"5"}"#)),
        ] {
            assert!(page_limit(limit, filter).is_err(), "{limit:?} {filter:?}");
        }
    }
}
