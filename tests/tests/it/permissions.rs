//! Who may do what in a room, on the embedded SQLite monolith and on four
//! processes (each step through another process than the one before, so the
//! checks run on the room's writer whatever process took the request): a
//! private room needs an invitation, members invite, power levels decide who
//! sets state, and a public room is open.

use std::time::Duration;

use serde_json::{Value, json};

use tests::client::{Client, encode, register};
use tests::deployment::{Deployment, base_urls, eventually};
use tests::process::{Binary, Server};

fn errcode(answer: &Value) -> &str {
    answer["errcode"].as_str().unwrap_or("")
}

fn room_path(room: &str, rest: &str) -> String {
    format!("/_matrix/client/v3/rooms/{}/{rest}", encode(room))
}

/// Until `client` (on its process) may join `room`: an invitation made through
/// another process reaches the room's writer at once, but the joiner's
/// process answers the join only once it has seen the write.
fn joins(client: &Client, room: &str) {
    let (status, answer) = client.call("POST", &room_path(room, "join"), None);
    assert_eq!(status, 200, "{} joins {room}: {answer}", client.user_id);
}

fn exercise_permissions(urls: &[String]) {
    let at = |n: usize| urls[n % urls.len()].as_str();
    let alice = register(at(0), "alice");
    let bob = register(at(1), "bob");
    let carol = register(at(2), "carol");

    // A private room (the default), named, with carol invited at creation.
    let (status, created) = alice.on(at(1)).call(
        "POST",
        "/_matrix/client/v3/createRoom",
        Some(&json!({"name": "secret plans", "topic": "shh", "invite": [carol.user_id]})),
    );
    assert_eq!(status, 200, "{created}");
    let room = created["room_id"].as_str().expect("a room_id").to_owned();

    // Carol's first sync shows the invitation, with what she may see of the
    // room (once her process has caught up with the room's writer).
    eventually("carol's first sync shows the invitation", Duration::from_secs(2), || {
        let (status, sync) = carol.on(at(2)).call("GET", "/_matrix/client/v3/sync?timeout=0", None);
        let invite_state =
            sync["rooms"]["invite"][&room]["invite_state"]["events"].as_array().cloned().unwrap_or_default();
        let types: Vec<&str> = invite_state.iter().filter_map(|e| e["type"].as_str()).collect();
        let invited = invite_state.iter().any(|e| {
            e["type"] == "m.room.member"
                && e["state_key"] == json!(carol.user_id)
                && e["content"]["membership"] == "invite"
        });
        if status == 200 && types.contains(&"m.room.create") && types.contains(&"m.room.name") && invited {
            Ok(())
        } else {
            Err(format!("{status} {sync}"))
        }
    });
    let bob_since =
        bob.on(at(3)).sync(None, Duration::ZERO)["next_batch"].as_str().expect("a token").to_owned();

    // Bob is not invited: his join is refused.
    let (status, answer) = bob.on(at(2)).call("POST", &room_path(&room, "join"), None);
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN"), "{answer}");
    // Carol was invited: she joins, through another process.
    joins(&carol.on(at(3)), &room);
    // A member invites bob; now he may join.
    let (status, answer) =
        carol.on(at(0)).call("POST", &room_path(&room, "invite"), Some(&json!({"user_id": bob.user_id})));
    assert_eq!(status, 200, "{answer}");
    let (status, answer) =
        alice.on(at(1)).call("POST", &room_path(&room, "invite"), Some(&json!({"user_id": bob.user_id})));
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN"), "already invited: {answer}");
    // Bob's next sync brings the invitation, on any process.
    eventually("bob's sync shows the invitation", Duration::from_secs(2), || {
        let sync = bob.on(at(1)).sync(Some(&bob_since), Duration::ZERO);
        if sync["rooms"]["invite"].get(&room).is_some() { Ok(()) } else { Err(sync.to_string()) }
    });
    joins(&bob.on(at(2)), &room);

    // Power levels: members at 0 may talk but not set state (50); the creator may.
    let (status, answer) =
        bob.on(at(3)).call("PUT", &room_path(&room, "state/m.room.topic"), Some(&json!({"topic": "bob's"})));
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN"), "{answer}");
    let (status, answer) =
        bob.on(at(0)).call("PUT", &room_path(&room, "send/m.room.message/b1"), Some(&json!({"body": "hi"})));
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = alice.on(at(1)).call(
        "PUT",
        &room_path(&room, "state/m.room.topic"),
        Some(&json!({"topic": "alice's"})),
    );
    assert_eq!(status, 200, "{answer}");
    // Alice raises bob to 50, and then bob may set the topic; he may not raise himself further.
    let (status, levels) = alice.on(at(2)).call("GET", &room_path(&room, "state"), None);
    assert_eq!(status, 200, "{levels}");
    let mut power_levels = levels
        .as_array()
        .into_iter()
        .flatten()
        .find(|event| event["type"] == "m.room.power_levels")
        .map(|event| event["content"].clone())
        .expect("createRoom set power levels");
    assert_eq!(power_levels["users"][&alice.user_id], json!(100), "{power_levels}");
    assert_eq!(power_levels["state_default"], json!(50), "{power_levels}");
    power_levels["users"][&bob.user_id] = json!(50);
    let (status, answer) =
        alice.on(at(3)).call("PUT", &room_path(&room, "state/m.room.power_levels"), Some(&power_levels));
    assert_eq!(status, 200, "{answer}");
    eventually("bob may set the topic", Duration::from_secs(2), || {
        let (status, answer) = bob.on(at(0)).call(
            "PUT",
            &room_path(&room, "state/m.room.topic"),
            Some(&json!({"topic": "bob's"})),
        );
        if status == 200 { Ok(()) } else { Err(format!("{status} {answer}")) }
    });
    power_levels["users"][&bob.user_id] = json!(100);
    let (status, answer) =
        bob.on(at(1)).call("PUT", &room_path(&room, "state/m.room.power_levels"), Some(&power_levels));
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN"), "{answer}");

    // A public room is open to anyone.
    let (status, public) = alice.on(at(2)).call(
        "POST",
        "/_matrix/client/v3/createRoom",
        Some(&json!({"preset": "public_chat"})),
    );
    assert_eq!(status, 200, "{public}");
    let public = public["room_id"].as_str().expect("a room_id").to_owned();
    joins(&bob.on(at(3)), &public);
    let (status, answer) =
        alice.call("POST", "/_matrix/client/v3/createRoom", Some(&json!({"preset": "secret_chat"})));
    assert_eq!((status, errcode(&answer)), (400, "M_INVALID_PARAM"), "{answer}");
}

#[test]
fn permissions_on_the_sqlite_monolith() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let server = Server::start(Binary::Master, &["--http-listen", "127.0.0.1:0"], dir.path());
    exercise_permissions(std::slice::from_ref(&server.base_url));
}

#[test]
fn permissions_on_four_processes() {
    let deployment = Deployment::for_clients();
    let servers = deployment.start_all();
    exercise_permissions(&base_urls(&servers));
}
