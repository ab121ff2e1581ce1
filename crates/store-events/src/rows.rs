//! The rows of the `events` and `backfill` streams, in their wire form.
//!
//! An `events` row is `[kind, data]`: `["ev", [event_id, room_id, type, state_key,
//! redacts, relates_to, membership, rejected, outlier]]` for a new event,
//! `["state", [room_id, type, state_key, event_id]]` for a change of current
//! state, `["state-all", [room_id]]` when all of a room's state changed. A
//! `backfill` row is `[event_id, room_id, type, state_key, redacts, relates_to]`,
//! its token the negated stream ordering.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A new event on the `events` stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    /// The event's ID.
    pub event_id: String,
    /// Its room.
    pub room_id: String,
    /// Its type.
    pub event_type: String,
    /// Its state key, for state events.
    pub state_key: Option<String>,
    /// The event it redacts, if any.
    pub redacts: Option<String>,
    /// The event it relates to, if any.
    pub relates_to: Option<String>,
    /// For membership events, the membership.
    pub membership: Option<String>,
    /// Whether the event was rejected.
    pub rejected: bool,
    /// Whether it is an outlier (not part of the room's timeline).
    pub outlier: bool,
}

/// A change of one entry of a room's current state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentStateRow {
    /// The room.
    pub room_id: String,
    /// The state entry's type.
    pub event_type: String,
    /// The state entry's key.
    pub state_key: String,
    /// The event now in that entry; `None` when the entry was removed.
    pub event_id: Option<String>,
}

/// A row of the `events` stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventsStreamRow {
    /// `ev`: an event was persisted.
    Event(EventRow),
    /// `state`: an entry of a room's current state changed.
    State(CurrentStateRow),
    /// `state-all`: all of a room's current state changed.
    StateAll {
        /// The room.
        room_id: String,
    },
}

type EventTuple =
    (String, String, String, Option<String>, Option<String>, Option<String>, Option<String>, bool, bool);
type StateTuple = (String, String, String, Option<String>);

impl Serialize for EventsStreamRow {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            EventsStreamRow::Event(row) => {
                let data: EventTuple = (
                    row.event_id.clone(),
                    row.room_id.clone(),
                    row.event_type.clone(),
                    row.state_key.clone(),
                    row.redacts.clone(),
                    row.relates_to.clone(),
                    row.membership.clone(),
                    row.rejected,
                    row.outlier,
                );
                ("ev", data).serialize(serializer)
            }
            EventsStreamRow::State(row) => {
                let data: StateTuple = (
                    row.room_id.clone(),
                    row.event_type.clone(),
                    row.state_key.clone(),
                    row.event_id.clone(),
                );
                ("state", data).serialize(serializer)
            }
            EventsStreamRow::StateAll { room_id } => ("state-all", (room_id,)).serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for EventsStreamRow {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (kind, data): (String, serde_json::Value) = Deserialize::deserialize(deserializer)?;
        match kind.as_str() {
            "ev" => {
                let (
                    event_id,
                    room_id,
                    event_type,
                    state_key,
                    redacts,
                    relates_to,
                    membership,
                    rejected,
                    outlier,
                ): EventTuple = serde_json::from_value(data).map_err(D::Error::custom)?;
                Ok(EventsStreamRow::Event(EventRow {
                    event_id,
                    room_id,
                    event_type,
                    state_key,
                    redacts,
                    relates_to,
                    membership,
                    rejected,
                    outlier,
                }))
            }
            "state" => {
                let (room_id, event_type, state_key, event_id): StateTuple =
                    serde_json::from_value(data).map_err(D::Error::custom)?;
                Ok(EventsStreamRow::State(CurrentStateRow { room_id, event_type, state_key, event_id }))
            }
            "state-all" => {
                let (room_id,): (String,) = serde_json::from_value(data).map_err(D::Error::custom)?;
                Ok(EventsStreamRow::StateAll { room_id })
            }
            other => Err(D::Error::custom(format!("unknown events row kind `{other}`"))),
        }
    }
}

