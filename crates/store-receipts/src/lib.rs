//! The `receipts` stream: read receipts, one current receipt per room, receipt
//! type, user and thread.
//!
//! - [`ReceiptsReader`], used by every process: cached reads, the receipts of
//!   rooms changed since a token, the replication catch-up query, and the worker
//!   side of the stream ([`ReceiptsReader::process_receipts_rows`]).
//! - [`ReceiptsWriter`], built only on the stream's writers.
//! - [`ReceiptRow`]: the stream's row in its wire form.
//!
//! This crate depends on `store-core` only, never on another domain crate.

#![warn(missing_docs)]

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use store_core::{
    Cache, CacheRegistry, CacheWeight, Database, DeploymentWriters, GroupCommit, GroupCommitStats,
    MultiWriterIdGenerator, MultiWriterToken, Row, StoreContext, StoreError, StreamChangeCache, StreamSpec,
    StreamTable, StreamUpdates, Transaction, WriterRule,
};

/// The name of the stream this crate owns, as it appears in `[stream_writers]`,
/// in `stream_positions` and on the wire.
pub const RECEIPTS_STREAM: &str = "receipts";

/// The `receipts` stream: written by its configured writers.
pub const RECEIPTS: StreamSpec = StreamSpec::new(RECEIPTS_STREAM, WriterRule::Configured).elastic();

/// A cache key: (room, receipt type).
type RoomAndType = (String, String);

/// A receipt, as stored and as it travels on the stream: on the wire
/// `[room_id, receipt_type, user_id, event_id, thread_id, data]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "ReceiptTuple", into = "ReceiptTuple")]
pub struct ReceiptRow {
    /// The room.
    pub room_id: String,
    /// `m.read`, `m.read.private`, …
    pub receipt_type: String,
    /// Whose receipt.
    pub user_id: String,
    /// The event read up to.
    pub event_id: String,
    /// The thread, for threaded receipts.
    pub thread_id: Option<String>,
    /// The receipt's data (e.g. `{"ts": …}`).
    pub data: serde_json::Value,
}

type ReceiptTuple = (String, String, String, String, Option<String>, serde_json::Value);

impl From<ReceiptTuple> for ReceiptRow {
    fn from((room_id, receipt_type, user_id, event_id, thread_id, data): ReceiptTuple) -> Self {
        ReceiptRow { room_id, receipt_type, user_id, event_id, thread_id, data }
    }
}

impl From<ReceiptRow> for ReceiptTuple {
    fn from(row: ReceiptRow) -> Self {
        (row.room_id, row.receipt_type, row.user_id, row.event_id, row.thread_id, row.data)
    }
}

impl CacheWeight for ReceiptRow {
    fn weight(&self) -> usize {
        // Destructured so that a new field cannot be left out of the weight.
        let ReceiptRow { room_id, receipt_type, user_id, event_id, thread_id, data } = self;
        room_id.weight()
            + receipt_type.weight()
            + user_id.weight()
            + event_id.weight()
            + thread_id.weight()
            + data.weight()
    }
}

/// Receipts as every process reads them.
///
/// Two caches sit in front of the hot reads: the receipts of a room (per
/// receipt type) and a user's last receipt in a room; a change cache per room
/// lets "receipts since token T" skip rooms without new receipts.
#[derive(Debug)]
pub struct ReceiptsReader {
    db: Database,
    ids: MultiWriterIdGenerator,
    registry: Arc<CacheRegistry>,
    room_receipts: Arc<Cache<RoomAndType, Arc<Vec<ReceiptRow>>>>,
    last_receipt: Arc<Cache<(String, String, String), Option<String>>>,
    room_changes: Arc<StreamChangeCache>,
}

const SELECT_RECEIPT: &str =
    "SELECT stream_id, room_id, receipt_type, user_id, event_id, thread_id, data FROM receipts_linearized";

fn receipt_from_row(row: &Row) -> Result<(i64, ReceiptRow), StoreError> {
    let data: String = row.get(6)?;
    let data = serde_json::from_str(&data)
        .map_err(|err| StoreError::Decode { column: "data".to_owned(), message: err.to_string() })?;
    let receipt = ReceiptRow {
        room_id: row.get(1)?,
        receipt_type: row.get(2)?,
        user_id: row.get(3)?,
        event_id: row.get(4)?,
        thread_id: row.get(5)?,
        data,
    };
    Ok((row.get(0)?, receipt))
}

