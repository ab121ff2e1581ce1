//! The store pattern every store crate follows, shown on `stream_positions`.
//!
//! A read mixin (default methods over a required accessor) and a write mixin are
//! composed once into a master store and once into a worker store; the worker
//! reuses the read mixin unchanged and has no way to write. Both are built with
//! the one constructor shape, `Store::new(db, conn, ctx)`.

use std::collections::BTreeMap;
use std::future::Future;

use store_core::{
    Database, Engine, HasDatabase, Store, StoreContext, StoreError, StoreSettings, Transaction, build_store,
};
use store_test_support::{TestDb, TestResult, engine_tests};

/// Read mixin: everything here is written once, against `database()`.
trait StreamPositionsReader: HasDatabase {
    /// Every writer's persisted position on `stream_name`.
    fn get_stream_positions(
        &self,
        stream_name: &str,
    ) -> impl Future<Output = Result<BTreeMap<String, i64>, StoreError>> + Send {
        let db = self.database().clone();
        let stream_name = stream_name.to_owned();
        async move {
            db.run_autocommit("get_stream_positions", move |txn| {
                let stream_name = stream_name.clone();
                Box::pin(async move { read_positions(txn, &stream_name).await })
            })
            .await
        }
    }
}

async fn read_positions(
    txn: &mut Transaction,
    stream_name: &str,
) -> Result<BTreeMap<String, i64>, StoreError> {
    let rows = txn
        .query(
            "SELECT instance_name, stream_id FROM stream_positions WHERE stream_name = $1",
            &[&stream_name],
        )
        .await?;
    rows.iter().map(|row| Ok((row.get(0)?, row.get(1)?))).collect()
}

/// Write mixin: only stores of a stream's writers implement it.
trait StreamPositionsWriter: StreamPositionsReader {
    /// The instance whose position this store records.
    fn instance_name(&self) -> &str;

    /// Records this instance's position; never moves it backwards.
    fn update_stream_position(
        &self,
        stream_name: &str,
        stream_id: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let db = self.database().clone();
        let (stream_name, instance) = (stream_name.to_owned(), self.instance_name().to_owned());
        async move {
            // The one place the SQL differs: PostgreSQL's GREATEST is SQLite's MAX.
            let greatest = match db.engine() {
                Engine::Postgres => "GREATEST",
                Engine::Sqlite => "MAX",
            };
            let sql = format!(
                "INSERT INTO stream_positions (stream_name, instance_name, stream_id) VALUES ($1, $2, $3) \
                 ON CONFLICT (stream_name, instance_name) \
                 DO UPDATE SET stream_id = {greatest}(stream_positions.stream_id, EXCLUDED.stream_id)"
            );
            db.run_interaction("update_stream_position", move |txn| {
                let (sql, stream_name, instance) = (sql.clone(), stream_name.clone(), instance.clone());
                Box::pin(async move {
                    txn.execute(&sql, &[&stream_name, &instance, &stream_id]).await?;
                    Ok(())
                })
            })
            .await
        }
    }
}

/// What the master composes: both mixins.
struct MasterStore {
    db: Database,
    instance_name: String,
    positions_at_startup: BTreeMap<String, i64>,
}

/// What a worker composes: the read mixin only.
struct WorkerStore {
    db: Database,
    positions_at_startup: BTreeMap<String, i64>,
}

impl Store for MasterStore {
    async fn new(db: Database, conn: &mut Transaction, ctx: &StoreContext) -> Result<Self, StoreError> {
        let positions_at_startup = read_positions(conn, "events").await?;
        Ok(MasterStore { db, instance_name: ctx.instance_name().to_owned(), positions_at_startup })
    }
}

impl Store for WorkerStore {
    async fn new(db: Database, conn: &mut Transaction, _ctx: &StoreContext) -> Result<Self, StoreError> {
        let positions_at_startup = read_positions(conn, "events").await?;
        Ok(WorkerStore { db, positions_at_startup })
    }
}

impl HasDatabase for MasterStore {
    fn database(&self) -> &Database {
        &self.db
    }
}
impl StreamPositionsReader for MasterStore {}
impl StreamPositionsWriter for MasterStore {
    fn instance_name(&self) -> &str {
        &self.instance_name
    }
}

impl HasDatabase for WorkerStore {
    fn database(&self) -> &Database {
        &self.db
    }
}
impl StreamPositionsReader for WorkerStore {}

/// A handler written once for any store with the read mixin.
async fn events_position_of(
    store: &impl StreamPositionsReader,
    instance: &str,
) -> Result<Option<i64>, StoreError> {
    Ok(store.get_stream_positions("events").await?.get(instance).copied())
}

engine_tests!(master_and_worker_share_the_read_mixin);

async fn master_and_worker_share_the_read_mixin(test_db: TestDb) -> TestResult {
    let master_settings = StoreSettings::single_process();
    let master: MasterStore = build_store(&test_db.db, &master_settings).await?;
    assert!(master.positions_at_startup.is_empty());

    master.update_stream_position("events", 5).await?;
    master.update_stream_position("events", 3).await?;
    assert_eq!(events_position_of(&master, "master").await?, Some(5), "positions never move backwards");

    // The worker-side composition has its own pool (another process, in
    // production) and answers the same question through the same code. SQLite
    // serves one process only, so there the worker shares the database handle.
    let worker_db = match test_db.db.engine() {
        Engine::Postgres => test_db.reconnect().await?,
        Engine::Sqlite => test_db.db.clone(),
    };
    let worker_settings = match test_db.db.engine() {
        Engine::Postgres => StoreSettings::in_deployment("worker1"),
        Engine::Sqlite => master_settings.clone(),
    };
    let worker: WorkerStore = build_store(&worker_db, &worker_settings).await?;
    assert_eq!(worker.positions_at_startup.get("master"), Some(&5), "start-up reads go through `conn`");
    assert_eq!(events_position_of(&worker, "master").await?, Some(5));

    master.update_stream_position("events", 8).await?;
    assert_eq!(events_position_of(&worker, "master").await?, Some(8));
    Ok(())
}
