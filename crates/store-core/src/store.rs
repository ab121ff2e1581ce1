//! The uniform store constructor, the context every store half is built with,
//! and the accessor every mixin builds on.
//!
//! Every store (one half of one domain, or a composition of halves) is built
//! the same way: `Store::new(db, conn, ctx)`. `conn` is the start-up transaction
//! that all constructors share, so they read one consistent snapshot; the
//! composition root commits it once every store is built. `ctx` is the
//! [`StoreContext`]: the settings taken from the config, and the process's one
//! cache registry and invalidation stream. Because the shape never varies, a
//! composition can build any set of halves without knowing what each needs.
//!
//! Mixins are traits: a *read* trait has default methods written against a
//! required accessor ([`HasDatabase::database`], or a component accessor), and a
//! *write* trait adds the writing methods for the processes that write a stream.
//! A master store and a worker store implement the same read traits; only the
//! stream's writers implement the write trait. See `docs/ARCHITECTURE.md`.

use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};

use crate::writers::{DeploymentWriters, WriterSet};
use crate::{
    BoxFuture, CacheRegistry, CachesStream, CachesStreamAdapter, Database, Migrations, MultiWriterConfig,
    StoreError, StoreSettings, Stream, StreamRegistry, StreamSpec, StreamTable, Transaction, WriterRule,
    agree_on_writers, check_stream_writers,
};

/// What every store half is built with besides the database and the start-up
/// transaction: the settings from the config, the process's shared cache
/// registry and invalidation stream, and the halves built so far. Cheap to
/// clone; clones share everything.
///
/// A half that needs another (a stream's write half needs its read half, whose
/// generator it allocates from) asks the context for it with
/// [`StoreContext::component`]: each half is built once per process, whoever
/// asks first, as each of Synapse's mixins is initialised once.
#[derive(Clone)]
pub struct StoreContext {
    settings: Arc<StoreSettings>,
    writers: Arc<DeploymentWriters>,
    caches: Arc<CachesStream>,
    components: Arc<Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>>,
}

impl fmt::Debug for StoreContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreContext")
            .field("instance", &self.settings.instance_name)
            .field("components", &self.lock_components().len())
            .finish_non_exhaustive()
    }
}

impl StoreContext {
    /// Builds the process's cache registry and invalidation stream (loading the
    /// stream's positions on `conn`), the parts every store half shares, and
    /// reads the deployment's writers ([`crate::writers`]): where recorded, they
    /// replace the settings' lists.
    pub async fn new(
        db: &Database,
        conn: &mut Transaction,
        settings: StoreSettings,
    ) -> Result<StoreContext, StoreError> {
        let sets = crate::writers::load_writer_sets(conn).await?;
        StoreContext::with_writer_sets(db, conn, settings, sets).await
    }

    /// [`StoreContext::new`] with the deployment's writers already read
    /// (`build_store` has them from adopting them).
    async fn with_writer_sets(
        db: &Database,
        conn: &mut Transaction,
        mut settings: StoreSettings,
        sets: BTreeMap<String, WriterSet>,
    ) -> Result<StoreContext, StoreError> {
        for (stream, set) in &sets {
            settings.stream_writers.insert(stream.clone(), set.writers());
        }
        let unrecorded = settings
            .stream_writers
            .iter()
            .filter(|(stream, _)| !sets.contains_key(*stream))
            .map(|(stream, writers)| (stream.clone(), writers.clone()))
            .collect();
        let writers =
            Arc::new(DeploymentWriters::new(&settings.instance_name, sets.into_values(), unrecorded));
        let registry = CacheRegistry::new(settings.caches.clone());
        let caches = Arc::new(CachesStream::new(db.clone(), conn, &settings, registry).await?);
        Ok(StoreContext { settings: Arc::new(settings), writers, caches, components: Arc::default() })
    }

    /// The deployment's writers of every configurable stream, by epoch, as
    /// this process applied them.
    pub fn deployment_writers(&self) -> &Arc<DeploymentWriters> {
        &self.writers
    }

