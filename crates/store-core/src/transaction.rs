//! The handle a store's queries run on: one transaction (or one autocommit
//! connection) inside a named interaction, and how it ends: the COMMIT, the
//! callbacks that follow it, and, when the connection fails while COMMIT is in
//! flight, reading the outcome back from the database.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use crate::database::Isolation;
use crate::error::{DbError, StoreError};
use crate::sqlite::{self, SqliteConn};
use crate::value::{PgParam, Row, ToSqlValue, Value};
use crate::{BoxFuture, Engine, sql};

/// An invalidation, registered with [`Transaction::call_after`]: `Fn`, because
/// a commit whose outcome was in doubt runs it twice.
type Invalidation = Box<dyn Fn() + Send>;

/// A callback run once, when the outcome of a transaction is known.
type Callback = Box<dyn FnOnce() + Send>;

/// The transaction's top-level ID, if it has one (PostgreSQL 13+). The
/// `_if_assigned` form never assigns one: a transaction that changed nothing
/// would otherwise have to write (and flush) a commit record.
const CURRENT_XID_SQL: &str = "SELECT pg_current_xact_id_if_assigned()::text::bigint";

/// The transaction's top-level ID, assigning one if it has none yet
/// ([`Transaction::assign_id`]).
const ASSIGN_XID_SQL: &str = "SELECT pg_current_xact_id()::text::bigint";

/// How transaction `$1` ended, asked from another connection: its status in the
/// commit log, and whether a new snapshot still sees it running. The commit log
/// says committed from the moment the commit record is written, before the
/// transaction leaves the list of running ones (and `pg_xact_status` of some
/// releases reports that moment as committed); until it leaves, its rows are
/// invisible to new snapshots, so it does not count as committed here.
const OUTCOME_SQL: &str = "SELECT pg_xact_status(xid), pg_visible_in_snapshot(xid, pg_current_snapshot()) \
     FROM (SELECT $1::bigint::text::xid8 AS xid) AS asked";

/// The first pause between two readings of an outcome still in doubt; each next
/// pause doubles, up to [`MAX_READ_BACK_PAUSE`].
const FIRST_READ_BACK_PAUSE: Duration = Duration::from_millis(10);
const MAX_READ_BACK_PAUSE: Duration = Duration::from_secs(1);

