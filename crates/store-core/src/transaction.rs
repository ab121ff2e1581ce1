//! The handle a store's queries run on: one transaction (or one autocommit
//! connection) inside a named interaction.

use std::fmt;

use crate::database::Isolation;
use crate::error::{DbError, StoreError};
use crate::value::{PgParam, Row, ToSqlValue, bind_sqlite};
use crate::{BoxFuture, Engine, sql};

/// A callback run once the outcome of a transaction is known.
type Callback = Box<dyn FnOnce() + Send>;

pub(crate) enum Conn {
    Postgres(deadpool_postgres::Object),
    Sqlite(SqlxConn),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// `BEGIN` has been sent and not yet answered: if the future is dropped now
    /// the driver may still run it, so this counts as open.
    Beginning,
    /// Inside `BEGIN`; must end with COMMIT or ROLLBACK.
    Open,
    /// No `BEGIN` was sent: each statement commits on its own.
    Autocommit,
    /// Committed or rolled back; callbacks have run.
    Finished,
}

/// A transaction inside a named interaction.
///
/// Queries use PostgreSQL's numbered placeholders on both engines (see the `sql`
/// module). Obtained from [`Database::run_interaction`](crate::Database::run_interaction),
/// [`Database::run_autocommit`](crate::Database::run_autocommit), or, for the
/// start-up reads of store constructors, [`Database::begin`](crate::Database::begin).
///
/// Dropped without being committed (for example when the future running it is
/// cancelled), it counts as failed: its `call_on_exception` callbacks run and its
/// connection is closed rather than returned to the pool half-way through a
/// transaction.
pub struct Transaction {
    interaction: &'static str,
    engine: Engine,
    conn: Option<Conn>,
    state: State,
    after_callbacks: Vec<Callback>,
    position_callbacks: Vec<Callback>,
    exception_callbacks: Vec<Callback>,
    /// A statement failed while the transaction was open. PostgreSQL then
    /// refuses everything until the end and answers COMMIT with a silent
    /// rollback; both engines treat the transaction as failed, so callers see
    /// the same outcome everywhere.
    poisoned: bool,
}

impl fmt::Debug for Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field("interaction", &self.interaction)
            .field("engine", &self.engine())
            .field("state", &self.state)
            .field("after_callbacks", &self.after_callbacks.len())
            .field("exception_callbacks", &self.exception_callbacks.len())
            .finish()
    }
}

impl Transaction {
    pub(crate) async fn start(
        interaction: &'static str,
        conn: Conn,
        isolation: Option<Isolation>,
    ) -> Result<Transaction, StoreError> {
        let engine = match conn {
            Conn::Postgres(_) => Engine::Postgres,
            Conn::Sqlite(_) => Engine::Sqlite,
        };
        let mut txn = Transaction {
            interaction,
            engine,
            conn: Some(conn),
            // Until BEGIN succeeds there is nothing to roll back.
            state: State::Autocommit,
            after_callbacks: Vec::new(),
            position_callbacks: Vec::new(),
            exception_callbacks: Vec::new(),
            poisoned: false,
        };
        if let Some(isolation) = isolation {
            let begin = match (txn.engine(), isolation) {
                // Synapse's isolation level: a consistent snapshot per transaction,
                // with conflicts reported as serialization failures, which we retry.
                (Engine::Postgres, Isolation::Snapshot) => "BEGIN ISOLATION LEVEL REPEATABLE READ",
                (Engine::Postgres, Isolation::ReadCommitted) => "BEGIN ISOLATION LEVEL READ COMMITTED",
                // Take the write lock up front: a deferred transaction that upgrades
                // from reading to writing can fail with SQLITE_BUSY at once, without
                // waiting for the busy timeout.
                (Engine::Sqlite, _) => "BEGIN IMMEDIATE",
            };
            txn.state = State::Beginning;
            txn.execute_batch(begin).await?;
            txn.state = State::Open;
        }
        Ok(txn)
    }

