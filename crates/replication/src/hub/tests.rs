//! The hub's rules on who may speak for a writer, driven command by command
//! with no socket: a property test feeds arbitrary commands from peers that did
//! not authenticate or that impersonate a writer, and checks no position moves.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use replication_proto::{Command, RowJson, Secret};
use store_core::{BoxFuture, StoreError, StreamUpdates};

use super::{Hub, Peer, RefusalReason, Session, Settings, Transport};
use crate::typing::{TYPING_STREAM, TypingFollower};
use crate::{Inbound, Outbound, Stream, StreamRegistry, TypingStream};

const SECRET: &str = "the deployment's secret";
const WRITERS: [&str; 2] = ["persister1", "persister2"];
/// What the fake stream's sequence has handed out.
const HANDED_OUT: i64 = 100;

/// A multi-writer stream kept in memory: positions per writer, a sequence that
/// has handed out up to [`HANDED_OUT`], and no rows to catch up on.
#[derive(Debug)]
struct FakeStream {
    positions: Mutex<BTreeMap<String, i64>>,
    /// A connection's queue to look into when rows are applied, and the lines
    /// that were already in it then.
    watched: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<super::Outgoing>>>,
    queued_before_applied: Mutex<Vec<String>>,
}

impl FakeStream {
    fn new() -> Arc<FakeStream> {
        let positions = WRITERS.iter().map(|writer| ((*writer).to_owned(), 10)).collect();
        Arc::new(FakeStream {
            positions: Mutex::new(positions),
            watched: Mutex::new(None),
            queued_before_applied: Mutex::new(Vec::new()),
        })
    }

    fn positions(&self) -> BTreeMap<String, i64> {
        crate::lock(&self.positions).clone()
    }
}

impl Stream for FakeStream {
    fn spec(&self) -> store_core::StreamSpec {
        store_core::StreamSpec::new("events", store_core::WriterRule::Configured)
    }
    fn current_token(&self, writer: &str) -> i64 {
        crate::lock(&self.positions).get(writer).copied().unwrap_or(0)
    }
    fn minimal_local_current_token(&self) -> i64 {
        0
    }
    fn get_updates_since<'a>(
        &'a self,
        _writer: &'a str,
        _from: i64,
        to: i64,
        _limit: usize,
    ) -> BoxFuture<'a, Result<StreamUpdates<RowJson>, StoreError>> {
        Box::pin(std::future::ready(Ok(StreamUpdates::empty(to))))
    }
    fn apply_rows(&self, writer: &str, token: i64, _rows: &[RowJson]) -> Result<(), serde_json::Error> {
        if let Some(watched) = crate::lock(&self.watched).as_mut() {
            while let Ok(outgoing) = watched.try_recv() {
                crate::lock(&self.queued_before_applied).push(outgoing.line.to_string());
            }
        }
        self.advance(writer, token);
        Ok(())
    }
    fn advance(&self, writer: &str, token: i64) {
        let mut positions = crate::lock(&self.positions);
        let position = positions.entry(writer.to_owned()).or_insert(0);
        *position = (*position).max(token);
    }
    fn writer_positions(&self) -> Vec<(String, i64)> {
        self.positions().into_iter().collect()
    }
    fn is_writer(&self, instance: &str) -> bool {
        WRITERS.contains(&instance)
    }
    fn is_handed_out(&self, token: i64) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(std::future::ready(Ok(token <= HANDED_OUT)))
    }
}

struct Fixture {
    hub: Arc<Hub>,
    events: Arc<FakeStream>,
    typing: Arc<TypingFollower>,
}

impl Fixture {
    fn new() -> Fixture {
        let events = FakeStream::new();
        let typing = TypingFollower::new("master");
        let mut registry = StreamRegistry::new();
        registry.register(Arc::clone(&events) as Arc<dyn Stream>);
        registry.register(Arc::new(TypingStream::Follower(Arc::clone(&typing))));
        let hub = Hub::new(
            "master",
            "example.com",
            Settings::default(),
            Inbound::new("master", registry),
            Outbound::new("master", []),
            true,
            Some(SECRET),
        );
        Fixture { hub, events, typing }
    }

    /// Every position a peer could move.
    fn positions(&self) -> (BTreeMap<String, i64>, i64) {
        (self.events.positions(), self.typing.latest())
    }

    /// A connection from a worker to this (the master's) listener.
    async fn client(&self) -> (Session, tokio::sync::mpsc::UnboundedReceiver<super::Outgoing>) {
        let (peer, outgoing) = Peer::new(String::new());
        let session = self.hub.open_session(Transport::TcpServer { address: None }, peer, &[]).await;
        (session, outgoing)
    }

    /// Feeds `commands` until the first refusal, which it returns.
    async fn feed(&self, session: &mut Session, commands: Vec<Command>) -> Option<RefusalReason> {
        for command in commands {
            if let Err(refusal) = self.hub.handle(session, command).await {
                self.hub.close_session(session.id);
                return Some(refusal.reason);
            }
        }
        None
    }
}