    /// The one `T` of this process, built with `new(db, conn, self)` the first
    /// time any half asks for it and shared from then on.
    ///
    /// ```ignore
    /// // A write half over the read half the composition also holds:
    /// let reader: Arc<ReceiptsReader> = ctx.component(&db, conn).await?;
    /// ```
    pub async fn component<T: Store + 'static>(
        &self,
        db: &Database,
        conn: &mut Transaction,
    ) -> Result<Arc<T>, StoreError> {
        if let Some(built) = self.built::<T>() {
            return Ok(built);
        }
        // Built outside the lock: the constructor may ask for components of
        // its own. `conn` is exclusive, so no one else builds meanwhile.
        let built = Arc::new(T::new(db.clone(), conn, self).await?);
        let mut components = self.lock_components();
        let shared =
            components.entry(TypeId::of::<T>()).or_insert_with(|| built as Arc<dyn Any + Send + Sync>);
        Arc::clone(shared).downcast::<T>().map_err(|_| {
            StoreError::Misconfigured("a store component is registered under another type".to_owned())
        })
    }

    /// The write half `W` of `stream` when this instance writes it, `None`
    /// otherwise: what a composition holds for each stream it may write.
    pub async fn writer<W: Store>(
        &self,
        db: &Database,
        conn: &mut Transaction,
        stream: StreamSpec,
    ) -> Result<Option<W>, StoreError> {
        if !self.may_write(stream) {
            return Ok(None);
        }
        W::new(db.clone(), conn, self).await.map(Some)
    }

    fn built<T: Send + Sync + 'static>(&self) -> Option<Arc<T>> {
        let component = self.lock_components().get(&TypeId::of::<T>()).cloned()?;
        component.downcast::<T>().ok()
    }

    fn lock_components(&self) -> std::sync::MutexGuard<'_, HashMap<TypeId, Arc<dyn Any + Send + Sync>>> {
        self.components.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What the config says about this process and its deployment.
    pub fn settings(&self) -> &StoreSettings {
        &self.settings
    }

    /// This process's name.
    pub fn instance_name(&self) -> &str {
        &self.settings.instance_name
    }

    /// The invalidations of this process, and through them the cache registry.
    pub fn caches(&self) -> &Arc<CachesStream> {
        &self.caches
    }

    /// Every cache of this process, by name.
    pub fn registry(&self) -> &Arc<CacheRegistry> {
        self.caches.registry()
    }

    /// The generator settings of `stream`: this instance, and the writers the
    /// stream's rule gives it (those of another stream, for one that follows).
    pub fn generator_config(
        &self,
        stream: StreamSpec,
        tables: Vec<StreamTable>,
        sequence_name: &str,
    ) -> MultiWriterConfig {
        let retired = match stream.writers {
            WriterRule::Configured | WriterRule::Single => {
                self.writers.current(stream.name).map(|set| set.taken_out()).unwrap_or_default()
            }
            _ => Default::default(),
        };
        MultiWriterConfig {
            writers: stream.writers(&self.settings),
            retired,
            ..MultiWriterConfig::for_stream(&self.settings, stream.name, tables, sequence_name)
        }
    }

    /// Whether this instance writes `stream` (in the epoch of its writers
    /// this process started with).
    pub fn is_writer(&self, stream: StreamSpec) -> bool {
        stream.writers(&self.settings).contains(&self.settings.instance_name)
    }

    /// Whether this instance writes `stream` or may become one of its writers
    /// while it runs (an elastic stream of a deployment of several
    /// processes): whether it builds the stream's write half.
    pub fn may_write(&self, stream: StreamSpec) -> bool {
        self.is_writer(stream) || (stream.elastic && self.settings.has_other_processes)
    }

    /// Refuses, with [`StoreError::NotAWriter`], to build a write half of
    /// `stream` on an instance that may not write it.
    pub fn require_writer(&self, stream: StreamSpec) -> Result<(), StoreError> {
        if self.may_write(stream) {
            return Ok(());
        }
        Err(StoreError::NotAWriter {
            stream: stream.name.to_owned(),
            instance: self.settings.instance_name.clone(),
        })
    }
}

/// A store built with the one constructor shape every store shares.
pub trait Store: Sized + Send + Sync {
    /// The schema of every store crate this store reads or writes, applied by
    /// [`build_store`] before anything is built. `store-core`'s own tables are
    /// always there ([`Database::connect`] applies them).
    fn migrations() -> Vec<&'static Migrations> {
        Vec::new()
    }

    /// Every stream this store runs (its crates' and any the process keeps in
    /// memory, such as typing), known before anything is built: [`build_store`]
    /// checks the settings' writers against them and agrees on them with the
    /// deployment before any generator loads.
    fn stream_specs() -> Vec<StreamSpec> {
        Vec::new()
    }

    /// Builds the store: keeps `db` for later queries, does its start-up reads
    /// (current stream positions, say) on `conn`, and takes its settings, cache
    /// registry and invalidation stream from `ctx`.
    ///
    /// `conn` is never stored: the composition root commits it after building
    /// every store.
    fn new(
        db: Database,
        conn: &mut Transaction,
        ctx: &StoreContext,
    ) -> impl Future<Output = Result<Self, StoreError>> + Send;
}