pub(crate) enum Conn {
    Postgres(deadpool_postgres::Object),
    Sqlite(SqliteConn),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// PostgreSQL: `BEGIN` is to be sent in the round trip of the first
    /// statement, just ahead of it (see [`Transaction::take_begin`]); nothing
    /// has been sent yet.
    BeginWithFirstStatement(&'static str),
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
/// Three kinds of callbacks follow the outcome:
///
/// | outcome of COMMIT | [`call_after`](Self::call_after) (invalidations) | [`call_after_position`](Self::call_after_position) | [`call_on_exception`](Self::call_on_exception) |
/// |---|---|---|---|
/// | committed | once | once, after them | never |
/// | rolled back, refused, or never sent | never | never | once |
/// | in doubt, read back as committed | at once, and again once known | once, after the second run | never |
/// | in doubt, read back as rolled back | at once | never | once, once known |
/// | in doubt and never known (pool closed) | at once | never | never |
/// | in doubt, but nothing was written | as committed | as committed | never |
///
/// Dropped without being committed (for example when the future running it is
/// cancelled), it counts as failed: its `call_on_exception` callbacks run and its
/// connection is closed rather than returned to the pool half-way through a
/// transaction. Once [`Transaction::commit`] has been called, dropping its
/// future changes nothing: the commit and its callbacks run to the end.
pub struct Transaction {
    interaction: &'static str,
    engine: Engine,
    conn: Option<Conn>,
    state: State,
    invalidations: Vec<Invalidation>,
    position_callbacks: Vec<Callback>,
    exception_callbacks: Vec<Callback>,
    /// A statement failed while the transaction was open. PostgreSQL then
    /// refuses everything until the end and answers COMMIT with a silent
    /// rollback; both engines treat the transaction as failed, so callers see
    /// the same outcome everywhere.
    poisoned: bool,
    /// PostgreSQL: the transaction's top-level ID, learnt in the round trip of
    /// the first statement that wrote (see [`may_write`]). What a COMMIT whose
    /// answer was lost is read back by; `None` while nothing has been written.
    xid: Option<i64>,
    /// The next statement is to give the transaction its ID ([`Transaction::assign_id`]).
    assign_xid: bool,
    /// Statements to send with the COMMIT ([`Transaction::execute_at_commit`]),
    /// in order.
    at_commit: Vec<AtCommit>,
    /// Statements sent with the COMMIT wrote, and the ID that would have told
    /// how the transaction ended never arrived: a COMMIT in doubt then cannot
    /// count as having written nothing.
    wrote_without_xid: bool,
}

/// What the next statement carries with it ([`Transaction::next_statement`]).
struct Next {
    queued: Vec<AtCommit>,
    /// The statement learning the transaction's ID, asked right behind it.
    learn_xid: Option<&'static str>,
    begin: Option<&'static str>,
    /// No transaction: each statement commits on its own.
    autocommit: bool,
}

/// What a statement is run for ([`Transaction::statement`]).
#[derive(Debug, Clone, Copy)]
enum Wanted {
    /// The number of rows it changed.
    Changed,
    /// The rows it returns.
    Rows,
}

/// A statement's answer, as [`Wanted`].
enum Answer {
    Changed(u64),
    Rows(Vec<Row>),
}

/// PostgreSQL: the statements queued for the COMMIT, prepared, and the
/// question of the transaction's ID if it is to be asked.
struct PreparedAtCommit {
    statements: Vec<tokio_postgres::Statement>,
    xid: Option<tokio_postgres::Statement>,
}

/// A statement queued to run in the round trip of the COMMIT.
struct AtCommit {
    sql: String,
    params: Vec<Value>,
}

impl fmt::Debug for Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field("interaction", &self.interaction)
            .field("engine", &self.engine())
            .field("state", &self.state)
            .field("xid", &self.xid)
            .field("invalidations", &self.invalidations.len())
            .field("position_callbacks", &self.position_callbacks.len())
            .field("exception_callbacks", &self.exception_callbacks.len())
            .field("at_commit", &self.at_commit.len())
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
            invalidations: Vec::new(),
            position_callbacks: Vec::new(),
            exception_callbacks: Vec::new(),
            poisoned: false,
            xid: None,
            assign_xid: false,
            at_commit: Vec::new(),
            wrote_without_xid: false,
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
            // A round trip saved per transaction on PostgreSQL, a hand-over to
            // the connection's thread and back on SQLite.
            txn.state = State::BeginWithFirstStatement(begin);
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

    /// Registers an invalidation: `f` runs once this transaction may have
    /// committed, and never after a failure known to have rolled it back.
    ///
    /// `f` must only make caches forget (drop entries, mark change caches), so
    /// that running it when nothing changed, or twice, is harmless: when the
    /// connection fails while COMMIT is in flight, `f` runs at once, because the
    /// write may already be visible, and again once the commit is read back as
    /// committed, because a read made in between may have cached what the write
    /// replaced (see the table on [`Transaction`]). Anything that must happen
    /// exactly once after a commit, or that announces the write, belongs in
    /// [`Transaction::call_after_position`].
    ///
    /// If the interaction is retried, each attempt is its own transaction: the
    /// failed attempt's `call_on_exception` callbacks run and its `call_after`
    /// callbacks are dropped, and the retried closure registers its own.
    pub fn call_after(&mut self, f: impl Fn() + Send + 'static) {
        self.invalidations.push(Box::new(f));
    }

    /// Runs `f` once this transaction is known to have committed, after every
    /// `call_after` invalidation: for callbacks that publish stream positions, so
    /// everything a new position promises is in place before anyone can see the
    /// position move. While a COMMIT's outcome is in doubt, `f` waits for it.
    pub fn call_after_position(&mut self, f: impl FnOnce() + Send + 'static) {
        self.position_callbacks.push(Box::new(f));
    }

    /// Runs `f` once this transaction is known to have rolled back or failed
    /// (including when it is dropped without committing, and a COMMIT in doubt
    /// read back as rolled back), and never after a commit.
    pub fn call_on_exception(&mut self, f: impl FnOnce() + Send + 'static) {
        self.exception_callbacks.push(Box::new(f));
    }

    /// Whether the statement `sql` is to learn the transaction's ID: on
    /// PostgreSQL, inside a transaction, until a write has given it one.
    fn learns_xid(&self, sql: &str) -> bool {
        self.engine == Engine::Postgres
            && matches!(self.state, State::Open | State::BeginWithFirstStatement(_))
            && self.xid.is_none()
            && !self.poisoned
            && (self.assign_xid || may_write(sql))
    }

    /// Takes what the next statement, `sql`, carries with it: the queued
    /// statements ahead of it, the question of the transaction's ID (any
    /// queued statement may write), and `BEGIN` if still to be sent.
    fn next_statement(&mut self, sql: &str) -> Next {
        let queued = std::mem::take(&mut self.at_commit);
        let learns_xid = self.learns_xid(sql) || (!queued.is_empty() && self.learns_xid(""));
        let learn_xid = learns_xid.then(|| self.xid_sql());
        let begin = self.take_begin();
        Next { queued, learn_xid, begin, autocommit: self.state == State::Autocommit }
    }

    /// The statement that learns the transaction's ID: assigning one when
    /// [`assign_id`](Self::assign_id) asked for it (then only once).
    fn xid_sql(&mut self) -> &'static str {
        if std::mem::take(&mut self.assign_xid) { ASSIGN_XID_SQL } else { CURRENT_XID_SQL }
    }

    /// The `BEGIN` still to be sent ahead of the next statement, if any; the
    /// transaction counts as open from here on.
    ///
    /// Pipelining is safe because nothing can make that `BEGIN` fail while the
    /// statement behind it runs: the connection comes from the pool outside any
    /// transaction and the text is ours, so the only failures left are the
    /// connection's, and a broken connection runs neither. Were `BEGIN` to
    /// fail all the same, the statement's error or success is ignored and the
    /// transaction is failed (its connection is discarded).
    fn take_begin(&mut self) -> Option<&'static str> {
        match self.state {
            State::BeginWithFirstStatement(begin) => {
                self.state = State::Beginning;
                Some(begin)
            }
            _ => None,
        }
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
    ///
    /// Statements queued for the COMMIT before it go ahead of it, in the same
    /// round trip (PostgreSQL) or call (SQLite), as they do for
    /// [`query`](Self::query) and [`execute_batch`](Self::execute_batch).
    pub async fn execute(&mut self, sql: &str, params: &[&dyn ToSqlValue]) -> Result<u64, StoreError> {
        match self.statement(sql, params, Wanted::Changed).await? {
            Answer::Changed(changed) => Ok(changed),
            Answer::Rows(_) => unreachable!("a statement asked for its count answers with its count"),
        }
    }

