//! The compositions of the store crates (Synapse's "slaved stores" and its
//! `DataStore`): what one process builds, with the uniform constructor, from
//! the config.
//!
//! - [`WorkerStore`]: every store crate's read half plus its worker-side row
//!   application. Every process builds one; a process that writes nothing needs
//!   nothing else. It is the sink of the replication client: rows of each stream
//!   go to the reader of the crate that owns the stream.
//! - [`DataStore`]: a [`WorkerStore`] plus the [`Writers`] of exactly the
//!   streams this instance is configured to write (`[stream_writers]`), each
//!   built over the reader already there, so a stream has one generator per
//!   process.
//!
//! Both are generated from one list, the invocation of `compose!` below: adding a
//! store crate is one entry there (see `docs/ARCHITECTURE.md`). A store crate
//! that owns no stream (`store-users`) has no reader/writer split and no rows to
//! apply, so it is a hand-written field of [`WorkerStore`] instead.
//!
//! **Invariant:** a process holds a `*Writer` only for the streams the config
//! says it writes; the generators of every other stream refuse to allocate.

#![warn(missing_docs)]

mod topology;

use std::sync::Arc;

use store_account_data::{ACCOUNT_DATA_STREAM, AccountDataReader, AccountDataStream, AccountDataWriter};
use store_core::{
    CacheRegistry, CachesStream, CachesStreamAdapter, Database, HasDatabase, ServerConfig, Store, StoreError,
    Stream, StreamRegistry, Transaction,
};
use store_events::{BackfillStream, EVENTS_STREAM, EventsReader, EventsStream, EventsWriter};
use store_receipts::{RECEIPTS_STREAM, ReceiptsReader, ReceiptsStream, ReceiptsWriter};
use store_users::UsersStore;

pub use topology::check_stream_writers;

