//! Accounts as Matrix clients drive them, on the embedded SQLite monolith and on
//! four processes (each step through another process than the one before):
//! registration through user-interactive auth, password login onto devices,
//! the devices list, logout of one device and of all, the slowdown of failed
//! logins, and what clients ask first. And registration closed where the
//! config closes it.

use std::time::Duration;

use serde_json::{Value, json};

use tests::client::{Client, PASSWORD, call, encode, register};
use tests::deployment::{Deployment, base_urls, eventually};
use tests::process::{Binary, Server};

fn errcode(answer: &Value) -> &str {
    answer["errcode"].as_str().unwrap_or("")
}

/// `POST /login` with `m.login.password` for `user` (a localpart or full ID).
fn log_in(base_url: &str, user: &str, password: &str, device_id: Option<&str>) -> (u16, Value) {
    let mut body = json!({
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": user},
        "password": password,
        "initial_device_display_name": "a test",
    });
    if let Some(device_id) = device_id {
        body["device_id"] = json!(device_id);
    }
    call(base_url, "POST", "/_matrix/client/v3/login", None, Some(&body))
}

fn client_of(base_url: &str, answer: &Value) -> Client {
    Client {
        base_url: base_url.to_owned(),
        user_id: answer["user_id"].as_str().expect("a user_id").to_owned(),
        token: answer["access_token"].as_str().expect("an access_token").to_owned(),
    }
}

/// Until `client`'s token is refused on its process (a logout travels by the
/// `caches` stream to the others).
fn refused_soon(client: &Client) {
    eventually(&format!("{} refuses the token", client.base_url), Duration::from_secs(2), || {
        let (status, answer) = client.call("GET", "/_matrix/client/v3/account/whoami", None);
        match (status, errcode(&answer)) {
            (401, "M_UNKNOWN_TOKEN") => Ok(()),
            _ => Err(format!("{status} {answer}")),
        }
    });
}