    /// Runs one statement with the queued ones ahead of it, and answers with
    /// what `wanted` says: the engines differ in how, not in what.
    async fn statement(
        &mut self,
        sql: &str,
        params: &[&dyn ToSqlValue],
        wanted: Wanted,
    ) -> Result<Answer, StoreError> {
        let interaction = self.interaction;
        let Next { queued, learn_xid, begin, autocommit } = self.next_statement(sql);
        let result = match self.conn() {
            Conn::Postgres(client) => {
                let result = async {
                    let ahead = prepare_queued(client, &queued).await?;
                    let statement = client.prepare_cached(sql).await?;
                    let xid_statement = prepare_xid_statement(client, learn_xid).await?;
                    let params = pg_params(params);
                    let refs = pg_refs(&params);
                    // The request goes out when this is first polled, as the
                    // driver's own future would.
                    let answer = async {
                        match wanted {
                            Wanted::Changed => client.execute(&statement, &refs).await.map(Answer::Changed),
                            Wanted::Rows => {
                                let rows = client.query(&statement, &refs).await?;
                                Ok(Answer::Rows(Row::from_postgres_rows(&rows)?))
                            }
                        }
                    };
                    let work = with_xid(client, xid_statement.as_ref(), answer);
                    after_begin(client, begin, behind_queued(client, &ahead, &queued, work)).await
                }
                .await;
                result.map_err(DbError::postgres)
            }
            Conn::Sqlite(conn) => {
                let sql = sql::to_sqlite(sql).map_err(|message| StoreError::Sql { interaction, message })?;
                let on_writer = autocommit && (may_write(&sql) || !queued.is_empty());
                let (sql, params) = (sql.into_owned(), owned(params));
                match sqlite_statements(queued) {
                    Ok(queued) => sqlite_call(conn, begin, on_writer, move |conn| {
                        run_queued(conn, &queued)?;
                        match wanted {
                            Wanted::Changed => sqlite::execute(conn, &sql, &params).map(Answer::Changed),
                            Wanted::Rows => sqlite::query(conn, &sql, &params).map(Answer::Rows),
                        }
                    })
                    .await
                    .map(|answer| (answer, None)),
                    Err(err) => Err(err),
                }
            }
        };
        self.learned(result)
    }

