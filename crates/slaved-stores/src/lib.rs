//! The compositions of the store crates (Synapse's "slaved stores" and its
//! `DataStore`): what one process builds, with the uniform constructor, from
//! the config.
//!
//! - [`WorkerStore`]: every store crate's read half plus its worker-side row
//!   application. Every process builds one; a process that writes nothing needs
//!   nothing else. It is the sink of the replication client: rows of each stream
//!   go to the reader of the crate that owns the stream.
//! - [`DataStore`]: a [`WorkerStore`] plus the write halves of exactly the
//!   streams this instance is configured to write (`[stream_writers]`), each
//!   built over the reader already there, so a stream has one generator per
//!   process.
//!
//! Adding a store crate means one line in [`WorkerStore::new`] and
//! [`WorkerStore::replication_streams`], and one in [`DataStore::new`] and
//! [`DataStore::written_streams`] if the stream has writers; see
//! `docs/ARCHITECTURE.md`.
//!
//! **Invariant:** a process holds a `*Writer` only for the streams the config
//! says it writes; the generators of every other stream refuse to allocate.

#![warn(missing_docs)]

mod topology;

use std::sync::Arc;

use replication::{
    AccountDataStream, BackfillStream, CachesStreamAdapter, EventsStream, ReceiptsStream, Stream,
    StreamRegistry,
};
use store_account_data::{ACCOUNT_DATA_STREAM, AccountDataReader, AccountDataWriter};
use store_core::{
    CacheRegistry, CachesStream, Database, HasDatabase, MultiWriterIdGenerator, ServerConfig, Store,
    StoreError, Transaction,
};
use store_events::{EVENTS_STREAM, EventsReader, EventsWriter};
use store_receipts::{RECEIPTS_STREAM, ReceiptsReader, ReceiptsWriter};

pub use topology::{WRITABLE_STREAMS, check_stream_writers};

/// The read side of every store crate, as every process composes it.
///
/// A handler that only reads takes `&WorkerStore`, and so serves the master,
/// the writers and the followers alike.
#[derive(Debug, Clone)]
pub struct WorkerStore {
    db: Database,
    caches: Arc<CachesStream>,
    events: Arc<EventsReader>,
    receipts: Arc<ReceiptsReader>,
    account_data: Arc<AccountDataReader>,
}

impl Store for WorkerStore {
    async fn new(db: Database, conn: &mut Transaction, config: &ServerConfig) -> Result<Self, StoreError> {
        // Before any generator loads: a generator deletes the recorded positions
        // of writers its config does not list, which a process with a
        // conflicting config must never do to the others.
        check_stream_writers(config).map_err(StoreError::Misconfigured)?;
        topology::agree_on_writers(conn, config).await?;
        let registry = CacheRegistry::new(config.caches.clone());
        let caches = Arc::new(CachesStream::new(db.clone(), conn, config, registry).await?);
        let events = Arc::new(EventsReader::new(db.clone(), conn, Arc::clone(&caches), config).await?);
        let receipts = Arc::new(ReceiptsReader::new(db.clone(), conn, &caches, config).await?);
        let account_data = Arc::new(AccountDataReader::new(db.clone(), conn, &caches, config).await?);
        Ok(WorkerStore { db, caches, events, receipts, account_data })
    }
}

impl HasDatabase for WorkerStore {
    fn database(&self) -> &Database {
        &self.db
    }
}

impl WorkerStore {
    /// The cache invalidations of this process and the cache registry.
    pub fn caches(&self) -> &Arc<CachesStream> {
        &self.caches
    }

    /// Events, room state and memberships.
    pub fn events(&self) -> &Arc<EventsReader> {
        &self.events
    }

    /// Read receipts.
    pub fn receipts(&self) -> &Arc<ReceiptsReader> {
        &self.receipts
    }

    /// Per-user account data.
    pub fn account_data(&self) -> &Arc<AccountDataReader> {
        &self.account_data
    }

    /// Every database-backed stream, for the replication client to apply what
    /// it receives: each stream's rows reach the crate that owns it. A stream
    /// missing here is logged once by the client and ignored.
    pub fn replication_streams(&self) -> StreamRegistry {
        let mut streams = StreamRegistry::new();
        streams.register(Arc::new(CachesStreamAdapter(Arc::clone(&self.caches))));
        streams.register(Arc::new(EventsStream(Arc::clone(&self.events))));
        streams.register(Arc::new(BackfillStream(Arc::clone(&self.events))));
        streams.register(Arc::new(ReceiptsStream(Arc::clone(&self.receipts))));
        streams.register(Arc::new(AccountDataStream(Arc::clone(&self.account_data))));
        streams
    }

