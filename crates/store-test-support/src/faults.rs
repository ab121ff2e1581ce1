//! Real faults around a PostgreSQL COMMIT, for tests of what a process does when
//! it cannot know, or stops waiting for, a commit's outcome.
//!
//! - [`CommitFaults::make_commits_slow`]: a deferred constraint trigger that sleeps
//!   inside COMMIT, so a test has time to act while COMMIT is in flight.
//! - [`CommitFaults::wait_for_sleeping_commit`] and [`CommitFaults::terminate`]:
//!   find that backend and kill it (`pg_terminate_backend`), which rolls back.
//! - [`TcpProxy`]: a loopback relay in front of the server whose connections a
//!   test can cut, as a network failure would: the server goes on and commits,
//!   the client only sees its connection close.
//!
//! Nothing here imitates the database: the server, its triggers and its
//! connections are real.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What tests return, so these compose with `?` in a `TestResult`.
type Error = Box<dyn std::error::Error>;

/// A connection of its own to a test database, outside any pool, from which a
/// test slows commits down and kills the backends running them.
#[derive(Debug)]
pub struct CommitFaults {
    client: tokio_postgres::Client,
}

impl CommitFaults {
    /// Connects to the PostgreSQL database at `url` (a [`crate::TestDb`]'s).
    pub async fn connect(url: &str) -> Result<CommitFaults, Error> {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(CommitFaults { client })
    }

    /// Makes every transaction that ran `event` (`INSERT`, `DELETE`, …) on `table`
    /// sleep `seconds` inside its COMMIT, once per row: a deferred constraint
    /// trigger runs while COMMIT executes, before anything is committed.
    pub async fn make_commits_slow(&self, table: &str, event: &str, seconds: f64) -> Result<(), Error> {
        self.client
            .batch_execute(&format!(
                "CREATE FUNCTION sleep_in_commit_{table}() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$;\
                 CREATE CONSTRAINT TRIGGER sleep_in_commit AFTER {event} ON {table} \
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION sleep_in_commit_{table}();"
            ))
            .await?;
        Ok(())
    }

    /// Waits (up to 10 s) until a backend of this database sleeps inside COMMIT,
    /// and returns its process ID.
    pub async fn wait_for_sleeping_commit(&self) -> Result<i32, Error> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let row = self
                .client
                .query_opt(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
                     AND pid <> pg_backend_pid() AND query = 'COMMIT' AND wait_event = 'PgSleep' LIMIT 1",
                    &[],
                )
                .await?;
            if let Some(row) = row {
                return Ok(row.try_get(0)?);
            }
            if Instant::now() > deadline {
                return Err("no backend started sleeping in COMMIT within 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Terminates backend `pid`, as an operator's `pg_terminate_backend` would: a
    /// COMMIT still running its deferred triggers rolls back, and the client gets
    /// a FATAL error as the connection closes.
    pub async fn terminate(&self, pid: i32) -> Result<(), Error> {
        let row = self.client.query_one("SELECT pg_terminate_backend($1)", &[&pid]).await?;
        if !row.try_get::<_, bool>(0)? {
            return Err(format!("backend {pid} was not there to terminate").into());
        }
        Ok(())
    }

    /// Runs `sql` (one statement, no parameters) and returns the first column of
    /// its first row as an integer: for counting rows from outside the pool.
    pub async fn count(&self, sql: &str) -> Result<i64, Error> {
        Ok(self.client.query_one(sql, &[]).await?.try_get(0)?)
    }
}

/// A TCP relay on loopback in front of a PostgreSQL server, whose connections a
/// test can cut. Stops relaying when dropped.
#[derive(Debug)]
pub struct TcpProxy {
    address: SocketAddr,
    relays: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accepting: JoinHandle<()>,
}

impl TcpProxy {
    /// Starts relaying to the server of the PostgreSQL `url`.
    pub async fn start(url: &str) -> Result<TcpProxy, Error> {
        let target = server_address(url).ok_or_else(|| format!("no server address in {url}"))?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let relays = Arc::new(Mutex::new(Vec::new()));
        let accepting = tokio::spawn({
            let relays = Arc::clone(&relays);
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let target = target.clone();
                    let relay = tokio::spawn(async move {
                        if let Ok(mut server) = TcpStream::connect(&target).await {
                            // Either side closing ends the relay; how is of no interest.
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    relays.lock().unwrap_or_else(PoisonError::into_inner).push(relay);
                }
            }
        });
        Ok(TcpProxy { address, relays, accepting })
    }

    /// `url` with its server replaced by this proxy.
    pub fn url_through(&self, url: &str) -> String {
        let (start, end) = authority_host(url).unwrap_or((0, 0));
        format!("{}{}{}", &url[..start], self.address, &url[end..])
    }

    /// Cuts every connection relayed so far, at once and on both sides: the
    /// client sees its connection close, the server sees its client go when it
    /// next reads or writes. New connections are still relayed.
    pub fn sever_all(&self) {
        for relay in self.relays.lock().unwrap_or_else(PoisonError::into_inner).drain(..) {
            relay.abort();
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accepting.abort();
        self.sever_all();
    }
}

/// The byte range of `host[:port]` in a `postgres://[user[:password]@]host[:port]/…` URL.
fn authority_host(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://")? + 3;
    let end = url[start..].find(['/', '?']).map_or(url.len(), |idx| start + idx);
    let host_start = url[start..end].rfind('@').map_or(start, |idx| start + idx + 1);
    Some((host_start, end))
}

/// `host:port` of a PostgreSQL URL, with the default port when it names none.
fn server_address(url: &str) -> Option<String> {
    let (start, end) = authority_host(url)?;
    let host = &url[start..end];
    Some(if host.contains(':') { host.to_owned() } else { format!("{host}:5432") })
}

#[cfg(test)]
mod tests {
    use super::{authority_host, server_address};

    #[test]
    fn the_server_is_found_in_the_url() {
        let url = "postgres://postgres@127.0.0.1:5432/hs_test_1?sslmode=disable";
        let (start, end) = authority_host(url).expect("the URL has an authority");
        assert_eq!(&url[start..end], "127.0.0.1:5432");
        assert_eq!(server_address("postgres://u:p@db/x").as_deref(), Some("db:5432"));
        assert_eq!(server_address("postgres://h:1").as_deref(), Some("h:1"));
    }
}