    /// Queues `sql` to run just before COMMIT, in its round trip: for the
    /// writes that end an interaction, whose results nothing waits for. On
    /// PostgreSQL the queued statements, the COMMIT, and `BEGIN` if nothing was
    /// sent yet go out together, which saves a round trip per statement; on
    /// SQLite they run in the COMMIT's call on the connection's thread;
    /// outside a transaction, they run in turn.
    ///
    /// The parameters are copied. A statement run in the meantime takes the
    /// queued ones ahead of it, in its own round trip (or call), so statements
    /// always run in the order they were given; if one of them fails, that
    /// statement returns its error. If a queued statement fails at the
    /// COMMIT, the transaction rolls back and [`commit`](Self::commit) returns
    /// that statement's error (retried like any other by
    /// [`Database::run_interaction`](crate::Database::run_interaction)).
    ///
    /// A COMMIT in doubt is read back by the transaction's ID: when every write
    /// of a transaction is queued, call [`assign_id`](Self::assign_id) before
    /// its last ordinary statement, so that the ID is known before the COMMIT
    /// round trip.
    ///
    /// ```no_run
    /// # async fn example(txn: &mut store_core::Transaction) -> Result<(), store_core::StoreError> {
    /// txn.assign_id();
    /// let next: i64 = txn.query_one("SELECT nextval('events_stream_seq')", &[]).await?.get(0)?;
    /// txn.execute_at_commit("INSERT INTO events (stream_ordering) VALUES ($1)", &[&next]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn execute_at_commit(&mut self, sql: impl Into<String>, params: &[&dyn ToSqlValue]) {
        let params = params.iter().map(|param| Value::from(param.to_sql_value())).collect();
        self.at_commit.push(AtCommit { sql: sql.into(), params });
    }

    /// PostgreSQL: the next statement's round trip also gives the transaction
    /// its ID, and learns it, even if the statement writes nothing (a
    /// `nextval`). For transactions whose writes all go with the COMMIT
    /// ([`execute_at_commit`](Self::execute_at_commit)): without the ID, a
    /// COMMIT whose answer is lost could not be read back, and the stream IDs
    /// it carries would stay unfinished. Nothing on SQLite.
    pub fn assign_id(&mut self) {
        self.assign_xid = self.engine == Engine::Postgres && self.xid.is_none();
    }

    /// Outside a transaction, which has no COMMIT to send them with: runs the
    /// statements queued for the COMMIT now, in turn.
    async fn send_queued(&mut self) -> Result<(), StoreError> {
        for queued in std::mem::take(&mut self.at_commit) {
            let params: Vec<&dyn ToSqlValue> = queued.params.iter().map(|v| v as &dyn ToSqlValue).collect();
            self.execute(&queued.sql, &params).await?;
        }
        Ok(())
    }

    /// Runs a query and returns all its rows.
    pub async fn query(&mut self, sql: &str, params: &[&dyn ToSqlValue]) -> Result<Vec<Row>, StoreError> {
        match self.statement(sql, params, Wanted::Rows).await? {
            Answer::Rows(rows) => Ok(rows),
            Answer::Changed(_) => unreachable!("a statement asked for its rows answers with its rows"),
        }
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
        // Any statement of the batch may write, whatever the first one is.
        let Next { queued, learn_xid, begin, autocommit } = self.next_statement("");
        let result = match self.conn() {
            Conn::Postgres(client) => {
                let result = async {
                    let ahead = prepare_queued(client, &queued).await?;
                    let xid_statement = prepare_xid_statement(client, learn_xid).await?;
                    let work = with_xid(client, xid_statement.as_ref(), client.batch_execute(sql));
                    after_begin(client, begin, behind_queued(client, &ahead, &queued, work)).await
                }
                .await;
                result.map_err(DbError::postgres)
            }
            Conn::Sqlite(conn) => {
                let sql = sql.to_owned();
                // Any statement of the batch may write.
                match sqlite_statements(queued) {
                    Ok(queued) => sqlite_call(conn, begin, autocommit, move |conn| {
                        run_queued(conn, &queued)?;
                        conn.execute_batch(&sql)
                    })
                    .await
                    .map(|()| ((), None)),
                    Err(err) => Err(err),
                }
            }
        };
        self.learned(result)
    }

    /// Keeps the transaction ID a statement learnt, and turns its failure into
    /// the interaction's error.
    fn learned<T>(&mut self, result: Result<(T, Option<i64>), DbError>) -> Result<T, StoreError> {
        // A statement that carried `BEGIN` leaves the transaction open (and,
        // had it failed, poisoned as usual).
        if self.state == State::Beginning {
            self.state = State::Open;
        }
        match result {
            Ok((value, xid)) => {
                self.xid = self.xid.or(xid);
                Ok(value)
            }
            Err(source) => Err(self.db_error(source)),
        }
    }

    /// Runs `BEGIN`, `ROLLBACK` and the like: statements of our own, which
    /// write nothing.
    async fn run_batch(&mut self, sql: &str) -> Result<(), StoreError> {
        let result = match self.conn() {
            Conn::Postgres(client) => client.batch_execute(sql).await.map_err(DbError::postgres),
            Conn::Sqlite(conn) => {
                let sql = sql.to_owned();
                conn.call(move |conn| conn.execute_batch(&sql)).await
            }
        };
        result.map_err(|source| self.db_error(source))
    }

    /// Commits, then runs the callbacks: the `call_after` invalidations, then the
    /// `call_after_position` ones. If the commit fails, the `call_on_exception`
    /// callbacks run instead; if the connection fails while COMMIT is in flight,
    /// the outcome is read back first (see the table on [`Transaction`]).
    ///
    /// Once called, it runs to the end even if the future awaiting it is dropped
    /// (a client hanging up makes axum drop its handler): COMMIT may reach the
    /// server whatever the caller does next, so what follows it must not depend
    /// on anyone still waiting. Returns `Ok` once the transaction is known to
    /// have committed.
    pub async fn commit(mut self) -> Result<(), StoreError> {
        // Without a transaction there is no COMMIT to send them with.
        if !self.at_commit.is_empty()
            && self.state == State::Autocommit
            && let Err(err) = self.send_queued().await
        {
            self.rollback().await;
            return Err(err);
        }
        if self.poisoned {
            let interaction = self.interaction;
            self.rollback().await;
            return Err(StoreError::Aborted { interaction });
        }
        if self.state != State::Open && self.at_commit.is_empty() {
            // Autocommit, or a transaction that sent nothing: every statement
            // committed as it ran, and no await lies between here and the
            // callbacks.
            self.committed();
            return Ok(());
        }
        let interaction = self.interaction;
        // A task of its own, which dropping the handle does not cancel. It costs
        // a few microseconds next to a commit's round trip and flush.
        match tokio::spawn(self.send_commit()).await {
            Ok(result) => result,
            Err(err) => match err.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                // Only a runtime shutting down cancels a task that nobody aborts.
                Err(err) => Err(StoreError::Database {
                    interaction,
                    source: DbError::commit_outcome_unknown(format!("the commit's task ended early: {err}")),
                }),
            },
        }
    }

    /// Sends COMMIT and settles the outcome; run in a task of its own.
    async fn send_commit(mut self) -> Result<(), StoreError> {
        let result = match self.engine {
            Engine::Postgres => match self.prepare_at_commit().await {
                Ok(prepared) => self.send_commit_postgres(prepared).await,
                Err(source) => {
                    // Nothing of the COMMIT's round trip was sent: whatever
                    // broke, the transaction cannot have committed.
                    self.fail_and_close();
                    return Err(StoreError::Database { interaction: self.interaction, source });
                }
            },
            Engine::Sqlite => self.send_commit_sqlite().await,
        };
        match result {
            Ok(()) => {
                self.committed();
                Ok(())
            }
            // Refused by PostgreSQL with an ERROR, or failed on SQLite, whose
            // database is a local file that the library call reports on exactly:
            // nothing was committed, and `fail_and_close` rolls back whatever
            // is left.
            Err(source) if !source.leaves_commit_in_doubt() => {
                self.fail_and_close();
                Err(StoreError::Database { interaction: self.interaction, source })
            }
            Err(source) => self.settle_commit_in_doubt(source).await,
        }
    }

    /// PostgreSQL: prepares the statements queued for the COMMIT and, if the
    /// transaction's ID is still unknown, the question of it, before anything
    /// of the COMMIT's round trip is sent.
    async fn prepare_at_commit(&mut self) -> Result<PreparedAtCommit, DbError> {
        let ask_xid = !self.at_commit.is_empty() && self.xid.is_none();
        let mut prepared =
            PreparedAtCommit { statements: Vec::with_capacity(self.at_commit.len()), xid: None };
        let Some(Conn::Postgres(client)) = self.conn.as_ref() else {
            unreachable!("a PostgreSQL transaction on a SQLite connection")
        };
        prepared.statements = prepare_queued(client, &self.at_commit).await.map_err(DbError::postgres)?;
        prepared.xid = prepare_xid_statement(client, ask_xid.then_some(CURRENT_XID_SQL))
            .await
            .map_err(DbError::postgres)?;
        Ok(prepared)
    }

    /// PostgreSQL: sends COMMIT, in one round trip with what goes ahead of it:
    /// `BEGIN` if nothing was sent yet, the queued statements, and, if the
    /// transaction's ID is still unknown, the question of it. A queued statement
    /// refused by the server is the outcome: the transaction rolled back.
    async fn send_commit_postgres(&mut self, prepared: PreparedAtCommit) -> Result<(), DbError> {
        let queued = std::mem::take(&mut self.at_commit);
        let begin = self.take_begin();
        let PreparedAtCommit { statements, xid: xid_statement } = prepared;
        let ask_xid = xid_statement.is_some();
        let Conn::Postgres(client) = self.conn() else {
            unreachable!("a PostgreSQL transaction on a SQLite connection")
        };
        if queued.is_empty() && begin.is_none() {
            return client.batch_execute("COMMIT").await.map_err(DbError::postgres);
        }
        let values: Vec<Vec<PgParam<'_>>> = queued
            .iter()
            .map(|statement| statement.params.iter().map(|value| PgParam(value.to_sql_value())).collect())
            .collect();
        let refs: Vec<_> = values.iter().map(|values| pg_refs(values)).collect();

        let client: &tokio_postgres::Client = client;
        let mut requests: Vec<BoxFuture<'_, Result<Option<i64>, tokio_postgres::Error>>> = Vec::new();
        if let Some(begin) = begin {
            requests.push(Box::pin(async move { client.batch_execute(begin).await.map(|()| None) }));
        }
        for (statement, params) in statements.iter().zip(&refs) {
            requests.push(Box::pin(async move { client.execute(statement, params).await.map(|_| None) }));
        }
        if let Some(xid_statement) = &xid_statement {
            requests.push(Box::pin(async move { client.query_one(xid_statement, &[]).await?.try_get(0) }));
        }
        requests.push(Box::pin(async move { client.batch_execute("COMMIT").await.map(|()| None) }));
        let mut answers = in_one_round_trip(requests).await;

        let committed = answers.pop().expect("COMMIT was sent");
        if ask_xid && let Some(Ok(xid)) = answers.pop() {
            self.xid = xid;
        }
        if self.state == State::Beginning {
            self.state = State::Open;
        }
        // Refused by the server, a statement aborted the transaction, and the
        // COMMIT behind it could only roll it back (PostgreSQL answers it
        // without an error): its error is the outcome. A broken connection is
        // not a refusal; the COMMIT's own answer says what is known then.
        if let Some(refused) = answers
            .into_iter()
            .filter_map(Result::err)
            .map(DbError::postgres)
            .find(|err| !err.leaves_commit_in_doubt())
        {
            return Err(refused);
        }
        if committed.is_err() && !queued.is_empty() && self.xid.is_none() {
            self.wrote_without_xid = true;
        }
        committed.map(|_| ()).map_err(DbError::postgres)
    }

    /// SQLite: runs `BEGIN` if still to be sent, the queued statements and
    /// COMMIT in one call on the connection's thread, which saves a hand-over
    /// between threads per statement. A failed statement stops there, before
    /// the COMMIT: its error is the outcome, and the transaction is rolled back.
    ///
    /// A transaction that sent nothing before is whole in that call, which
    /// rolls back itself on failure: the connection goes back to the pool as
    /// soon as the call is handed over, and the next transaction's calls queue
    /// behind it on the thread instead of waiting for the answer to come back.
    async fn send_commit_sqlite(&mut self) -> Result<(), DbError> {
        let begin = self.take_begin();
        let queued = sqlite_statements(std::mem::take(&mut self.at_commit))?;
        let run_and_commit = move |conn: &mut rusqlite::Connection| {
            run_queued(conn, &queued)?;
            conn.execute_batch("COMMIT")
        };
        if let Some(begin) = begin {
            let Some(Conn::Sqlite(conn)) = self.conn.take() else {
                unreachable!("a SQLite transaction on a PostgreSQL connection")
            };
            return conn
                .call_then_release(move |conn| {
                    conn.execute_batch(begin)?;
                    let outcome = run_and_commit(conn);
                    if outcome.is_err()
                        && !conn.is_autocommit()
                        && let Err(err) = conn.execute_batch("ROLLBACK")
                    {
                        tracing::error!("failed to roll back a SQLite transaction that failed: {err}");
                    }
                    outcome
                })
                .await;
        }
        let Conn::Sqlite(conn) = self.conn() else {
            unreachable!("a SQLite transaction on a PostgreSQL connection")
        };
        sqlite_call(conn, None, false, run_and_commit).await
    }

    /// The commit succeeded: invalidations, then positions.
    fn committed(&mut self) {
        self.state = State::Finished;
        self.exception_callbacks.clear();
        self.run_invalidations();
        self.invalidations.clear();
        for callback in std::mem::take(&mut self.position_callbacks) {
            callback();
        }
    }

    fn run_invalidations(&self) {
        for invalidation in &self.invalidations {
            invalidation();
        }
    }

    /// The connection failed while COMMIT was in flight (PostgreSQL only): the
    /// transaction may have committed, may still be committing on the server, or
    /// may have rolled back. Invalidates at once, then reads the outcome back on
    /// another connection and finishes as that outcome says.
    async fn settle_commit_in_doubt(mut self, source: DbError) -> Result<(), StoreError> {
        let interaction = self.interaction;
        let pool = self.discard_connection();
        let Some(xid) = self.xid else {
            if self.wrote_without_xid {
                self.run_invalidations();
                return Err(self.outcome_unknown(
                    source,
                    "its statements went with the COMMIT and its ID never arrived".to_owned(),
                ));
            }
            // No statement gave the transaction an ID, so it wrote nothing:
            // committed or not, its reads stand and nothing is lost.
            tracing::debug!(interaction, error = %source, "COMMIT of a transaction that wrote nothing failed");
            self.committed();
            return Ok(());
        };
        // Invalidating too much is safe, too little is not: the write may be
        // visible to others already.
        self.run_invalidations();
        tracing::warn!(
            interaction,
            xid,
            "failed to hear back from COMMIT ({source}); reading its outcome back"
        );
        let outcome = match pool {
            Some(pool) => read_back_outcome(&pool, interaction, xid).await,
            None => Outcome::Unknown("the connection pool is gone"),
        };
        match outcome {
            Outcome::Committed => {
                tracing::info!(interaction, xid, "a COMMIT in doubt was read back as committed");
                // Again: a read made while the outcome was in doubt may have
                // cached what this write replaced.
                self.committed();
                Ok(())
            }
            Outcome::RolledBack => {
                tracing::info!(interaction, xid, "a COMMIT in doubt was read back as rolled back");
                self.run_exception_callbacks();
                Err(StoreError::Database { interaction, source })
            }
            Outcome::Unknown(reason) => {
                Err(self
                    .outcome_unknown(source, format!("transaction {xid} could not be read back ({reason})")))
            }
        }
    }

    /// How a COMMIT whose outcome cannot be known ends: neither positions nor
    /// releases, so the transaction's stream IDs stay unfinished and no
    /// position ever passes a write that may still land.
    fn outcome_unknown(&mut self, source: DbError, why: String) -> StoreError {
        self.invalidations.clear();
        self.position_callbacks.clear();
        self.exception_callbacks.clear();
        let what_happened = format!("{source}; {why}, so its stream IDs stay unfinished");
        StoreError::Database {
            interaction: self.interaction,
            source: DbError::commit_outcome_unknown(what_happened),
        }
    }

    /// Takes the connection out of the pool for good (it broke mid-COMMIT) and
    /// returns the pool, to read the outcome back on another of its connections.
    fn discard_connection(&mut self) -> Option<deadpool_postgres::Pool> {
        self.state = State::Finished;
        match self.conn.take()? {
            Conn::Postgres(object) => {
                let pool = deadpool_postgres::Object::pool(&object);
                drop(deadpool_postgres::Object::take(object));
                pool
            }
            Conn::Sqlite(mut conn) => {
                conn.rollback_in_background();
                None
            }
        }
    }

    /// Rolls back, then runs the `call_on_exception` callbacks.
    pub async fn rollback(mut self) {
        if self.state == State::Open && self.run_batch("ROLLBACK").await.is_err() {
            // The connection is in an unknown state; `fail_and_close` discards it.
            self.fail_and_close();
            return;
        }
        self.state = State::Finished;
        self.run_exception_callbacks();
    }

    fn run_exception_callbacks(&mut self) {
        self.invalidations.clear();
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
                Conn::Sqlite(mut conn) => conn.rollback_in_background(),
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
            // An autocommit interaction that was never finished failed part-way;
            // one whose BEGIN was never sent left its connection clean.
            State::Autocommit | State::BeginWithFirstStatement(_) => self.run_exception_callbacks(),
            State::Finished => {}
        }
    }
}

