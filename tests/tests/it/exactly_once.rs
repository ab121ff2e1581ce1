//! Exactly-once, in-order delivery through the client API while something
//! dies: 4 clients send 2,000 events to 20 rooms through every process while
//! a victim is stopped and restarted twice. Every event acknowledged with 200
//! must reach each member's sync exactly once, in stream order within its
//! room, and no sync token may go backwards (`tests::load` has the load and
//! the checks).
//!
//! The victims: one of the two event writers (`kill -9`), the master
//! (`kill -9`), over Redis and over TCP; and, over Redis, the Redis server
//! itself (a dedicated one, killed and started again on its port). Syncs go
//! to the processes that stay up; sends go everywhere, retried on the next
//! process while one is down.

use std::time::Duration;

use ::tests::deployment::{Deployment, Transport, base_urls, eventually, knows_final_positions, metric};
use ::tests::load::{Load, PREFIX, Setup};
use ::tests::redis_server::RedisServer;

const EVENTS: usize = 2_000;
/// How long the deployment may take to settle once the load is over.
const SETTLE: Duration = Duration::from_secs(15);

/// What is stopped and restarted twice under load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Victim {
    /// `writer1`, one of the two event writers.
    EventWriter,
    /// The master.
    Master,
    /// The Redis server every process replicates through.
    Redis,
}

/// Every process's servers index: master, writer1, writer2, syncer.
const MASTER: usize = 0;
const WRITER1: usize = 1;

fn every_acknowledged_event_arrives_once_in_order(transport: Transport, victim: Victim) {
    // Declared first, so dropped after the processes that use it.
    let mut redis = (victim == Victim::Redis).then(RedisServer::start);
    let mut deployment = Deployment::for_clients_over(transport);
    if let Some(redis) = &redis {
        deployment.set_redis_url(&redis.url());
    }
    // master, writer1, writer2, syncer.
    let mut servers = deployment.start_all();
    let urls = base_urls(&servers);
    // Syncs go to the processes that stay up; sends go everywhere.
    let staying_up: &[usize] = match victim {
        Victim::EventWriter => &[MASTER, 2, 3],
        Victim::Master => &[WRITER1, 2, 3],
        Victim::Redis => &[MASTER, WRITER1, 2, 3],
    };
    let sync_urls: Vec<String> = staying_up.iter().map(|index| urls[*index].clone()).collect();

    let setup = Setup::new(&urls);
    let (clients, rooms) = (&setup.clients, &setup.rooms);
    let load = Load::start(&setup, &urls, &sync_urls, EVENTS);

    // Stop the victim twice while the clients send.
    for threshold in [EVENTS / 4, EVENTS * 5 / 8] {
        load.wait_until_sent(threshold);
        if let Some(redis) = redis.as_mut() {
            redis.kill();
            std::thread::sleep(Duration::from_secs(1));
            redis.start_again();
        } else {
            let (index, name) =
                if victim == Victim::Master { (MASTER, "master") } else { (WRITER1, "writer1") };
            let killed = servers.remove(index).stop_with("KILL");
            assert!(!killed.status.success(), "kill -9 ends {name}");
            // Down while the clients send, whether or not one of them happens
            // to try it now (they may all be waiting on writes that the
            // master relays): a send through it is refused.
            let (status, answer) =
                clients[0].on(&urls[index]).try_send(&rooms[0], &format!("{PREFIX}down"), "down");
            assert_eq!(status, 0, "{name} is down and refuses: {answer}");
            std::thread::sleep(Duration::from_millis(500));
            servers.insert(index, deployment.start(name));
        }
    }
    let outcome = load.finish();

    if victim == Victim::Redis {
        // Sends wait out the outage instead of being refused; the processes
        // noticed it.
        for server in &servers {
            let metrics = server.get("/metrics").1;
            assert!(
                metric(&metrics, "homeserver_replication_reconnects_total") >= 1.0,
                "{} reconnected to Redis:\n{metrics}",
                server.base_url
            );
        }
    }
    outcome.check(&deployment.db.url);
    // And the deployment settles: every process, the restarted victim
    // included, knows each writer where the writer says it is.
    let writers = [("writer1", &servers[WRITER1]), ("writer2", &servers[2])];
    for server in &servers {
        eventually(&format!("{} to know both writers' final positions", server.base_url), SETTLE, || {
            knows_final_positions(server, &writers)
        });
    }
}

#[test]
fn every_acknowledged_event_arrives_once_in_order_while_a_writer_is_killed_twice() {
    every_acknowledged_event_arrives_once_in_order(Transport::Redis, Victim::EventWriter);
}

#[test]
fn every_acknowledged_event_arrives_once_in_order_while_a_writer_is_killed_twice_over_tcp() {
    every_acknowledged_event_arrives_once_in_order(Transport::Tcp, Victim::EventWriter);
}

#[test]
fn every_acknowledged_event_arrives_once_in_order_while_the_master_is_killed_twice() {
    every_acknowledged_event_arrives_once_in_order(Transport::Redis, Victim::Master);
}

#[test]
fn every_acknowledged_event_arrives_once_in_order_while_the_master_is_killed_twice_over_tcp() {
    every_acknowledged_event_arrives_once_in_order(Transport::Tcp, Victim::Master);
}

#[test]
fn every_acknowledged_event_arrives_once_in_order_while_redis_restarts_twice() {
    every_acknowledged_event_arrives_once_in_order(Transport::Redis, Victim::Redis);
}