impl ReceiptsReader {
    /// The stream's positions, as this process knows them.
    pub fn stream(&self) -> &MultiWriterIdGenerator {
        &self.ids
    }

    /// Which rooms had receipts after a position.
    pub fn room_changes(&self) -> &StreamChangeCache {
        &self.room_changes
    }

    /// The current receipts of type `receipt_type` in `room_id` (cached).
    pub async fn get_receipts_for_room(
        &self,
        room_id: &str,
        receipt_type: &str,
    ) -> Result<Arc<Vec<ReceiptRow>>, StoreError> {
        let key = (room_id.to_owned(), receipt_type.to_owned());
        let db = self.db.clone();
        self.room_receipts
            .get_or_load(key.clone(), || async move {
                let receipts = db
                    .run_autocommit("get_receipts_for_room", move |txn| {
                        let (room, receipt_type) = key.clone();
                        Box::pin(async move {
                            let rows = txn
                                .query(
                                    &format!("{SELECT_RECEIPT} WHERE room_id = $1 AND receipt_type = $2"),
                                    &[&room, &receipt_type],
                                )
                                .await?;
                            let mut receipts = rows
                                .iter()
                                .map(|row| receipt_from_row(row).map(|(_, r)| r))
                                .collect::<Result<Vec<_>, _>>()?;
                            // Sorted here, not in SQL: PostgreSQL orders text by the
                            // database's collation, SQLite by bytes.
                            receipts
                                .sort_by(|a, b| (&a.user_id, &a.thread_id).cmp(&(&b.user_id, &b.thread_id)));
                            Ok(receipts)
                        })
                    })
                    .await?;
                Ok(Arc::new(receipts))
            })
            .await
    }

    /// The event `user_id`'s latest unthreaded receipt of `receipt_type` in
    /// `room_id` points at (cached).
    pub async fn get_last_receipt_event_id_for_user(
        &self,
        user_id: &str,
        room_id: &str,
        receipt_type: &str,
    ) -> Result<Option<String>, StoreError> {
        let key = (user_id.to_owned(), room_id.to_owned(), receipt_type.to_owned());
        let db = self.db.clone();
        self.last_receipt
            .get_or_load(key.clone(), || async move {
                db.run_autocommit("get_last_receipt_event_id_for_user", move |txn| {
                    let (user, room, receipt_type) = key.clone();
                    Box::pin(async move {
                        let row = txn
                            .query_opt(
                                "SELECT event_id FROM receipts_linearized WHERE user_id = $1 AND room_id = $2 \
                                 AND receipt_type = $3 AND thread_id IS NULL",
                                &[&user, &room, &receipt_type],
                            )
                            .await?;
                        row.map(|row| row.get(0)).transpose()
                    })
                })
                .await
            })
            .await
    }

    /// The receipts of `room_ids` written with `from < stream_id ≤ to`; rooms the
    /// change cache proves unchanged since `from` cost no query.
    pub async fn get_receipts_for_rooms_since(
        &self,
        room_ids: &[&str],
        from: i64,
        to: i64,
    ) -> Result<Vec<ReceiptRow>, StoreError> {
        self.get_receipts_between(room_ids, Some(&MultiWriterToken::at(from)), &MultiWriterToken::at(to))
            .await
    }

    /// The receipts of `room_ids` that lie in `(low, high]` as multi-writer
    /// tokens place them: each by its own writer's position, so that a client
    /// paging with such tokens gets every receipt exactly once even while
    /// writers persist out of order. No `low` means from the start.
    pub async fn get_receipts_between(
        &self,
        room_ids: &[&str],
        low: Option<&MultiWriterToken>,
        high: &MultiWriterToken,
    ) -> Result<Vec<ReceiptRow>, StoreError> {
        let from = low.map_or(0, MultiWriterToken::stream);
        let to = high.max_pos();
        let changed = self.room_changes.get_entities_changed(room_ids, from);
        let mut receipts = Vec::new();
        for room in changed {
            let room = room.to_owned();
            let rows = self
                .db
                .run_autocommit("get_receipts_between", move |txn| {
                    let room = room.clone();
                    Box::pin(async move {
                        txn.query(
                            "SELECT stream_id, room_id, receipt_type, user_id, event_id, thread_id, data, \
                             instance_name FROM receipts_linearized \
                             WHERE room_id = $1 AND stream_id > $2 AND stream_id <= $3 ORDER BY stream_id",
                            &[&room, &from, &to],
                        )
                        .await
                    })
                })
                .await?;
            for row in &rows {
                let (stream_id, receipt) = receipt_from_row(row)?;
                let writer: String = row.get(7)?;
                if MultiWriterToken::in_range(low, Some(high), Some(&writer), stream_id) {
                    receipts.push(receipt);
                }
            }
        }
        Ok(receipts)
    }