    /// Every multi-writer generator by stream name, for reporting positions
    /// and waking the replication streamer.
    pub fn generators(&self) -> Vec<(&'static str, &MultiWriterIdGenerator)> {
        let mut generators = vec![
            (EVENTS_STREAM, self.events.events_stream()),
            (store_events::BACKFILL_STREAM, self.events.backfill_stream()),
            (RECEIPTS_STREAM, self.receipts.stream()),
            (ACCOUNT_DATA_STREAM, self.account_data.stream()),
        ];
        if let Some(caches) = self.caches.generator() {
            generators.push((CachesStream::STREAM_NAME, caches));
        }
        generators
    }
}

/// A [`WorkerStore`] plus the write halves of the streams this instance writes.
#[derive(Debug)]
pub struct DataStore {
    worker: WorkerStore,
    events: Option<EventsWriter>,
    receipts: Option<ReceiptsWriter>,
    account_data: Option<AccountDataWriter>,
}

impl Store for DataStore {
    async fn new(db: Database, conn: &mut Transaction, config: &ServerConfig) -> Result<Self, StoreError> {
        let worker = WorkerStore::new(db, conn, config).await?;
        let events =
            writer_if(config, EVENTS_STREAM, || EventsWriter::over(Arc::clone(&worker.events), config))?;
        let receipts = writer_if(config, RECEIPTS_STREAM, || {
            ReceiptsWriter::over(Arc::clone(&worker.receipts), config)
        })?;
        let account_data = writer_if(config, ACCOUNT_DATA_STREAM, || {
            AccountDataWriter::over(Arc::clone(&worker.account_data), config)
        })?;
        Ok(DataStore { worker, events, receipts, account_data })
    }
}

fn writer_if<W>(
    config: &ServerConfig,
    stream: &str,
    build: impl FnOnce() -> Result<W, StoreError>,
) -> Result<Option<W>, StoreError> {
    if config.is_writer_for(stream) { build().map(Some) } else { Ok(None) }
}

impl HasDatabase for DataStore {
    fn database(&self) -> &Database {
        &self.worker.db
    }
}

impl std::ops::Deref for DataStore {
    type Target = WorkerStore;

    /// Everything a process reads, whatever it writes.
    fn deref(&self) -> &WorkerStore {
        &self.worker
    }
}

impl DataStore {
    /// The read side.
    pub fn worker(&self) -> &WorkerStore {
        &self.worker
    }

    /// Writes events, if this instance is one of their writers.
    pub fn events_writer(&self) -> Option<&EventsWriter> {
        self.events.as_ref()
    }

    /// Writes receipts, if this instance is one of their writers.
    pub fn receipts_writer(&self) -> Option<&ReceiptsWriter> {
        self.receipts.as_ref()
    }

    /// Writes account data, if this instance is one of its writers.
    pub fn account_data_writer(&self) -> Option<&AccountDataWriter> {
        self.account_data.as_ref()
    }

    /// The streams this process writes, for the replication streamer to
    /// announce. `caches` is always among them: every process invalidates.
    pub fn written_streams(&self) -> Vec<Arc<dyn Stream>> {
        let worker = &self.worker;
        let mut streams: Vec<Arc<dyn Stream>> =
            vec![Arc::new(CachesStreamAdapter(Arc::clone(&worker.caches)))];
        if self.events.is_some() {
            streams.push(Arc::new(EventsStream(Arc::clone(&worker.events))));
            streams.push(Arc::new(BackfillStream(Arc::clone(&worker.events))));
        }
        if self.receipts.is_some() {
            streams.push(Arc::new(ReceiptsStream(Arc::clone(&worker.receipts))));
        }
        if self.account_data.is_some() {
            streams.push(Arc::new(AccountDataStream(Arc::clone(&worker.account_data))));
        }
        streams
    }

    /// Records every written stream's final position: the last step of a clean
    /// shutdown, once no write is in flight.
    pub async fn flush_positions(&self) -> Result<(), StoreError> {
        for (_, generator) in self.worker.generators() {
            generator.flush().await?;
        }
        Ok(())
    }
}
