//! Golden lines from the spec's wire vectors, and a fuzz harness for the parser.

use std::path::Path;

use proptest::prelude::*;

use super::{Command, CommandName, RowJson, Side};

/// The spec's vectors live beside the checkout, in `shared/spec/golden/`.
fn vectors() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/spec/golden/wire-vectors.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("the spec's wire vectors are expected at {}: {err}", path.display()));
    serde_json::from_str(&text).expect("the vectors are JSON")
}

fn text(fields: &serde_json::Value, name: &str) -> String {
    fields[name].as_str().unwrap_or_else(|| panic!("field {name} in {fields}")).to_owned()
}

fn optional(fields: &serde_json::Value, name: &str) -> Option<String> {
    fields[name].as_str().map(str::to_owned)
}

fn number(fields: &serde_json::Value, name: &str) -> i64 {
    fields[name].as_i64().unwrap_or_else(|| panic!("field {name} in {fields}"))
}

/// The command a vector's fields describe.
fn expected(command: &str, fields: &serde_json::Value) -> Command {
    match command {
        "SERVER" => Command::Server { server_name: text(fields, "server_name") },
        "NAME" => Command::Name { name: text(fields, "name") },
        "PING" => Command::Ping { data: text(fields, "data") },
        "ERROR" => Command::Error { message: text(fields, "message") },
        "REPLICATE" => Command::Replicate,
        "POSITION" => Command::Position {
            stream: text(fields, "stream"),
            instance: text(fields, "instance"),
            prev_token: number(fields, "prev_token"),
            new_token: number(fields, "new_token"),
        },
        "USER_SYNC" => Command::UserSync {
            instance_id: text(fields, "instance_id"),
            user_id: text(fields, "user_id"),
            device_id: optional(fields, "device_id"),
            is_syncing: fields["is_syncing"].as_bool().expect("a boolean"),
            last_sync_ms: number(fields, "last_sync_ms"),
        },
        "CLEAR_USER_SYNC" => Command::ClearUserSync { instance_id: text(fields, "instance_id") },
        "FEDERATION_ACK" => {
            Command::FederationAck { instance: text(fields, "instance"), token: number(fields, "token") }
        }
        "USER_IP" => Command::UserIp {
            user_id: text(fields, "user_id"),
            access_token: text(fields, "access_token"),
            ip: text(fields, "ip"),
            user_agent: text(fields, "user_agent"),
            device_id: optional(fields, "device_id"),
            last_seen: number(fields, "last_seen"),
        },
        "REMOTE_SERVER_UP" => Command::RemoteServerUp { server_name: text(fields, "server_name") },
        "LOCK_RELEASED" => Command::LockReleased {
            instance: text(fields, "instance"),
            lock_name: text(fields, "lock_name"),
            lock_key: text(fields, "lock_key"),
        },
        "NEW_ACTIVE_TASK" => Command::NewActiveTask { task_id: text(fields, "task_id") },
        other => panic!("no expectation written for {other}"),
    }
}

#[test]
fn every_valid_vector_parses_to_its_fields_and_back_to_its_bytes() {
    let vectors = vectors();
    let valid = vectors["valid_commands"].as_array().expect("a list");
    assert!(valid.len() >= 15);
    for vector in valid {
        let line = vector["line"].as_str().expect("a line");
        let command = Command::parse(line).unwrap_or_else(|err| panic!("{line:?}: {err}"));
        assert_eq!(
            command,
            expected(vector["command"].as_str().expect("a name"), &vector["fields"]),
            "{line:?}"
        );
        assert_eq!(command.to_line().expect("sendable"), line);
    }
    assert_eq!(Command::parse("REPLICATE").unwrap(), Command::Replicate, "without its trailing space too");
}

#[test]
fn every_rdata_vector_parses_and_serialises_back() {
    let vectors = vectors();
    for vector in vectors["rdata_rows"].as_array().expect("a list") {
        let line = vector["line"].as_str().expect("a line");
        let Command::Rdata { stream, instance, token, row } =
            Command::parse(line).unwrap_or_else(|err| panic!("{line:?}: {err}"))
        else {
            panic!("{line:?} is not RDATA");
        };
        assert_eq!(stream, vector["stream"].as_str().unwrap());
        assert_eq!(instance, vector["instance"].as_str().unwrap());
        assert_eq!(token, vector["token"].as_i64());
        let command = Command::Rdata { stream, instance, token, row };
        assert_eq!(command.to_line().unwrap(), line);
    }
}

#[test]
fn every_invalid_vector_is_refused() {
    let vectors = vectors();
    for vector in vectors["invalid_lines"].as_array().expect("a list") {
        let line = vector["line"].as_str().expect("a line");
        assert!(Command::parse(line).is_err(), "{line:?} must be refused");
    }
}