    /// Replication catch-up: `writer`'s receipts with `from < stream_id ≤ to`,
    /// at most `limit`.
    pub async fn get_receipts_updates(
        &self,
        writer: &str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> Result<StreamUpdates<ReceiptRow>, StoreError> {
        let sql = format!(
            "{SELECT_RECEIPT} WHERE instance_name = $1 AND stream_id > $2 AND stream_id <= $3 ORDER BY stream_id LIMIT $4"
        );
        StreamUpdates::fetch(
            &self.db,
            "get_receipts_updates",
            &sql,
            writer,
            from,
            to,
            limit,
            receipt_from_row,
        )
        .await
    }

    /// Invalidates exactly what a new receipt makes stale, and marks its room.
    fn receipt_changed(&self, receipt: &ReceiptRow, stream_id: i64) {
        invalidate_for(&self.registry, receipt);
        self.room_changes.entity_has_changed(&receipt.room_id, stream_id);
    }

    /// Worker side: applies `rows` that `writer` wrote up to `token`,
    /// invalidating before the writer's position moves.
    pub fn process_receipts_rows(&self, writer: &str, token: i64, rows: &[ReceiptRow]) {
        for row in rows {
            self.receipt_changed(row, token);
        }
        self.ids.advance(writer, token);
    }
}

fn invalidate_for(registry: &CacheRegistry, receipt: &ReceiptRow) {
    registry
        .invalidate_key("get_receipts_for_room", &[receipt.room_id.clone(), receipt.receipt_type.clone()]);
    registry.invalidate_key(
        "get_last_receipt_event_id_for_user",
        &[receipt.user_id.clone(), receipt.room_id.clone(), receipt.receipt_type.clone()],
    );
}

/// Writes receipts: built only on the instances configured as writers of the
/// `receipts` stream.
///
/// Receipts go through one queue ([`GroupCommit`]): those that arrive while a
/// commit is in flight are recorded together by the next one, in their order
/// of arrival.
#[derive(Debug)]
pub struct ReceiptsWriter {
    reader: Arc<ReceiptsReader>,
    queue: GroupCommit<ReceiptRow, Result<i64, StoreError>>,
}

/// The most receipts one commit takes.
const MAX_GROUP: usize = 128;

impl ReceiptsWriter {
    /// The read half.
    pub fn reader(&self) -> &ReceiptsReader {
        &self.reader
    }

    /// The read half, for components that keep it (a replication stream).
    pub fn shared_reader(&self) -> Arc<ReceiptsReader> {
        Arc::clone(&self.reader)
    }

    /// How this writer's commits grouped receipts so far.
    pub fn group_stats(&self) -> GroupCommitStats {
        self.queue.stats()
    }