/// Runs `test` on a runtime whose clock advances by itself when idle, so the
/// pauses after failed authentications cost nothing.
fn paused<F: std::future::Future<Output = ()>>(test: F) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    runtime.block_on(test);
}

/// What a worker says first: the secret, then its name.
fn hello(name: &str) -> Vec<Command> {
    vec![Command::Auth { secret: Secret::new(SECRET) }, Command::Name { name: name.to_owned() }]
}

/// `POSITION events <writer> <prev> <new>`.
fn events_position(writer: &str, prev_token: i64, new_token: i64) -> Command {
    Command::Position { stream: "events".into(), instance: writer.to_owned(), prev_token, new_token }
}

/// The lines queued for a connection so far.
fn queued(outgoing: &mut tokio::sync::mpsc::UnboundedReceiver<super::Outgoing>) -> Vec<String> {
    std::iter::from_fn(|| outgoing.try_recv().ok()).map(|outgoing| outgoing.line.to_string()).collect()
}

fn row() -> impl Strategy<Value = RowJson> {
    prop_oneof![Just("[]"), Just(r#"["ev",["$e","!r"]]"#), Just(r#"["!r",["@u"]]"#), Just("{}")]
        .prop_map(|text| RowJson::new(text).expect("valid JSON"))
}

fn instance() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["persister1", "persister2", "master", "rogue", "other"]).prop_map(str::to_owned)
}

fn stream_name() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["events", TYPING_STREAM, "caches", "device_lists"]).prop_map(str::to_owned)
}

fn token() -> impl Strategy<Value = i64> {
    prop_oneof![-3i64..3, 8i64..15, 95i64..110, Just(999_999_999), Just(i64::MAX), Just(i64::MIN)]
}

/// Any command a peer could send, with a wrong secret when it sends `AUTH`.
fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        "[a-z ]{0,12}".prop_map(|secret| Command::Auth { secret: Secret::new(secret) }),
        instance().prop_map(|name| Command::Name { name }),
        Just(Command::Replicate),
        Just(Command::Ping { data: "1".to_owned() }),
        (stream_name(), instance(), prop::option::of(token()), row())
            .prop_map(|(stream, instance, token, row)| Command::Rdata { stream, instance, token, row }),
        (stream_name(), instance(), token(), token()).prop_map(
            |(stream, instance, prev_token, new_token)| {
                Command::Position { stream, instance, prev_token, new_token }
            }
        ),
        (instance(), token()).prop_map(|(instance, token)| Command::FederationAck { instance, token }),
        Just(Command::RemoteServerUp { server_name: "remote.example.org".to_owned() }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A peer that never presents the secret moves nothing and receives
    /// nothing: its first word other than a good `AUTH` closes it.
    #[test]
    fn an_unauthenticated_peer_changes_no_position(commands in prop::collection::vec(command(), 0..24)) {
        paused(async {
            let fixture = Fixture::new();
            let before = fixture.positions();
            let (mut session, _outgoing) = fixture.client().await;
            let refusal = fixture.feed(&mut session, commands.clone()).await;
            if !commands.is_empty() {
                assert!(
                    matches!(refusal, Some(RefusalReason::Unauthenticated | RefusalReason::BadSecret)),
                    "{refusal:?}"
                );
            }
            assert_eq!(fixture.positions(), before);
            assert_eq!(fixture.hub.connections(), 0, "never registered for replication");
        });
    }

    /// A peer with the secret that named itself `rogue` moves no writer's
    /// position, whatever it claims.
    #[test]
    fn an_impersonating_peer_changes_no_position(commands in prop::collection::vec(command(), 0..24)) {
        paused(async {
            let fixture = Fixture::new();
            let before = fixture.positions();
            let (mut session, _outgoing) = fixture.client().await;
            let hello = vec![
                Command::Auth { secret: Secret::new(SECRET) },
                Command::Name { name: "rogue".to_owned() },
            ];
            assert_eq!(fixture.feed(&mut session, hello).await, None);
            fixture.feed(&mut session, commands).await;
            assert_eq!(fixture.positions(), before);
        });
    }

    /// Even the real writer cannot move its position past what the stream's
    /// sequence has handed out.
    #[test]
    fn no_position_passes_what_was_handed_out(commands in prop::collection::vec(command(), 0..24)) {
        paused(async {
            let fixture = Fixture::new();
            let (mut session, _outgoing) = fixture.client().await;
            let hello = vec![
                Command::Auth { secret: Secret::new(SECRET) },
                Command::Name { name: "persister1".to_owned() },
            ];
            assert_eq!(fixture.feed(&mut session, hello).await, None);
            fixture.feed(&mut session, commands).await;
            let (events, _) = fixture.positions();
            assert!(events.values().all(|position| *position <= HANDED_OUT), "{events:?}");
            assert!(events.keys().all(|writer| WRITERS.contains(&writer.as_str())), "{events:?}");
        });
    }
}