/// Generates [`WorkerStore`], [`Writers`] and [`WRITABLE_STREAMS`] from one
/// entry per store crate:
///
/// `field: Reader => Writer, writes STREAM_NAME, streams [Adapter, …];`
///
/// where `Reader::new(db, conn, &Arc<CachesStream>, config)` builds the read
/// half, `Writer::over(Arc<Reader>, config)` the write half, and each adapter
/// (a `store_core::Stream` over `Arc<Reader>`, which the store crate provides)
/// is one replication stream.
macro_rules! compose {
    ($(
        $(#[$doc:meta])*
        $field:ident: $reader:ty => $writer:ty, writes $stream:expr, streams [$($adapter:ident),+ $(,)?];
    )*) => {
        /// The streams `[stream_writers]` may name. `backfill` follows `events`;
        /// every process writes `caches`; `typing` has exactly one writer.
        pub const WRITABLE_STREAMS: &[&str] = &[$($stream,)* replication::typing::TYPING_STREAM];

        /// The read side of every store crate, as every process composes it.
        ///
        /// A handler that only reads takes `&WorkerStore`, and so serves the
        /// master, the writers and the followers alike.
        #[derive(Debug, Clone)]
        pub struct WorkerStore {
            db: Database,
            caches: Arc<CachesStream>,
            $($field: Arc<$reader>,)*
            // Not a stream, so not an entry of `compose!`: no writer, no rows.
            users: Arc<UsersStore>,
        }

        impl Store for WorkerStore {
            async fn new(db: Database, conn: &mut Transaction, config: &ServerConfig) -> Result<Self, StoreError> {
                // Before any generator loads (and in the same snapshot): a
                // generator deletes the recorded positions of writers its config
                // does not list, which a process with a conflicting config must
                // never do to the others.
                check_stream_writers(config).map_err(StoreError::Misconfigured)?;
                topology::agree_on_writers(conn, config).await?;
                let registry = CacheRegistry::new(config.caches.clone());
                let caches = Arc::new(CachesStream::new(db.clone(), conn, config, registry).await?);
                $(let $field = Arc::new(<$reader>::new(db.clone(), conn, &caches, config).await?);)*
                let users = Arc::new(UsersStore::new(db.clone(), conn, &caches, config).await?);
                Ok(WorkerStore { db, caches, $($field,)* users })
            }
        }

        impl WorkerStore {
            $(
                $(#[$doc])*
                pub fn $field(&self) -> &Arc<$reader> {
                    &self.$field
                }
            )*

            /// Accounts and access tokens. Every process reads and writes them
            /// directly; a revoked token reaches the others' caches through the
            /// `caches` stream.
            pub fn users(&self) -> &Arc<UsersStore> {
                &self.users
            }

            /// Every database-backed stream, for the replication client to apply
            /// what it receives: each stream's rows reach the crate that owns it.
            /// A stream missing here is logged once by the client and ignored.
            pub fn replication_streams(&self) -> StreamRegistry {
                let mut streams = StreamRegistry::new();
                streams.register(Arc::new(CachesStreamAdapter(Arc::clone(&self.caches))));
                $($(streams.register(Arc::new($adapter(Arc::clone(&self.$field))));)+)*
                streams
            }
        }

        /// The write halves of one process: `Some` for exactly the streams the
        /// config says it writes.
        #[derive(Debug)]
        pub struct Writers {
            $(
                $(#[$doc])*
                pub $field: Option<$writer>,
            )*
        }

        impl Writers {
            fn new(worker: &WorkerStore, config: &ServerConfig) -> Result<Writers, StoreError> {
                Ok(Writers {
                    $($field: if config.is_writer_for($stream) {
                        Some(<$writer>::over(Arc::clone(&worker.$field), config)?)
                    } else {
                        None
                    },)*
                })
            }

            /// The replication streams these writers write.
            fn streams(&self, worker: &WorkerStore) -> Vec<Arc<dyn Stream>> {
                let mut streams: Vec<Arc<dyn Stream>> = Vec::new();
                $(if self.$field.is_some() {
                    $(streams.push(Arc::new($adapter(Arc::clone(&worker.$field))));)+
                })*
                streams
            }
        }
    };
}

compose! {
    /// Events, room state and memberships.
    events: EventsReader => EventsWriter, writes EVENTS_STREAM, streams [EventsStream, BackfillStream];
    /// Read receipts.
    receipts: ReceiptsReader => ReceiptsWriter, writes RECEIPTS_STREAM, streams [ReceiptsStream];
    /// Per-user account data.
    account_data: AccountDataReader => AccountDataWriter, writes ACCOUNT_DATA_STREAM, streams [AccountDataStream];
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
}

/// A [`WorkerStore`] plus the write halves of the streams this instance writes.
#[derive(Debug)]
pub struct DataStore {
    worker: WorkerStore,
    writers: Writers,
}

impl Store for DataStore {
    async fn new(db: Database, conn: &mut Transaction, config: &ServerConfig) -> Result<Self, StoreError> {
        let worker = WorkerStore::new(db, conn, config).await?;
        let writers = Writers::new(&worker, config)?;
        Ok(DataStore { worker, writers })
    }
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

    /// The write side: `Some` for the streams this instance writes.
    pub fn writers(&self) -> &Writers {
        &self.writers
    }

    /// The streams this process writes, for the replication streamer to
    /// announce. `caches` is always among them: every process invalidates.
    pub fn written_streams(&self) -> Vec<Arc<dyn Stream>> {
        let mut streams: Vec<Arc<dyn Stream>> =
            vec![Arc::new(CachesStreamAdapter(Arc::clone(&self.worker.caches)))];
        streams.extend(self.writers.streams(&self.worker));
        streams
    }

    /// Records every written stream's final position: the last step of a clean
    /// shutdown, once no write is in flight.
    pub async fn flush_positions(&self) -> Result<(), StoreError> {
        for stream in self.written_streams() {
            if let Some(generator) = stream.generator() {
                generator.flush().await?;
            }
        }
        Ok(())
    }
}