/// The context itself, so that a test or a small tool can take it out of
/// [`build_store`] beside the halves it builds: `build_store::<(StoreContext,
/// SomeReader)>`.
impl Store for StoreContext {
    async fn new(_db: Database, _conn: &mut Transaction, ctx: &StoreContext) -> Result<Self, StoreError> {
        Ok(ctx.clone())
    }
}

/// Several stores built on one start-up transaction and context, in order.
/// Each part is built with its own `new`; a half that shares another (a
/// writer its reader) takes it from [`StoreContext::component`], so list the
/// writer rather than both.
macro_rules! tuple_store {
    ($($part:ident),+) => {
        impl<$($part: Store),+> Store for ($($part,)+) {
            fn migrations() -> Vec<&'static Migrations> {
                let mut migrations = Vec::new();
                $(migrations.extend($part::migrations());)+
                migrations
            }
            fn stream_specs() -> Vec<StreamSpec> {
                let mut streams = Vec::new();
                $(streams.extend($part::stream_specs());)+
                streams
            }
            async fn new(db: Database, conn: &mut Transaction, ctx: &StoreContext) -> Result<Self, StoreError> {
                Ok(($($part::new(db.clone(), conn, ctx).await?,)+))
            }
        }
    };
}

tuple_store!(A, B);
tuple_store!(A, B, C);
tuple_store!(A, B, C, D);

/// The accessor the read mixins' default methods are written against.
pub trait HasDatabase: Send + Sync {
    /// The database this store queries.
    fn database(&self) -> &Database;
}

/// Applies `S`'s migrations, then builds a store of type `S` on a fresh start-up
/// transaction and commits it.
///
/// This is the composition root's one call per process: `S` is the master's or a
/// worker's top-level store, whose constructor builds its halves on the same
/// `conn` with the same [`StoreContext`]. Like any interaction it is retried on
/// a serialization failure (two processes recording their positions at once),
/// building everything afresh.
pub async fn build_store<S: Store>(db: &Database, settings: &StoreSettings) -> Result<S, StoreError> {
    let streams = S::stream_specs();
    check_stream_writers(settings, &streams).map_err(StoreError::Misconfigured)?;
    db.migrate(&S::migrations()).await?;
    db.run_interaction("build_stores", move |conn| {
        let (db, settings, streams) = (db.clone(), settings.clone(), streams.clone());
        Box::pin(async move {
            // First in the snapshot, before any generator loads: a generator
            // deletes the recorded positions of writers its settings do not
            // list, which a process at odds with the deployment must never do.
            let sets = agree_on_writers(conn, &settings, &streams).await?;
            let ctx = StoreContext::with_writer_sets(&db, conn, settings, sets).await?;
            S::new(db, conn, &ctx).await
        })
    })
    .await
}

/// What a process runs on its top-level store: the streams it follows and
/// writes. A composition (an ordinary struct holding the halves of its store
/// crates) implements it by listing the streams of its crates; the rest
/// follows.
pub trait Composition: HasDatabase + fmt::Debug + 'static {
    /// The context the composition was built with.
    fn context(&self) -> &StoreContext;

    /// The database-backed streams of its store crates, each over the half
    /// that owns it (`caches` comes with the context and is not listed).
    fn streams(&self) -> Vec<Arc<dyn Stream>>;

    /// Every stream this process follows: `caches`, then [`Composition::streams`].
    /// Replication applies each stream's rows through it, so they reach the
    /// crate that owns the stream.
    fn replication_streams(&self) -> StreamRegistry {
        let mut registry = StreamRegistry::new();
        for stream in all_streams(self) {
            registry.register(stream);
        }
        registry
    }

    /// The streams this process writes or may write, for the streamer to
    /// announce: `caches` always, each stream whose writers include this
    /// instance, and the elastic ones it may join (the streamer announces
    /// those only while [`Stream::is_writer`] says it writes them).
    fn written_streams(&self) -> Vec<Arc<dyn Stream>> {
        let ctx = self.context();
        all_streams(self)
            .into_iter()
            .filter(|stream| {
                let spec = stream.spec();
                spec.writers == WriterRule::EveryProcess || ctx.may_write(spec)
            })
            .collect()
    }

    /// Records every written stream's final position: the last step of a clean
    /// shutdown, once no write is in flight.
    fn flush_positions(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            for stream in self.written_streams() {
                if let Some(generator) = stream.generator() {
                    generator.flush().await?;
                }
            }
            Ok(())
        })
    }
}

/// `caches` followed by the composition's own streams.
fn all_streams<C: Composition + ?Sized>(composition: &C) -> Vec<Arc<dyn Stream>> {
    let caches: Arc<dyn Stream> = Arc::new(CachesStreamAdapter(Arc::clone(composition.context().caches())));
    std::iter::once(caches).chain(composition.streams()).collect()
}