/// What reading a transaction's outcome back found.
enum Outcome {
    Committed,
    RolledBack,
    /// It cannot be found out, for the reason given.
    Unknown(&'static str),
}

/// Asks on connections of `pool` how transaction `xid` ended, until it has: a
/// transaction still committing (its server process alive, in a slow trigger or
/// waiting for a standby) is waited for, and an unreachable database is asked
/// again with growing pauses. Gives up only when the pool is closed (shutdown).
async fn read_back_outcome(pool: &deadpool_postgres::Pool, interaction: &'static str, xid: i64) -> Outcome {
    let mut pause = FIRST_READ_BACK_PAUSE;
    loop {
        match ask_outcome(pool, xid).await {
            Ok(Some(outcome)) => return outcome,
            Ok(None) => tracing::debug!(interaction, xid, "the transaction is still committing"),
            Err(err) if err.is_pool_closed() => return Outcome::Unknown("the connection pool was closed"),
            // "Transaction ID is in the future": a server that took over from
            // another (a failover, a restored backup) and never saw it.
            Err(err) if err.code() == Some("22023") => {
                return Outcome::Unknown("the server has never seen the transaction");
            }
            Err(err) => {
                tracing::warn!(
                    interaction,
                    xid,
                    "failed to read back the outcome of a COMMIT, retrying: {err}"
                );
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_READ_BACK_PAUSE);
    }
}

/// One reading of transaction `xid`'s outcome; `None` while it is in progress.
async fn ask_outcome(pool: &deadpool_postgres::Pool, xid: i64) -> Result<Option<Outcome>, DbError> {
    let client = pool.get().await.map_err(DbError::pool)?;
    let row = async {
        let statement = client.prepare_cached(OUTCOME_SQL).await?;
        client.query_one(&statement, &[&xid]).await
    }
    .await
    .map_err(DbError::postgres)?;
    let status: Option<String> = row.try_get(0).map_err(DbError::postgres)?;
    let visible: Option<bool> = row.try_get(1).map_err(DbError::postgres)?;
    Ok(match (status.as_deref(), visible) {
        (Some("committed"), Some(true)) => Some(Outcome::Committed),
        (Some("aborted"), _) => Some(Outcome::RolledBack),
        // Too old for the commit log: impossible for a transaction that was just
        // committing, unless the server was restored from a backup meanwhile.
        (None, _) => Some(Outcome::Unknown("the server no longer knows the transaction")),
        _ => None,
    })
}

/// Whether `sql` may change rows: on PostgreSQL, give the transaction an ID;
/// on SQLite, in autocommit, need the writer's connection. Only a
/// statement that starts with a keyword that cannot write is taken at its word;
/// a `SELECT` of a function that writes rows would be missed (`nextval` and
/// `setval` are not transactional and `set_config` writes no rows, so they do
/// not count).
fn may_write(sql: &str) -> bool {
    let sql = sql.trim_start();
    let keyword = &sql[..sql.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(sql.len())];
    !["SELECT", "VALUES", "SHOW", "TABLE"].iter().any(|read| keyword.eq_ignore_ascii_case(read))
}

/// Prepares the statement that learns the transaction's ID, when wanted; cached
/// per connection like every other statement.
async fn prepare_xid_statement(
    client: &deadpool_postgres::Object,
    learn_xid: Option<&str>,
) -> Result<Option<tokio_postgres::Statement>, tokio_postgres::Error> {
    match learn_xid {
        Some(sql) => client.prepare_cached(sql).await.map(Some),
        None => Ok(None),
    }
}

/// Runs `work` and, with `xid_statement`, asks for the transaction's ID right
/// behind it in the same round trip: tokio-postgres sends each request when its
/// future is first polled and `biased` polls `work` first, so the ID asked for
/// is the one `work` may just have assigned. If the question fails, so does the
/// statement: a transaction whose ID is unknown could not be read back.
async fn with_xid<T>(
    client: &tokio_postgres::Client,
    xid_statement: Option<&tokio_postgres::Statement>,
    work: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<(T, Option<i64>), tokio_postgres::Error> {
    let Some(xid_statement) = xid_statement else { return Ok((work.await?, None)) };
    let (done, xid_row) = tokio::join!(biased; work, client.query_one(xid_statement, &[]));
    let done = done?;
    Ok((done, xid_row?.try_get(0)?))
}

/// Runs `requests` to the end, polling every one still pending, in order, each
/// time: tokio-postgres sends a request when its future is first polled, so
/// they all go out in this order before any answer is awaited, in one round
/// trip. Answers come back in the same order.
async fn in_one_round_trip<T>(requests: Vec<BoxFuture<'_, T>>) -> Vec<T> {
    let mut pending: Vec<Option<BoxFuture<'_, T>>> = requests.into_iter().map(Some).collect();
    let mut answers: Vec<Option<T>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all_answered = true;
        for (request, answer) in pending.iter_mut().zip(&mut answers) {
            let Some(future) = request else { continue };
            match future.as_mut().poll(cx) {
                std::task::Poll::Ready(value) => {
                    *answer = Some(value);
                    *request = None;
                }
                std::task::Poll::Pending => all_answered = false,
            }
        }
        if all_answered { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
    })
    .await;
    answers.into_iter().map(|answer| answer.expect("every request was answered")).collect()
}

/// Runs `work` with `begin`, when given, sent just ahead of it in the same
/// round trip (tokio-postgres sends each request when its future is first
/// polled, and `biased` polls `begin` first). A failed `begin` fails the
/// whole, whatever `work` did.
async fn after_begin<T>(
    client: &tokio_postgres::Client,
    begin: Option<&str>,
    work: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, tokio_postgres::Error> {
    let Some(begin) = begin else { return work.await };
    let (begun, done) = tokio::join!(biased; client.batch_execute(begin), work);
    begun?;
    done
}

/// SQLite: runs `work` in one call on the connection's thread, behind the
/// transaction's `BEGIN` when that is still to be sent, or, for an
/// autocommit statement that may write, on the writer's connection.
async fn sqlite_call<T: Send + 'static>(
    conn: &mut SqliteConn,
    begin: Option<&'static str>,
    on_writer: bool,
    work: impl FnOnce(&mut rusqlite::Connection) -> Result<T, rusqlite::Error> + Send + 'static,
) -> Result<T, DbError> {
    let work = move |conn: &mut rusqlite::Connection| {
        if let Some(begin) = begin {
            conn.execute_batch(begin)?;
        }
        work(conn)
    };
    if on_writer { conn.call_writing(work).await } else { conn.call(work).await }
}

/// PostgreSQL: prepares the statements queued for the COMMIT (from the
/// connection's cache), before anything of the round trip they go in is sent.
async fn prepare_queued(
    client: &deadpool_postgres::Object,
    queued: &[AtCommit],
) -> Result<Vec<tokio_postgres::Statement>, tokio_postgres::Error> {
    let mut prepared = Vec::with_capacity(queued.len());
    for statement in queued {
        prepared.push(client.prepare_cached(&statement.sql).await?);
    }
    Ok(prepared)
}

/// PostgreSQL: runs `work` with the queued statements (`prepared`, with the
/// parameters of `queued`) sent just ahead of it, in the same round trip. A
/// queued statement's failure is the outcome: `work` then fails too, the
/// transaction being aborted.
async fn behind_queued<T>(
    client: &tokio_postgres::Client,
    prepared: &[tokio_postgres::Statement],
    queued: &[AtCommit],
    work: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, tokio_postgres::Error> {
    if prepared.is_empty() {
        return work.await;
    }
    let values: Vec<Vec<PgParam<'_>>> = queued
        .iter()
        .map(|statement| statement.params.iter().map(|value| PgParam(value.to_sql_value())).collect())
        .collect();
    let refs: Vec<_> = values.iter().map(|values| pg_refs(values)).collect();
    let requests: Vec<BoxFuture<'_, Result<u64, tokio_postgres::Error>>> = prepared
        .iter()
        .zip(&refs)
        .map(|(statement, params)| Box::pin(client.execute(statement, params)) as BoxFuture<'_, _>)
        .collect();
    let (answers, done) = tokio::join!(biased; in_one_round_trip(requests), work);
    for answer in answers {
        answer?;
    }
    done
}

/// SQLite: the statements queued for the COMMIT in SQLite's placeholders,
/// to run on the connection's thread.
fn sqlite_statements(queued: Vec<AtCommit>) -> Result<Vec<(String, Vec<Value>)>, DbError> {
    queued
        .into_iter()
        .map(|statement| match sql::to_sqlite(&statement.sql) {
            Ok(sql) => Ok((sql.into_owned(), statement.params)),
            Err(why) => Err(DbError::statement(format!("`{}`: {why}", statement.sql))),
        })
        .collect()
}

/// SQLite: runs the queued statements in order; the first failure stops them.
fn run_queued(conn: &rusqlite::Connection, queued: &[(String, Vec<Value>)]) -> Result<(), rusqlite::Error> {
    for (sql, params) in queued {
        sqlite::execute(conn, sql, params)?;
    }
    Ok(())
}

/// Copies the parameters, for a statement run on another thread.
fn owned(params: &[&dyn ToSqlValue]) -> Vec<Value> {
    params.iter().map(|param| Value::from(param.to_sql_value())).collect()
}

fn pg_params<'a>(params: &'a [&dyn ToSqlValue]) -> Vec<PgParam<'a>> {
    params.iter().map(|param| PgParam(param.to_sql_value())).collect()
}

fn pg_refs<'a>(params: &'a [PgParam<'a>]) -> Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)> {
    params.iter().map(|param| param as &(dyn tokio_postgres::types::ToSql + Sync)).collect()
}

#[cfg(test)]
mod tests {
    use super::may_write;

    #[test]
    fn only_statements_that_cannot_write_skip_learning_the_transaction_id() {
        for sql in [
            "SELECT 1",
            "  select v FROM kv",
            "VALUES (1)",
            "SHOW server_version",
            "TABLE kv",
            "SELECT nextval('s')",
        ] {
            assert!(!may_write(sql), "{sql}");
        }
        for sql in [
            "INSERT INTO kv VALUES ('a', 1)",
            "update kv SET v = 2",
            "DELETE FROM kv",
            "WITH gone AS (DELETE FROM kv RETURNING k) SELECT k FROM gone",
            "(SELECT 1)",
            "-- a comment\nSELECT 1",
            "SELECTED",
            "",
        ] {
            assert!(may_write(sql), "{sql}");
        }
    }
}