    /// The name of the interaction this transaction belongs to.
    pub fn interaction(&self) -> &'static str {
        self.interaction
    }

    /// Which engine runs the statements, for the rare SQL that must differ
    /// (sequences exist only on PostgreSQL, `GREATEST` is `MAX` on SQLite).
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// Runs `f` after this transaction commits, and never if it fails.
    ///
    /// If the interaction is retried, each attempt is its own transaction: the
    /// failed attempt's `call_on_exception` callbacks run and its `call_after`
    /// callbacks are dropped, and the retried closure registers its own.
    pub fn call_after(&mut self, f: impl FnOnce() + Send + 'static) {
        self.after_callbacks.push(Box::new(f));
    }

    /// Like [`Transaction::call_after`], for callbacks that publish stream
    /// positions: they run after every `call_after` callback, so everything a new
    /// position promises (cache invalidations, change caches) is in place before
    /// anyone can see the position move.
    pub fn call_after_position(&mut self, f: impl FnOnce() + Send + 'static) {
        self.position_callbacks.push(Box::new(f));
    }

    /// Runs `f` if this transaction rolls back or fails (including when it is
    /// dropped without committing), and never after a commit.
    pub fn call_on_exception(&mut self, f: impl FnOnce() + Send + 'static) {
        self.exception_callbacks.push(Box::new(f));
    }

    fn db_error(&mut self, source: DbError) -> StoreError {
        if self.state == State::Open {
            self.poisoned = true;
        }
        StoreError::Database { interaction: self.interaction, source }
    }

    fn conn(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("a transaction keeps its connection until it is dropped")
    }

    /// Runs one statement and returns the number of rows it changed.
    pub async fn execute(&mut self, sql: &str, params: &[&dyn ToSqlValue]) -> Result<u64, StoreError> {
        let interaction = self.interaction;
        let result = match self.conn() {
            Conn::Postgres(client) => {
                let result = async {
                    let statement = client.prepare_cached(sql).await?;
                    let params = pg_params(params);
                    client.execute(&statement, &pg_refs(&params)).await
                }
                .await;
                result.map_err(DbError::postgres)
            }
            Conn::Sqlite(conn) => {
                let sql = sql::to_sqlite(sql).map_err(|message| StoreError::Sql { interaction, message })?;
                sqlite_execute(conn, &sql, params).await.map_err(DbError::sqlx)
            }
        };
        result.map_err(|source| self.db_error(source))
    }

    /// Runs a query and returns all its rows.
    pub async fn query(&mut self, sql: &str, params: &[&dyn ToSqlValue]) -> Result<Vec<Row>, StoreError> {
        let interaction = self.interaction;
        let result = match self.conn() {
            Conn::Postgres(client) => {
                let result = async {
                    let statement = client.prepare_cached(sql).await?;
                    let params = pg_params(params);
                    let rows = client.query(&statement, &pg_refs(&params)).await?;
                    Row::from_postgres_rows(&rows)
                }
                .await;
                result.map_err(DbError::postgres)
            }
            Conn::Sqlite(conn) => {
                let sql = sql::to_sqlite(sql).map_err(|message| StoreError::Sql { interaction, message })?;
                sqlite_query(conn, &sql, params).await.map_err(DbError::sqlx)
            }
        };
        result.map_err(|source| self.db_error(source))
    }

    /// Runs a query that must return exactly one row.
    pub async fn query_one(&mut self, sql: &str, params: &[&dyn ToSqlValue]) -> Result<Row, StoreError> {
        let mut rows = self.query(sql, params).await?;
        match rows.len() {
            1 => Ok(rows.remove(0)),
            found => Err(StoreError::RowCount { interaction: self.interaction, found }),
        }
    }

    /// Runs a query that returns at most one row.
    pub async fn query_opt(
        &mut self,
        sql: &str,
        params: &[&dyn ToSqlValue],
    ) -> Result<Option<Row>, StoreError> {
        let mut rows = self.query(sql, params).await?;
        match rows.len() {
            0 => Ok(None),
            1 => Ok(Some(rows.remove(0))),
            found => Err(StoreError::RowCount { interaction: self.interaction, found }),
        }
    }

    /// Runs several `;`-separated statements without parameters (DDL, `SET`).
    pub async fn execute_batch(&mut self, sql: &str) -> Result<(), StoreError> {
        let result = match self.conn() {
            Conn::Postgres(client) => client.batch_execute(sql).await.map_err(DbError::postgres),
            Conn::Sqlite(conn) => sqlite_execute_batch(conn, sql).await.map_err(DbError::sqlx),
        };
        result.map_err(|source| self.db_error(source))
    }

    /// Commits, then runs the `call_after` callbacks. If the commit fails, the
    /// `call_on_exception` callbacks run instead.
    pub async fn commit(mut self) -> Result<(), StoreError> {
        if self.poisoned {
            let interaction = self.interaction;
            self.rollback().await;
            return Err(StoreError::Aborted { interaction });
        }
        if self.state == State::Open
            && let Err(err) = self.execute_batch("COMMIT").await
        {
            self.fail_and_close();
            return Err(err);
        }
        self.state = State::Finished;
        self.exception_callbacks.clear();
        let position_callbacks = std::mem::take(&mut self.position_callbacks);
        for callback in std::mem::take(&mut self.after_callbacks).into_iter().chain(position_callbacks) {
            callback();
        }
        Ok(())
    }

    /// Rolls back, then runs the `call_on_exception` callbacks.
    pub async fn rollback(mut self) {
        if self.state == State::Open && self.execute_batch("ROLLBACK").await.is_err() {
            // The connection is in an unknown state; `fail_and_close` discards it.
            self.fail_and_close();
            return;
        }
        self.state = State::Finished;
        self.run_exception_callbacks();
    }

    fn run_exception_callbacks(&mut self) {
        self.after_callbacks.clear();
        self.position_callbacks.clear();
        for callback in std::mem::take(&mut self.exception_callbacks) {
            callback();
        }
    }

    /// Marks the transaction failed and discards its connection, so that a
    /// half-finished transaction never goes back to the pool.
    fn fail_and_close(&mut self) {
        if let Some(conn) = self.conn.take() {
            match conn {
                Conn::Postgres(object) => drop(deadpool_postgres::Object::take(object)),
                Conn::Sqlite(conn) => rollback_in_background(conn),
            }
        }
        self.state = State::Finished;
        self.run_exception_callbacks();
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        match self.state {
            State::Beginning | State::Open => self.fail_and_close(),
            // An autocommit interaction that was never finished failed part-way.
            State::Autocommit => self.run_exception_callbacks(),
            State::Finished => {}
        }
    }
}