/// A backfilled event on the `backfill` stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "BackfillTuple", into = "BackfillTuple")]
pub struct BackfillRow {
    /// The event's ID.
    pub event_id: String,
    /// Its room.
    pub room_id: String,
    /// Its type.
    pub event_type: String,
    /// Its state key, for state events.
    pub state_key: Option<String>,
    /// The event it redacts, if any.
    pub redacts: Option<String>,
    /// The event it relates to, if any.
    pub relates_to: Option<String>,
}

type BackfillTuple = (String, String, String, Option<String>, Option<String>, Option<String>);

impl From<BackfillTuple> for BackfillRow {
    fn from((event_id, room_id, event_type, state_key, redacts, relates_to): BackfillTuple) -> Self {
        BackfillRow { event_id, room_id, event_type, state_key, redacts, relates_to }
    }
}

impl From<BackfillRow> for BackfillTuple {
    fn from(row: BackfillRow) -> Self {
        (row.event_id, row.room_id, row.event_type, row.state_key, row.redacts, row.relates_to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `json` as `T`, compares with `expected`, and serialises it back to
    /// the same bytes.
    fn check<T>(json: &str, expected: &T)
    where
        T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug,
    {
        let parsed: T = serde_json::from_str(json).unwrap_or_else(|err| panic!("{json}: {err}"));
        assert_eq!(&parsed, expected);
        assert_eq!(serde_json::to_string(&parsed).unwrap(), json);
    }

    #[test]
    fn events_rows_match_the_wire_vectors() {
        check(
            r#"["ev",["$e1:example.com","!r:example.com","m.room.message",null,null,null,null,false,false]]"#,
            &EventsStreamRow::Event(EventRow {
                event_id: "$e1:example.com".to_owned(),
                room_id: "!r:example.com".to_owned(),
                event_type: "m.room.message".to_owned(),
                state_key: None,
                redacts: None,
                relates_to: None,
                membership: None,
                rejected: false,
                outlier: false,
            }),
        );
        check(
            r#"["ev",["$e2:example.com","!r:example.com","m.room.member","@u:example.com",null,null,"join",false,false]]"#,
            &EventsStreamRow::Event(EventRow {
                event_id: "$e2:example.com".to_owned(),
                room_id: "!r:example.com".to_owned(),
                event_type: "m.room.member".to_owned(),
                state_key: Some("@u:example.com".to_owned()),
                redacts: None,
                relates_to: None,
                membership: Some("join".to_owned()),
                rejected: false,
                outlier: false,
            }),
        );
        check(
            r#"["state",["!r:example.com","m.room.member","@u:example.com","$e2:example.com"]]"#,
            &EventsStreamRow::State(CurrentStateRow {
                room_id: "!r:example.com".to_owned(),
                event_type: "m.room.member".to_owned(),
                state_key: "@u:example.com".to_owned(),
                event_id: Some("$e2:example.com".to_owned()),
            }),
        );
        check(
            r#"["state-all",["!r:example.com"]]"#,
            &EventsStreamRow::StateAll { room_id: "!r:example.com".to_owned() },
        );
    }

    #[test]
    fn backfill_rows_match_the_wire_vectors() {
        check(
            r#"["$old:example.com","!r:example.com","m.room.message",null,null,null]"#,
            &BackfillRow {
                event_id: "$old:example.com".to_owned(),
                room_id: "!r:example.com".to_owned(),
                event_type: "m.room.message".to_owned(),
                state_key: None,
                redacts: None,
                relates_to: None,
            },
        );
    }

    #[test]
    fn malformed_rows_are_errors() {
        for json in [r#"["nope",[]]"#, r#"["ev",["$e"]]"#, r#"["state",[1,2,3,4]]"#, "[]", r#"{"a":1}"#] {
            assert!(serde_json::from_str::<EventsStreamRow>(json).is_err(), "{json}");
        }
    }
}
