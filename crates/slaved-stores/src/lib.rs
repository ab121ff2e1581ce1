//! The reference compositions of the store crates (Synapse's "slaved stores"
//! and its `DataStore`): what one process of the reference server builds with
//! `build_store`. They are ordinary structs, written by hand through the public
//! API only: a crate outside this workspace composes its own the same way (see
//! `docs/extending.md`).
//!
//! - [`WorkerStore`]: every store crate's read half. A process that writes
//!   nothing needs nothing else; it implements every read mixin, so a handler
//!   written against those serves it like the master.
//! - [`DataStore`]: the read halves plus the write half of exactly the streams
//!   this instance is configured to write (`[stream_writers]`), each over the
//!   one read half of its stream the context holds, so a stream has one
//!   generator per process.
//!
//! **Invariant:** a process holds a `*Writer` only for the streams its settings
//! say it writes; the generators of every other stream refuse to allocate.

#![warn(missing_docs)]

use std::sync::Arc;

use store_account_data::{
    ACCOUNT_DATA, AccountDataReader, AccountDataStore, AccountDataStream, AccountDataWriteStore,
    AccountDataWriter,
};
use store_core::{
    Composition, Database, HasDatabase, Migrations, Store, StoreContext, StoreError, Stream, StreamSpec,
    Transaction,
};
use store_events::{
    BACKFILL, BackfillStream, EVENTS, EventsReader, EventsStore, EventsStream, EventsWriteStore, EventsWriter,
};
use store_receipts::{
    RECEIPTS, ReceiptsReader, ReceiptsStore, ReceiptsStream, ReceiptsWriteStore, ReceiptsWriter,
};
use store_users::{HasUsers, UsersStore};

/// The read side of every store crate, as every process composes it.
#[derive(Debug, Clone)]
pub struct WorkerStore {
    db: Database,
    ctx: StoreContext,
    events: Arc<EventsReader>,
    receipts: Arc<ReceiptsReader>,
    account_data: Arc<AccountDataReader>,
    users: Arc<UsersStore>,
}

impl Store for WorkerStore {
    fn migrations() -> Vec<&'static Migrations> {
        vec![
            &store_events::MIGRATIONS,
            &store_receipts::MIGRATIONS,
            &store_account_data::MIGRATIONS,
            &store_users::MIGRATIONS,
        ]
    }

    fn stream_specs() -> Vec<StreamSpec> {
        // Typing lives in the binaries' memory, not in a store, but its writer
        // is configured and agreed on like the others'.
        vec![EVENTS, BACKFILL, RECEIPTS, ACCOUNT_DATA, replication::typing::TYPING]
    }

    async fn new(db: Database, conn: &mut Transaction, ctx: &StoreContext) -> Result<Self, StoreError> {
        Ok(WorkerStore {
            events: ctx.component(&db, conn).await?,
            receipts: ctx.component(&db, conn).await?,
            account_data: ctx.component(&db, conn).await?,
            users: ctx.component(&db, conn).await?,
            ctx: ctx.clone(),
            db,
        })
    }
}

impl HasDatabase for WorkerStore {
    fn database(&self) -> &Database {
        &self.db
    }
}

impl Composition for WorkerStore {
    fn context(&self) -> &StoreContext {
        &self.ctx
    }

    fn streams(&self) -> Vec<Arc<dyn Stream>> {
        vec![
            Arc::new(EventsStream(Arc::clone(&self.events))),
            Arc::new(BackfillStream(Arc::clone(&self.events))),
            Arc::new(ReceiptsStream(Arc::clone(&self.receipts))),
            Arc::new(AccountDataStream(Arc::clone(&self.account_data))),
        ]
    }
}

impl EventsStore for WorkerStore {
    fn events(&self) -> &Arc<EventsReader> {
        &self.events
    }
}

impl ReceiptsStore for WorkerStore {
    fn receipts(&self) -> &Arc<ReceiptsReader> {
        &self.receipts
    }
}

impl AccountDataStore for WorkerStore {
    fn account_data(&self) -> &Arc<AccountDataReader> {
        &self.account_data
    }
}

impl HasUsers for WorkerStore {
    fn users(&self) -> &Arc<UsersStore> {
        &self.users
    }
}

/// The read halves plus the write halves of the streams this instance writes.
#[derive(Debug)]
pub struct DataStore {
    read: WorkerStore,
    events: Option<EventsWriter>,
    receipts: Option<ReceiptsWriter>,
    account_data: Option<AccountDataWriter>,
}

impl Store for DataStore {
    fn migrations() -> Vec<&'static Migrations> {
        WorkerStore::migrations()
    }

    fn stream_specs() -> Vec<StreamSpec> {
        WorkerStore::stream_specs()
    }

    async fn new(db: Database, conn: &mut Transaction, ctx: &StoreContext) -> Result<Self, StoreError> {
        Ok(DataStore {
            events: ctx.writer(&db, conn, EVENTS).await?,
            receipts: ctx.writer(&db, conn, RECEIPTS).await?,
            account_data: ctx.writer(&db, conn, ACCOUNT_DATA).await?,
            read: WorkerStore::new(db, conn, ctx).await?,
        })
    }
}

impl DataStore {
    /// The read side, as a worker that writes nothing has it.
    pub fn worker(&self) -> &WorkerStore {
        &self.read
    }
}

impl HasDatabase for DataStore {
    fn database(&self) -> &Database {
        &self.read.db
    }
}

impl Composition for DataStore {
    fn context(&self) -> &StoreContext {
        &self.read.ctx
    }

    fn streams(&self) -> Vec<Arc<dyn Stream>> {
        self.read.streams()
    }
}

impl EventsStore for DataStore {
    fn events(&self) -> &Arc<EventsReader> {
        &self.read.events
    }
}

impl EventsWriteStore for DataStore {
    fn events_writer(&self) -> Option<&EventsWriter> {
        self.events.as_ref()
    }
}

impl ReceiptsStore for DataStore {
    fn receipts(&self) -> &Arc<ReceiptsReader> {
        &self.read.receipts
    }
}

impl ReceiptsWriteStore for DataStore {
    fn receipts_writer(&self) -> Option<&ReceiptsWriter> {
        self.receipts.as_ref()
    }
}

impl AccountDataStore for DataStore {
    fn account_data(&self) -> &Arc<AccountDataReader> {
        &self.read.account_data
    }
}

impl AccountDataWriteStore for DataStore {
    fn account_data_writer(&self) -> Option<&AccountDataWriter> {
        self.account_data.as_ref()
    }
}

impl HasUsers for DataStore {
    fn users(&self) -> &Arc<UsersStore> {
        &self.read.users
    }
}

/// The mixin traits of the reference compositions, for handlers to call their
/// accessors: `use slaved_stores::prelude::*;`.
pub mod prelude {
    pub use store_account_data::{AccountDataStore, AccountDataWriteStore};
    pub use store_core::{Composition, HasDatabase};
    pub use store_events::{EventsStore, EventsWriteStore};
    pub use store_receipts::{ReceiptsStore, ReceiptsWriteStore};
    pub use store_users::HasUsers;
}