#[test]
fn a_writer_speaks_for_itself_and_is_relayed_to_the_others() {
    paused(async {
        let fixture = Fixture::new();
        let (mut follower, mut follower_out) = fixture.client().await;
        assert_eq!(fixture.feed(&mut follower, hello("follower")).await, None);
        let (mut writer, _writer_out) = fixture.client().await;
        let said = [hello("persister1"), vec![events_position("persister1", 10, 20)]].concat();
        assert_eq!(fixture.feed(&mut writer, said).await, None);
        assert_eq!(fixture.events.positions()["persister1"], 20);
        let relayed = queued(&mut follower_out);
        assert!(relayed.contains(&"POSITION events persister1 10 20".to_owned()), "{relayed:?}");

        // A newcomer's REPLICATE is answered with what was relayed last.
        let (mut newcomer, mut newcomer_out) = fixture.client().await;
        let said = [hello("syncer"), vec![Command::Replicate]].concat();
        assert_eq!(fixture.feed(&mut newcomer, said).await, None);
        let answer = queued(&mut newcomer_out);
        assert!(answer.contains(&"POSITION events persister1 20 20".to_owned()), "{answer:?}");

        // The writer cannot speak for the other writer, nor take the master's name.
        let refused = fixture.feed(&mut writer, vec![events_position("persister2", 10, 11)]).await;
        assert_eq!(refused, Some(RefusalReason::Impersonation));
        let (mut master, _) = fixture.client().await;
        let refused = fixture.feed(&mut master, hello("master")).await;
        assert_eq!(refused, Some(RefusalReason::Impersonation));
    });
}

/// A peer that learns a writer's row from the master may announce that token
/// back as its own position; if that could reach the master before the master
/// applied the row, the master would take the row for applied and drop it.
#[test]
fn a_row_is_applied_here_before_it_is_relayed() {
    paused(async {
        let fixture = Fixture::new();
        let (mut other, mut other_out) = fixture.client().await;
        assert_eq!(fixture.feed(&mut other, hello("persister2")).await, None);
        let (mut writer, _writer_out) = fixture.client().await;
        // Connected and announced, so its rows are applied as they come.
        let said = [hello("persister1"), vec![events_position("persister1", 10, 10)]].concat();
        assert_eq!(fixture.feed(&mut writer, said).await, None);
        queued(&mut other_out);
        *crate::lock(&fixture.events.watched) = Some(other_out);

        let row = RowJson::new(r#"["ev",["$e","!r"]]"#).expect("valid JSON");
        let rdata =
            Command::Rdata { stream: "events".into(), instance: "persister1".into(), token: Some(11), row };
        assert_eq!(fixture.feed(&mut writer, vec![rdata]).await, None);
        assert_eq!(fixture.events.positions()["persister1"], 11);
        assert_eq!(*crate::lock(&fixture.events.queued_before_applied), Vec::<String>::new());
        let mut other_out = crate::lock(&fixture.events.watched).take().expect("still watched");
        let relayed = other_out.try_recv().map(|outgoing| outgoing.line.to_string());
        assert!(
            relayed.as_deref().is_ok_and(|line| line.starts_with("RDATA events persister1 11 ")),
            "{relayed:?}"
        );
    });
}

#[test]
fn a_newer_connection_with_the_same_name_takes_it_over() {
    paused(async {
        let fixture = Fixture::new();
        let auth = || Command::Auth { secret: Secret::new(SECRET) };
        let name = || Command::Name { name: "persister1".into() };
        let (mut old, _old_out) = fixture.client().await;
        assert_eq!(fixture.feed(&mut old, vec![auth(), name()]).await, None);
        let (mut new, _new_out) = fixture.client().await;
        assert_eq!(fixture.feed(&mut new, vec![auth(), name()]).await, None);
        let position = |new_token| Command::Position {
            stream: "events".into(),
            instance: "persister1".into(),
            prev_token: 10,
            new_token,
        };
        assert_eq!(fixture.feed(&mut old, vec![position(15)]).await, Some(RefusalReason::Impersonation));
        assert_eq!(fixture.feed(&mut new, vec![position(16)]).await, None);
        assert_eq!(fixture.events.positions()["persister1"], 16);
    });
}

#[test]
fn failed_authentications_wait_longer_and_longer() {
    let fixture = Fixture::new();
    let address = Some("192.0.2.1".parse().expect("an address"));
    let pauses: Vec<_> = (0..8).map(|_| fixture.hub.auth_failure_pause(address)).collect();
    assert!(pauses.windows(2).all(|pair| pair[0] <= pair[1]), "{pauses:?}");
    assert!(pauses[0] < pauses[3]);
    assert_eq!(pauses[7], super::AUTH_PAUSE_MAX);
    let other = Some("192.0.2.2".parse().expect("an address"));
    assert_eq!(fixture.hub.auth_failure_pause(other), super::AUTH_PAUSE_FIRST, "per address");
}

#[test]
fn secrets_match_only_themselves() {
    use crate::http::secrets_match;
    assert!(secrets_match(b"s3cret", b"s3cret"));
    for wrong in [&b""[..], b"s3cre", b"s3cret!", b"S3cret", b"s3cret\0", b"s3crets3cret"] {
        assert!(!secrets_match(b"s3cret", wrong), "{wrong:?}");
    }
    assert!(!secrets_match(b"", b""), "no secret configured: nobody matches");
}