    /// Records `receipt`, replacing the user's previous one of that type (and
    /// thread) in the room; returns its stream ID. Exactly the caches it makes
    /// stale are invalidated after the commit, before the position moves.
    pub async fn insert_receipt(&self, receipt: &ReceiptRow) -> Result<i64, StoreError> {
        self.queue.submit(receipt.clone()).await?
    }
}

fn room_of(receipt: &ReceiptRow) -> &str {
    &receipt.room_id
}

/// Records a group of receipts in one transaction, those of the rooms this
/// writer owns in the epoch of the stream's writers it goes by; their stream
/// IDs in order, and [`StoreError::Moved`] for the others.
async fn insert_receipts(
    reader: Arc<ReceiptsReader>,
    instance: Arc<str>,
    writers: Option<Arc<DeploymentWriters>>,
    receipts: Arc<[ReceiptRow]>,
) -> Result<Vec<Result<i64, StoreError>>, StoreError> {
    store_core::writers::commit_owned(
        writers.as_deref(),
        RECEIPTS_STREAM,
        receipts,
        |receipt| Some(room_of(receipt)),
        |mine, epoch| insert_owned(reader, instance, mine, epoch),
    )
    .await
}

async fn insert_owned(
    reader: Arc<ReceiptsReader>,
    instance: Arc<str>,
    receipts: Arc<[ReceiptRow]>,
    epoch: Option<i64>,
) -> Result<Vec<i64>, StoreError> {
    let db = reader.db.clone();
    db.run_interaction_read_committed("insert_receipt", move |txn| {
        let (reader, instance, receipts) = (Arc::clone(&reader), Arc::clone(&instance), Arc::clone(&receipts));
        Box::pin(async move {
            if let Some(epoch) = epoch {
                store_core::writers::fence(txn, RECEIPTS_STREAM, epoch);
            }
            // The upserts go with the COMMIT; the transaction's ID, which a
            // COMMIT in doubt is read back by, comes with the stream IDs.
            txn.assign_id();
            let mut stream_ids = reader.ids.get_next_mult_txn(txn, receipts.len()).await?;
            stream_ids.sort_unstable();
            let instance = instance.to_string();
            for (receipt, stream_id) in receipts.iter().zip(&stream_ids) {
                // An upsert, so that two first receipts of one key arriving at once
                // cannot both insert (the unique indexes arbitrate); the later
                // stream ID wins whatever order the transactions commit in.
                let conflict = if receipt.thread_id.is_some() {
                    "(room_id, receipt_type, user_id, thread_id) WHERE thread_id IS NOT NULL"
                } else {
                    "(room_id, receipt_type, user_id) WHERE thread_id IS NULL"
                };
                let data = receipt.data.to_string();
                txn.execute_at_commit(
                    format!(
                        "INSERT INTO receipts_linearized (stream_id, instance_name, room_id, receipt_type, user_id, \
                         event_id, thread_id, data) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                         ON CONFLICT {conflict} DO UPDATE SET stream_id = EXCLUDED.stream_id, \
                         instance_name = EXCLUDED.instance_name, event_id = EXCLUDED.event_id, data = EXCLUDED.data \
                         WHERE receipts_linearized.stream_id < EXCLUDED.stream_id"
                    ),
                    &[
                        stream_id,
                        &instance,
                        &receipt.room_id,
                        &receipt.receipt_type,
                        &receipt.user_id,
                        &receipt.event_id,
                        &receipt.thread_id,
                        &data,
                    ],
                );
            }
            let (changed, ids) = (Arc::clone(&receipts), stream_ids.clone());
            txn.call_after(move || {
                for (receipt, stream_id) in changed.iter().zip(&ids) {
                    invalidate_for(&reader.registry, receipt);
                    reader.room_changes.entity_has_changed(&receipt.room_id, *stream_id);
                }
            });
            Ok(stream_ids)
        })
    })
    .await
}

/// The `receipts` stream.
#[derive(Debug)]
pub struct ReceiptsStream(pub Arc<ReceiptsReader>);

impl store_core::MultiWriterSource for ReceiptsStream {
    type Row = ReceiptRow;
    const SPEC: StreamSpec = RECEIPTS;

    fn id_generator(&self) -> &MultiWriterIdGenerator {
        self.0.stream()
    }
    fn fetch<'a>(
        &'a self,
        writer: &'a str,
        from: i64,
        to: i64,
        limit: usize,
    ) -> store_core::BoxFuture<'a, Result<StreamUpdates<ReceiptRow>, StoreError>> {
        Box::pin(self.0.get_receipts_updates(writer, from, to, limit))
    }
    fn apply(&self, writer: &str, token: i64, rows: &[ReceiptRow]) {
        self.0.process_receipts_rows(writer, token, rows);
    }
}

/// This crate's tables (`receipts_linearized` and `receipts_sequence`), for both engines: what a
/// composition including this crate lists in `Store::migrations`.
pub static MIGRATIONS: store_core::Migrations = store_core::Migrations::new(
    env!("CARGO_PKG_NAME"),
    sqlx::migrate!("migrations/postgres"),
    sqlx::migrate!("migrations/sqlite"),
);