#[test]
fn more_malformed_lines_are_refused() {
    for line in [
        "",
        "ping 1",
        "RDATA events master 5",
        "RDATA events master 5 ",
        "RDATA events master 1.5 [1]",
        "RDATA events master 5 [Infinity]",
        "POSITION events master 1 2 3",
        "POSITION events master 1_ 2",
        "USER_SYNC a b c start",
        "USER_SYNC a b c start soon",
        "FEDERATION_ACK a 1 2",
        "FEDERATION_ACK a ",
        "USER_IP @u",
        "USER_IP @u [\"t\",\"ip\"]",
        "LOCK_RELEASED [\"a\",\"b\"]",
    ] {
        assert!(Command::parse(line).is_err(), "{line:?} must be refused");
    }
}

#[test]
fn integers_parse_as_synapse_reads_them() {
    let position = |text: &str| match Command::parse(&format!("POSITION s i 1 {text}")) {
        Ok(Command::Position { new_token, .. }) => Some(new_token),
        _ => None,
    };
    assert_eq!(position("12"), Some(12));
    assert_eq!(position("-3"), Some(-3));
    assert_eq!(position("+3"), Some(3));
    assert_eq!(position("1_000"), Some(1000));
    assert_eq!(position("1__0"), None);
    assert_eq!(position("_1"), None);
    assert_eq!(position("99999999999999999999"), None);
}

#[test]
fn lines_that_cannot_be_sent_are_refused() {
    let newline = Command::Error { message: "two\nlines".to_owned() };
    assert!(newline.to_line().is_err());
    let long = Command::Ping { data: "x".repeat(crate::MAX_LINE_LENGTH) };
    assert!(long.to_line().is_err());
    let row = RowJson::from_row(&("f", ["a b"], 1)).unwrap();
    let rdata = Command::Rdata { stream: "caches".to_owned(), instance: "m".to_owned(), token: Some(5), row };
    assert_eq!(rdata.to_line().unwrap(), r#"RDATA caches m 5 ["f",["a b"],1]"#);
}

#[test]
fn each_side_accepts_only_the_other_sides_commands() {
    assert!(CommandName::Rdata.accepted_by(Side::Client));
    // Writers among the clients send their rows to the server, which relays them.
    assert!(CommandName::Rdata.accepted_by(Side::Server) && CommandName::Position.accepted_by(Side::Server));
    assert!(!CommandName::Server.accepted_by(Side::Server));
    assert!(CommandName::Replicate.accepted_by(Side::Server));
    assert!(!CommandName::Replicate.accepted_by(Side::Client));
    assert!(!CommandName::NewActiveTask.accepted_by(Side::Server));
    assert!(!CommandName::NewActiveTask.accepted_by(Side::Client));
    assert!(CommandName::Ping.accepted_by(Side::Server) && CommandName::Ping.accepted_by(Side::Client));
    // Our extension: clients authenticate; a server never sends AUTH.
    assert!(CommandName::Auth.accepted_by(Side::Server));
    assert!(!CommandName::Auth.accepted_by(Side::Client));
}

#[test]
fn auth_carries_the_secret_on_the_wire_and_hides_it_from_debug() {
    let command = Command::parse("AUTH s3cret with spaces").unwrap();
    assert_eq!(command, Command::Auth { secret: super::Secret::new("s3cret with spaces") });
    assert_eq!(command.to_line().unwrap(), "AUTH s3cret with spaces");
    let shown = format!("{command:?}");
    assert!(!shown.contains("s3cret"), "{shown}");
}

/// Lines built from the protocol's own vocabulary, so the fuzzer reaches deep
/// into each command's parser instead of stopping at unknown names.
fn line_strategy() -> impl Strategy<Value = String> {
    let name = prop::sample::select(
        CommandName::ALL
            .iter()
            .map(|name| name.as_str().to_owned())
            .chain(["FOO".to_owned(), String::new()])
            .collect::<Vec<_>>(),
    );
    let word = prop_oneof![
        "[a-z_]{0,8}",
        "-?[0-9_]{0,22}",
        Just("batch".to_owned()),
        Just("None".to_owned()),
        Just("start".to_owned()),
        Just("end".to_owned()),
        "\\[[\"a-z0-9,\\[\\]{}:. NaInfty-]{0,20}\\]?",
        "\\PC{0,6}",
    ];
    (name, prop::collection::vec(word, 0..7)).prop_map(|(name, words)| {
        let mut line = name;
        for word in words {
            line.push(' ');
            line.push_str(&word);
        }
        line
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    /// The fuzz harness: any text parses or is refused, never panics; whatever
    /// parses is sent as a line that parses back to the same command.
    #[test]
    fn parsing_is_total_and_round_trips(line in prop_oneof![line_strategy(), "\\PC{0,40}", any::<String>()]) {
        if let Ok(command) = Command::parse(&line)
            && let Ok(sent) = command.to_line()
        {
            prop_assert_eq!(Command::parse(&sent), Ok(command));
        }
    }

    #[test]
    fn bytes_never_break_the_line_decoder(chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..16)) {
        let mut decoder = crate::LineDecoder::default();
        for chunk in &chunks {
            decoder.push(chunk);
            while let Some(line) = decoder.next_line() {
                if line.is_err() {
                    break;
                }
            }
        }
    }
}