/// Ends an abandoned SQLite transaction on its connection and only then returns
/// the connection to the pool. Closing it instead would, for an in-memory
/// database, destroy the database with its last connection.
fn rollback_in_background(mut conn: SqlxConn) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(async move {
                // Commands run in order: a BEGIN still in flight runs first. An error
                // means there was no transaction left to end.
                if sqlite_execute_batch(&mut conn, "ROLLBACK").await.is_err() {
                    tracing::trace!("no SQLite transaction to roll back");
                }
            });
        }
        Err(_) => conn.close_on_drop(),
    }
}

// The SQLite calls are boxed at a signature with named lifetimes: sqlx's futures
// left unboxed inside the callers' higher-ranked closures make rustc fail to
// prove them `Send` ("implementation of `Executor` is not general enough").

type SqlxConn = sqlx::pool::PoolConnection<sqlx::Sqlite>;

fn sqlite_execute<'a>(
    conn: &'a mut SqlxConn,
    sql: &'a str,
    params: &'a [&'a dyn ToSqlValue],
) -> BoxFuture<'a, Result<u64, sqlx::Error>> {
    Box::pin(async move {
        let mut query = sqlx::query(sql);
        for param in params {
            query = bind_sqlite(query, param.to_sql_value());
        }
        query.execute(&mut **conn).await.map(|done| done.rows_affected())
    })
}

fn sqlite_query<'a>(
    conn: &'a mut SqlxConn,
    sql: &'a str,
    params: &'a [&'a dyn ToSqlValue],
) -> BoxFuture<'a, Result<Vec<Row>, sqlx::Error>> {
    Box::pin(async move {
        let mut query = sqlx::query(sql);
        for param in params {
            query = bind_sqlite(query, param.to_sql_value());
        }
        let rows = query.fetch_all(&mut **conn).await?;
        Row::from_sqlite_rows(&rows)
    })
}

fn sqlite_execute_batch<'a>(conn: &'a mut SqlxConn, sql: &'a str) -> BoxFuture<'a, Result<(), sqlx::Error>> {
    // A plain `&str` runs every `;`-separated statement on SQLite; `raw_sql`
    // would too, but its future is not provably `Send` even here.
    Box::pin(async move { sqlx::Executor::execute(&mut **conn, sql).await.map(|_| ()) })
}

fn pg_params<'a>(params: &'a [&dyn ToSqlValue]) -> Vec<PgParam<'a>> {
    params.iter().map(|param| PgParam(param.to_sql_value())).collect()
}

fn pg_refs<'a>(params: &'a [PgParam<'a>]) -> Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)> {
    params.iter().map(|param| param as &(dyn tokio_postgres::types::ToSql + Sync)).collect()
}