/// The receipts mixin's read side: a composition that reads read receipts says where
/// its reader is, and handlers written against this trait serve a master's
/// store and a worker's alike.
pub trait ReceiptsStore: Send + Sync {
    /// The read half of read receipts.
    fn receipts(&self) -> &Arc<ReceiptsReader>;
}

/// The receipts mixin's write side: `Some` on the stream's writers.
pub trait ReceiptsWriteStore: ReceiptsStore {
    /// The write half, on the instances configured to write the stream.
    fn receipts_writer(&self) -> Option<&ReceiptsWriter>;
}

impl store_core::Store for ReceiptsReader {
    fn migrations() -> Vec<&'static store_core::Migrations> {
        vec![&MIGRATIONS]
    }
    fn stream_specs() -> Vec<store_core::StreamSpec> {
        vec![RECEIPTS]
    }
    /// Loads the stream's positions on the start-up connection and registers the
    /// caches.
    async fn new(db: Database, conn: &mut Transaction, ctx: &StoreContext) -> Result<Self, StoreError> {
        let tables = vec![StreamTable::new("receipts_linearized", "instance_name", "stream_id")];
        let generator_config = ctx.generator_config(RECEIPTS, tables, "receipts_sequence");
        let ids = MultiWriterIdGenerator::new_in(&db, conn, generator_config).await?;
        let registry = Arc::clone(ctx.registry());
        // Prefilled from the newest rows, which may lie above the current token:
        // a cache that started empty would deny changes it never saw.
        let room_changes = StreamChangeCache::load_newest(
            conn,
            "receipts_room_changes",
            "SELECT room_id, stream_id FROM receipts_linearized ORDER BY stream_id DESC LIMIT $1",
            ids.get_current_token(),
        )
        .await?;
        Ok(ReceiptsReader {
            room_receipts: registry.register("get_receipts_for_room")?,
            last_receipt: registry.register("get_last_receipt_event_id_for_user")?,
            room_changes: Arc::new(room_changes),
            registry,
            db,
            ids,
        })
    }
}

impl store_core::Store for ReceiptsWriter {
    fn migrations() -> Vec<&'static store_core::Migrations> {
        <ReceiptsReader as store_core::Store>::migrations()
    }
    fn stream_specs() -> Vec<store_core::StreamSpec> {
        <ReceiptsReader as store_core::Store>::stream_specs()
    }
    /// The write half: refused unless this instance writes `receipts`; it
    /// allocates from the read half's generator, which it shares with the
    /// rest of the process through `ctx`.
    async fn new(db: Database, conn: &mut Transaction, ctx: &StoreContext) -> Result<Self, StoreError> {
        ctx.require_writer(RECEIPTS)?;
        let reader = ctx.component::<ReceiptsReader>(&db, conn).await?;
        let (committing, instance) = (Arc::clone(&reader), Arc::<str>::from(ctx.instance_name()));
        let writers = ctx.settings().has_other_processes.then(|| Arc::clone(ctx.deployment_writers()));
        let queue = GroupCommit::spawn("insert_receipt", MAX_GROUP, room_of, move |receipts| {
            Box::pin(insert_receipts(
                Arc::clone(&committing),
                Arc::clone(&instance),
                writers.clone(),
                receipts,
            ))
        });
        Ok(ReceiptsWriter { reader, queue })
    }
}

#[cfg(test)]
mod tests {
    use super::ReceiptRow;

    #[test]
    fn receipt_rows_match_the_wire_vectors() {
        let json =
            r#"["!r:example.com","m.read","@u:example.com","$e1:example.com",null,{"ts":1490197670513}]"#;
        let row: ReceiptRow = serde_json::from_str(json).unwrap();
        assert_eq!(row.room_id, "!r:example.com");
        assert_eq!(row.receipt_type, "m.read");
        assert_eq!(row.user_id, "@u:example.com");
        assert_eq!(row.event_id, "$e1:example.com");
        assert_eq!(row.thread_id, None);
        assert_eq!(row.data, serde_json::json!({"ts": 1_490_197_670_513_i64}));
        assert_eq!(serde_json::to_string(&row).unwrap(), json);
        assert!(serde_json::from_str::<ReceiptRow>(r#"["!r","m.read","@u"]"#).is_err());
    }
}
