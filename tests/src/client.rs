//! A Matrix client of the API under test: one user, talking to one process,
//! or to another with the same access token. Used by the client API tests and
//! the `e2e` benchmark.

use std::time::Duration;

use serde_json::{Value, json};

use crate::process::http_request;

/// A registered user and the process it talks to.
#[derive(Debug, Clone)]
pub struct Client {
    /// The process it talks to, `http://IP:PORT`.
    pub base_url: String,
    /// `@name:server`.
    pub user_id: String,
    /// The access token `register` handed out.
    pub token: String,
}

/// The password every test account is registered with.
pub const PASSWORD: &str = "correct horse battery staple";

/// `POST /register` as clients do it: the first request is answered 401 with
/// the flows and a session, the second completes `m.login.dummy` in that
/// session; panics unless it succeeds.
pub fn register(base_url: &str, username: &str) -> Client {
    let path = "/_matrix/client/v3/register";
    let request = json!({"username": username, "password": PASSWORD});
    let (status, flows) = call(base_url, "POST", path, None, Some(&request));
    assert_eq!(status, 401, "register {username}: the first answer gives the flows: {flows}");
    let mut request = request;
    request["auth"] = json!({"type": "m.login.dummy", "session": flows["session"]});
    let (status, body) = call(base_url, "POST", path, None, Some(&request));
    assert_eq!(status, 200, "register {username}: {body}");
    Client {
        base_url: base_url.to_owned(),
        user_id: body["user_id"].as_str().expect("a user_id").to_owned(),
        token: body["access_token"].as_str().expect("an access_token").to_owned(),
    }
}

/// One request; the status and the JSON answer (`null` when not JSON). A
/// connection failure comes back as status 0.
pub fn call(
    base_url: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let body = body.map(Value::to_string);
    match http_request(base_url, method, path, token, body.as_deref()) {
        Ok((status, answer)) => (status, serde_json::from_str(&answer).unwrap_or(Value::Null)),
        Err(err) => (0, json!({"error": err.to_string()})),
    }
}

/// Percent-encodes a path segment or query value.
pub fn encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(byte).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

impl Client {
    /// The same user, talking to another process.
    pub fn on(&self, base_url: &str) -> Client {
        Client { base_url: base_url.to_owned(), ..self.clone() }
    }

    /// One request as this user; the status and the JSON answer, as [`call`].
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        call(&self.base_url, method, path, Some(&self.token), body)
    }

    /// A call that must answer 200.
    fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (status, answer) = self.call(method, path, body);
        assert_eq!(status, 200, "{} {method} {path} on {}: {answer}", self.user_id, self.base_url);
        answer
    }

    /// `POST createRoom` of a public room (anyone may join); the new room's ID.
    pub fn create_room(&self) -> String {
        let answer =
            self.ok("POST", "/_matrix/client/v3/createRoom", Some(&json!({"preset": "public_chat"})));
        answer["room_id"].as_str().expect("a room_id").to_owned()
    }

    /// `POST rooms/{room}/join`, which must answer 200.
    pub fn join(&self, room: &str) {
        self.ok("POST", &format!("/_matrix/client/v3/rooms/{}/join", encode(room)), None);
    }

    /// `POST rooms/{room}/leave`, which must answer 200.
    pub fn leave(&self, room: &str) {
        self.ok("POST", &format!("/_matrix/client/v3/rooms/{}/leave", encode(room)), None);
    }

    /// `PUT send/m.room.message/{txn}`: the status and the answer.
    pub fn try_send(&self, room: &str, txn: &str, body: &str) -> (u16, Value) {
        let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{}", encode(room), encode(txn));
        self.call("PUT", &path, Some(&json!({"msgtype": "m.text", "body": body})))
    }

    /// Sends a message; its event ID.
    pub fn send(&self, room: &str, txn: &str, body: &str) -> String {
        let (status, answer) = self.try_send(room, txn, body);
        assert_eq!(status, 200, "{} sends to {room} on {}: {answer}", self.user_id, self.base_url);
        answer["event_id"].as_str().expect("an event_id").to_owned()
    }

    /// `GET sync`: the status and the answer.
    pub fn try_sync(&self, since: Option<&str>, timeout: Duration, limit: usize) -> (u16, Value) {
        let filter = encode(&json!({"room": {"timeline": {"limit": limit}}}).to_string());
        let mut path = format!("/_matrix/client/v3/sync?timeout={}&filter={filter}", timeout.as_millis());
        if let Some(since) = since {
            path.push_str(&format!("&since={}", encode(since)));
        }
        self.call("GET", &path, None)
    }

    /// `GET sync` with a timeline limit of 100, which must answer 200; the answer.
    pub fn sync(&self, since: Option<&str>, timeout: Duration) -> Value {
        let (status, answer) = self.try_sync(since, timeout, 100);
        assert_eq!(status, 200, "{} syncs on {}: {answer}", self.user_id, self.base_url);
        answer
    }

    /// `GET rooms/{room}/joined_members`: the status and the answer.
    pub fn joined_members(&self, room: &str) -> (u16, Value) {
        self.call("GET", &format!("/_matrix/client/v3/rooms/{}/joined_members", encode(room)), None)
    }
}

/// The event IDs of `room`'s timeline in a sync answer, under `section`
/// (`join` or `leave`).
pub fn timeline_ids(sync: &Value, section: &str, room: &str) -> Vec<String> {
    sync["rooms"][section][room]["timeline"]["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|event| event["event_id"].as_str().map(str::to_owned))
        .collect()
}