fn exercise_accounts(urls: &[String]) {
    let at = |n: usize| urls[n % urls.len()].as_str();

    // What a client asks first.
    let (status, versions) = call(at(0), "GET", "/_matrix/client/versions", None, None);
    assert_eq!(status, 200, "{versions}");
    assert!(versions["versions"].as_array().is_some_and(|all| all.contains(&json!("v1.1"))), "{versions}");
    let (status, flows) = call(at(1), "GET", "/_matrix/client/v3/login", None, None);
    assert_eq!((status, &flows["flows"][0]["type"]), (200, &json!("m.login.password")), "{flows}");

    // Registration: the flows and a session first, then the dummy stage.
    let register =
        |n: usize, body: &Value| call(at(n), "POST", "/_matrix/client/v3/register", None, Some(body));
    let (status, first) = register(0, &json!({"username": "dana", "password": PASSWORD}));
    assert_eq!(status, 401, "{first}");
    assert_eq!(first["flows"], json!([{"stages": ["m.login.dummy"]}]), "{first}");
    let session = first["session"].as_str().expect("a session");
    let (status, other_stage) = register(
        1,
        &json!({"username": "dana", "password": PASSWORD, "auth": {"type": "m.login.recaptcha", "session": session}}),
    );
    assert_eq!((status, errcode(&other_stage)), (400, "M_UNRECOGNIZED"), "{other_stage}");
    let (status, registered) = register(
        1,
        &json!({
            "username": "dana",
            "password": PASSWORD,
            "auth": {"type": "m.login.dummy", "session": session},
            "initial_device_display_name": "dana's laptop",
        }),
    );
    assert_eq!(status, 200, "{registered}");
    let device = registered["device_id"].as_str().expect("a device_id").to_owned();
    assert!(registered["home_server"].is_string(), "{registered}");
    let dana = client_of(at(1), &registered);
    let (status, taken) = register(2, &json!({"username": "dana", "password": "x"}));
    assert_eq!((status, errcode(&taken)), (400, "M_USER_IN_USE"), "{taken}");
    let (status, inhibited) = register(
        2,
        &json!({"username": "erin", "password": PASSWORD, "auth": {"type": "m.login.dummy"}, "inhibit_login": true}),
    );
    assert_eq!(status, 200, "{inhibited}");
    assert!(inhibited.get("access_token").is_none() && inhibited["user_id"].is_string(), "{inhibited}");

    // whoami knows the device, on another process.
    let (status, me) = dana.on(at(2)).call("GET", "/_matrix/client/v3/account/whoami", None);
    assert_eq!((status, &me["device_id"]), (200, &json!(device)), "{me}");

    // Login, by localpart and by full ID, each on a device of its own.
    let (status, phone) = log_in(at(3), "dana", PASSWORD, Some("PHONE"));
    assert_eq!((status, &phone["device_id"]), (200, &json!("PHONE")), "{phone}");
    let phone = client_of(at(3), &phone);
    let (status, tablet) = log_in(at(0), &dana.user_id, PASSWORD, None);
    assert_eq!(status, 200, "{tablet}");
    let tablet = client_of(at(0), &tablet);
    let (status, devices) = tablet.on(at(1)).call("GET", "/_matrix/client/v3/devices", None);
    assert_eq!(status, 200, "{devices}");
    let ids: Vec<&str> = devices["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .filter_map(|d| d["device_id"].as_str())
        .collect();
    assert_eq!(ids.len(), 3, "{devices}");
    assert!(ids.contains(&device.as_str()) && ids.contains(&"PHONE"), "{devices}");
    let (status, capabilities) = phone.call("GET", "/_matrix/client/v3/capabilities", None);
    assert_eq!(status, 200, "{capabilities}");
    assert!(capabilities["capabilities"]["m.room_versions"].is_object(), "{capabilities}");

    // Logging in again on a device replaces its token.
    let (status, phone_again) = log_in(at(2), "dana", PASSWORD, Some("PHONE"));
    assert_eq!(status, 200, "{phone_again}");
    refused_soon(&phone);
    let phone = client_of(at(2), &phone_again);

    // A logout ends that device only; logout/all ends every device.
    let (status, _) = tablet.call("POST", "/_matrix/client/v3/logout", None);
    assert_eq!(status, 200);
    refused_soon(&tablet.on(at(1)));
    let (status, devices) = phone.call("GET", "/_matrix/client/v3/devices", None);
    assert_eq!((status, devices["devices"].as_array().map(Vec::len)), (200, Some(2)), "{devices}");
    let (status, _) = phone.call("POST", "/_matrix/client/v3/logout/all", None);
    assert_eq!(status, 200);
    refused_soon(&phone.on(at(3)));
    refused_soon(&dana.on(at(0)));

    // An unknown account is refused like a wrong password.
    let (status, answer) = log_in(at(2), "nobody", PASSWORD, None);
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN"), "{answer}");
    // Wrong passwords are refused, and slowed down after three.
    for attempt in 0..3 {
        let (status, answer) = log_in(at(1), "dana", "not the password", None);
        assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN"), "attempt {attempt}: {answer}");
    }
    let (status, answer) = log_in(at(1), "dana", "not the password", None);
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN"), "{answer}");
    let (status, answer) = log_in(at(1), "dana", PASSWORD, None);
    assert_eq!(
        (status, errcode(&answer)),
        (429, "M_LIMIT_EXCEEDED"),
        "even the right password waits: {answer}"
    );
    assert!(answer["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0 && ms <= 1_000), "{answer}");
    // Once the wait is over, the right password works again.
    std::thread::sleep(Duration::from_millis(1_100));
    let (status, answer) = log_in(at(1), "dana", PASSWORD, None);
    assert_eq!(status, 200, "{answer}");
}

/// What a client asks right after signing in, besides sync: profiles, push
/// rules, its rooms, their members and single events; and a browser's
/// preflight.
fn exercise_what_clients_ask_next(urls: &[String]) {
    let at = |n: usize| urls[n % urls.len()].as_str();
    let gail = register(at(0), "gail");
    let hank = register(at(1), "hank");

    // Profiles: the localpart until the user sets a name; one's own only.
    let profile = format!("/_matrix/client/v3/profile/{}", encode(&gail.user_id));
    let (status, answer) = hank.on(at(2)).call("GET", &profile, None);
    assert_eq!((status, &answer["displayname"]), (200, &json!("gail")), "{answer}");
    let (status, _) = gail.on(at(3)).call(
        "PUT",
        &format!("{profile}/displayname"),
        Some(&json!({"displayname": "Gail G."})),
    );
    assert_eq!(status, 200);
    let (status, answer) = hank.on(at(0)).call("GET", &format!("{profile}/displayname"), None);
    assert_eq!((status, &answer["displayname"]), (200, &json!("Gail G.")), "{answer}");
    let (status, answer) =
        hank.call("PUT", &format!("{profile}/displayname"), Some(&json!({"displayname": "not hers"})));
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN"), "{answer}");
    let (status, answer) = hank.call("GET", "/_matrix/client/v3/profile/%40nobody%3Anowhere", None);
    assert_eq!((status, errcode(&answer)), (404, "M_NOT_FOUND"), "{answer}");

    // The default push rules.
    let (status, rules) = gail.call("GET", "/_matrix/client/v3/pushrules/", None);
    assert_eq!(status, 200, "{rules}");
    let overrides = rules["global"]["override"].as_array().expect("override rules");
    assert_eq!(overrides[0]["rule_id"], json!(".m.rule.master"), "{rules}");
    assert_eq!(rules["global"]["content"][0]["pattern"], json!("gail"), "{rules}");

    // Rooms, members and events, for members only.
    let room = gail.on(at(1)).create_room();
    hank.on(at(2)).join(&room);
    let event_id = gail.on(at(3)).send(&room, "t1", "hello");
    let rooms_path = format!("/_matrix/client/v3/rooms/{}", encode(&room));
    eventually("everyone sees the room, its members and its event", Duration::from_secs(2), || {
        for n in 0..urls.len() {
            let (status, joined) = hank.on(at(n)).call("GET", "/_matrix/client/v3/joined_rooms", None);
            if status != 200 || joined["joined_rooms"] != json!([room]) {
                return Err(format!("joined_rooms on {}: {status} {joined}", at(n)));
            }
            let (status, members) = hank.on(at(n)).call("GET", &format!("{rooms_path}/members"), None);
            let mut who: Vec<&str> = members["chunk"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["state_key"].as_str())
                .collect();
            who.sort_unstable();
            if status != 200 || who != [gail.user_id.as_str(), hank.user_id.as_str()] {
                return Err(format!("members on {}: {status} {members}", at(n)));
            }
            let (status, event) =
                hank.on(at(n)).call("GET", &format!("{rooms_path}/event/{}", encode(&event_id)), None);
            if status != 200 || event["content"]["body"] != json!("hello") {
                return Err(format!("event on {}: {status} {event}", at(n)));
            }
        }
        Ok(())
    });
    let ivan = register(at(2), "ivan");
    let (status, answer) = ivan.call("GET", &format!("{rooms_path}/members"), None);
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN"), "{answer}");
    let (status, answer) = ivan.call("GET", &format!("{rooms_path}/event/{}", encode(&event_id)), None);
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN"), "{answer}");
    let (status, answer) = hank.call("GET", &format!("{rooms_path}/event/%24nothing%3Ahere"), None);
    assert_eq!((status, errcode(&answer)), (404, "M_NOT_FOUND"), "{answer}");

    // Account data, global and per room, one's own only, through other processes.
    let direct = format!("/_matrix/client/v3/user/{}/account_data/m.direct", encode(&gail.user_id));
    let (status, answer) = gail.on(at(0)).call("GET", &direct, None);
    assert_eq!((status, errcode(&answer)), (404, "M_NOT_FOUND"), "{answer}");
    let (status, _) = gail.on(at(1)).call("PUT", &direct, Some(&json!({"@hank:x": ["!r:x"]})));
    assert_eq!(status, 200);
    let (status, answer) = gail.on(at(2)).call("GET", &direct, None);
    assert_eq!((status, answer), (200, json!({"@hank:x": ["!r:x"]})), "read back through another process");
    let (status, answer) = hank.call("GET", &direct, None);
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN"), "{answer}");
    let tag = format!(
        "/_matrix/client/v3/user/{}/rooms/{}/account_data/m.tag",
        encode(&gail.user_id),
        encode(&room)
    );
    let (status, _) = gail.on(at(3)).call("PUT", &tag, Some(&json!({"tags": {"u.work": {}}})));
    assert_eq!(status, 200);
    let (status, answer) = gail.on(at(0)).call("GET", &tag, None);
    assert_eq!((status, &answer["tags"]["u.work"]), (200, &json!({})), "{answer}");
    // A first sync carries both.
    let sync = gail.on(at(1)).sync(None, Duration::ZERO);
    assert!(
        sync["account_data"]["events"].as_array().into_iter().flatten().any(|e| e["type"] == "m.direct"),
        "{sync}"
    );
    assert!(
        sync["rooms"]["join"][&room]["account_data"]["events"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["type"] == "m.tag"),
        "{sync}"
    );

    // A later sync brings a change of account data, through another process.
    let since = gail.on(at(2)).sync(None, Duration::ZERO)["next_batch"].as_str().expect("a token").to_owned();
    let (status, _) = gail.on(at(3)).call("PUT", &direct, Some(&json!({"@hank:x": ["!other:x"]})));
    assert_eq!(status, 200);
    eventually("the change of m.direct reaches a later sync", Duration::from_secs(2), || {
        let sync = gail.on(at(0)).sync(Some(&since), Duration::from_millis(200));
        let changed = sync["account_data"]["events"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["type"] == "m.direct" && e["content"]["@hank:x"] == json!(["!other:x"]));
        if changed { Ok(()) } else { Err(sync.to_string()) }
    });
    let after = gail.on(at(1)).sync(None, Duration::ZERO)["next_batch"].as_str().expect("a token").to_owned();
    let quiet = gail.on(at(1)).sync(Some(&after), Duration::ZERO);
    assert_eq!(quiet["account_data"]["events"], json!([]), "nothing twice: {quiet}");

    // Stored filters, one's own only.
    let filters = format!("/_matrix/client/v3/user/{}/filter", encode(&gail.user_id));
    let filter = json!({"room": {"timeline": {"limit": 3}}});
    let (status, answer) = gail.on(at(1)).call("POST", &filters, Some(&filter));
    assert_eq!(status, 200, "{answer}");
    let filter_id = answer["filter_id"].as_str().expect("a filter_id").to_owned();
    let (status, answer) = gail.on(at(2)).call("GET", &format!("{filters}/{filter_id}"), None);
    assert_eq!((status, &answer), (200, &filter), "{answer}");
    let (status, answer) = hank.call("GET", &format!("{filters}/{filter_id}"), None);
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN"), "{answer}");
    let (status, answer) = gail.call("GET", &format!("{filters}/nope"), None);
    assert_eq!((status, errcode(&answer)), (404, "M_NOT_FOUND"), "{answer}");
    // A sync may name it: a timeline of at most 3 events.
    let (status, sync) =
        gail.on(at(3)).call("GET", &format!("/_matrix/client/v3/sync?filter={filter_id}&timeout=0"), None);
    assert_eq!(status, 200, "{sync}");
    let timeline = sync["rooms"]["join"][&room]["timeline"]["events"].as_array().map(Vec::len);
    assert_eq!(timeline, Some(3), "{sync}");

    // Joining by `/join/{roomIdOrAlias}`, with a room ID.
    let open = hank.on(at(0)).create_room();
    let (status, answer) =
        gail.on(at(1)).call("POST", &format!("/_matrix/client/v3/join/{}", encode(&open)), None);
    assert_eq!((status, &answer["room_id"]), (200, &json!(open)), "{answer}");

    // A browser's preflight, and the headers on every client answer.
    for path in ["/_matrix/client/v3/login", "/_matrix/client/v3/sync", "/_matrix/client/versions"] {
        let head = raw_head(at(3), "OPTIONS", path);
        assert!(head.starts_with("HTTP/1.1 200"), "OPTIONS {path}: {head}");
        assert!(
            head.to_ascii_lowercase().contains("access-control-allow-origin: *"),
            "OPTIONS {path}: {head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("access-control-allow-headers: x-requested-with, content-type, authorization"),
            "{head}"
        );
    }
    let head = raw_head(at(0), "GET", "/_matrix/client/versions");
    assert!(head.to_ascii_lowercase().contains("access-control-allow-origin: *"), "{head}");
}

/// The status line and headers of one request, as a browser would see them.
fn raw_head(base_url: &str, method: &str, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let authority = base_url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(authority).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("a timeout");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nOrigin: https://app.example\r\n\
         Access-Control-Request-Method: POST\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response.split("\r\n\r\n").next().unwrap_or_default().to_owned()
}

#[test]
fn accounts_on_the_sqlite_monolith() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let server = Server::start(Binary::Master, &["--http-listen", "127.0.0.1:0"], dir.path());
    exercise_accounts(std::slice::from_ref(&server.base_url));
    exercise_what_clients_ask_next(std::slice::from_ref(&server.base_url));
}

#[test]
fn accounts_on_four_processes() {
    let deployment = Deployment::for_clients();
    let servers = deployment.start_all();
    exercise_accounts(&base_urls(&servers));
    exercise_what_clients_ask_next(&base_urls(&servers));
}

/// Off by default anywhere but the monolith on loopback: a deployment's config
/// must open registration, or an operator creates the accounts with the
/// shared secret (Synapse's admin endpoint, HMAC over a nonce).
#[test]
fn registration_is_closed_unless_the_config_opens_it_and_operators_use_the_secret() {
    let deployment = Deployment::new(tests::deployment::Transport::Redis, &[], &["master"]);
    let config = deployment
        .config("master")
        .replace("enable_registration = true\n", "registration_shared_secret = \"operator secret\"\n")
        .replacen("[http]\n", "[http]\npublic_baseurl = \"https://matrix.example\"\n", 1);
    let master = deployment.start_with_config("master", &config);
    let url = master.base_url.as_str();
    let (status, answer) = call(
        url,
        "POST",
        "/_matrix/client/v3/register",
        None,
        Some(&json!({"username": "frank", "password": PASSWORD, "auth": {"type": "m.login.dummy"}})),
    );
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN"), "{answer}");

    let (status, well_known) = call(url, "GET", "/.well-known/matrix/client", None, None);
    assert_eq!((status, well_known), (200, json!({"m.homeserver": {"base_url": "https://matrix.example"}})));

    let admin_register = |username: &str, secret: &str, nonce: Option<&str>| {
        let nonce = match nonce {
            Some(nonce) => nonce.to_owned(),
            None => {
                let (status, answer) = call(url, "GET", "/_synapse/admin/v1/register", None, None);
                assert_eq!(status, 200, "{answer}");
                answer["nonce"].as_str().expect("a nonce").to_owned()
            }
        };
        let mac = hex_hmac_sha1(secret, &[&nonce, username, PASSWORD, "notadmin"]);
        let body =
            json!({"nonce": nonce, "username": username, "password": PASSWORD, "admin": false, "mac": mac});
        (nonce.clone(), call(url, "POST", "/_synapse/admin/v1/register", None, Some(&body)))
    };
    let (_, (status, answer)) = admin_register("frank", "not the secret", None);
    assert_eq!((status, errcode(&answer)), (403, "M_FORBIDDEN"), "{answer}");
    let (nonce, (status, answer)) = admin_register("frank", "operator secret", None);
    assert_eq!(status, 200, "{answer}");
    assert!(answer["access_token"].is_string() && answer["device_id"].is_string(), "{answer}");
    let (_, (status, answer)) = admin_register("frank2", "operator secret", Some(&nonce));
    assert_eq!((status, errcode(&answer)), (400, "M_UNKNOWN"), "a nonce serves once: {answer}");
    let (status, answer) = log_in(url, "frank", PASSWORD, None);
    assert_eq!(status, 200, "the account logs in: {answer}");
}

/// Synapse's MAC of the admin registration: HMAC-SHA1 of the parts joined by NUL.
fn hex_hmac_sha1(key: &str, parts: &[&str]) -> String {
    use hmac::Mac as _;
    let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(key.as_bytes()).expect("any key length");
    mac.update(parts.join("\0").as_bytes());
    mac.finalize().into_bytes().iter().map(|byte| format!("{byte:02x}")).collect()
}
