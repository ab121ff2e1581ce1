//! How an event's membership is read from its content, once per event, and how
//! it reaches the wire in an `ev` row.

use crate::reader::event_row;
use crate::rows::EventsStreamRow;
use crate::{Event, NewEvent};

/// An event of `event_type` with `content`, persisted at 6287864 by
/// `event_persister1` (the wire vectors' member event).
fn event(event_type: &str, content: &str) -> Event {
    Event::new(
        6_287_864,
        "event_persister1".to_owned(),
        "!r:example.com".to_owned(),
        NewEvent {
            event_id: "$e2:example.com".to_owned(),
            event_type: event_type.to_owned(),
            state_key: Some("@u:example.com".to_owned()),
            sender: "@u:example.com".to_owned(),
            origin_server_ts: 1,
            content: content.to_owned(),
        },
    )
}

/// Checks that both readings of the membership of an event of `event_type` with
/// `content` give `expected`, that asking again gives it again, that asking
/// changes neither equality nor `Debug`, and that the event's `ev` row is
/// `wire`, byte for byte, both ways.
fn check(event_type: &str, content: &str, expected: Option<&str>, wire: &str) {
    let fresh = event(event_type, content);
    let asked = event(event_type, content);
    assert_eq!(asked.event.membership().as_deref(), expected, "NewEvent::membership of {content}");
    assert_eq!(asked.membership(), expected, "Event::membership of {content}");
    assert_eq!(asked.membership(), expected, "Event::membership of {content}, asked again");
    assert_eq!(asked.clone().membership(), expected, "a clone's membership of {content}");
    assert_eq!(asked, fresh, "{content}");
    assert_eq!(format!("{asked:?}"), format!("{fresh:?}"), "{content}");

    // The row of an event that was never asked parses the content itself; one
    // that was asked reuses what it parsed. Both give the same bytes.
    for event in [&fresh, &asked] {
        let row = EventsStreamRow::Event(event_row(event));
        assert_eq!(serde_json::to_string(&row).expect("a row serialises"), wire, "{content}");
        let parsed: EventsStreamRow = serde_json::from_str(wire).expect("the row parses back");
        assert_eq!(parsed, row, "{content}");
    }
}

/// The `ev` row of the test event with `event_type` and `membership` as JSON.
fn wire(event_type: &str, membership: &str) -> String {
    format!(
        r#"["ev",["$e2:example.com","!r:example.com","{event_type}","@u:example.com",null,null,{membership},false,false]]"#
    )
}

#[test]
fn membership_is_read_from_member_events_content() {
    for membership in ["join", "leave", "invite", "ban", "knock"] {
        let content = format!(r#"{{"membership":"{membership}","displayname":"U"}}"#);
        check(
            "m.room.member",
            &content,
            Some(membership),
            &wire("m.room.member", &format!(r#""{membership}""#)),
        );
    }
}

#[test]
fn join_row_matches_the_wire_vector() {
    // The member event of /work/shared/spec/golden/wire-vectors.json.
    check(
        "m.room.member",
        r#"{"membership":"join"}"#,
        Some("join"),
        r#"["ev",["$e2:example.com","!r:example.com","m.room.member","@u:example.com",null,null,"join",false,false]]"#,
    );
}

#[test]
fn missing_or_invalid_membership_is_none() {
    for content in [
        "{}",
        r#"{"displayname":"U"}"#,
        r#"{"membership":null}"#,
        r#"{"membership":5}"#,
        r#"{"membership":["join"]}"#,
        r#"["join"]"#,
        r#""join""#,
        "",
        "{not json",
        r#"{"membership":"join"} trailing"#,
    ] {
        check("m.room.member", content, None, &wire("m.room.member", "null"));
    }
}

#[test]
fn only_member_events_have_a_membership() {
    check("m.room.message", r#"{"membership":"join"}"#, None, &wire("m.room.message", "null"));
    check("m.room.topic", "{not json", None, &wire("m.room.topic", "null"));
}

#[test]
fn a_recorded_membership_is_not_parsed_again() {
    // Content that would parse to nothing shows which reading was used: the
    // catch-up's event takes the membership the writer recorded, as it is.
    let recorded = event("m.room.member", "{not json");
    recorded.remember_membership("join".to_owned());
    assert_eq!(recorded.membership(), Some("join"));
    assert_eq!(recorded, event("m.room.member", "{not json"));
    // Once known, it stays: a second record changes nothing.
    recorded.remember_membership("leave".to_owned());
    assert_eq!(recorded.membership(), Some("join"));
}
