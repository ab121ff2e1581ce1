//! Building a generator: checking its configuration, repairing the sequence (or
//! reading the counter's high-water mark), and loading every writer's position
//! without scanning the stream's tables.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Mutex, OnceLock};

use super::{IdSource, Inner, MultiWriterConfig, PositionTracker, PositionsTable};
use crate::{Database, StoreError, Transaction};

/// Refuses configurations that would produce wrong SQL or wrong positions.
pub(super) fn validate(config: &MultiWriterConfig) -> Result<(), StoreError> {
    let misconfigured =
        |what: String| Err(StoreError::Misconfigured(format!("stream `{}`: {what}", config.stream_name)));
    if config.stream_name.is_empty() {
        return Err(StoreError::Misconfigured("a stream ID generator needs a stream name".to_owned()));
    }
    if config.instance_name.is_empty() {
        return misconfigured("no instance name".to_owned());
    }
    if config.tables.is_empty() {
        return misconfigured("no tables: positions are checked against the stream's rows".to_owned());
    }
    // These names are spliced into SQL; only plain identifiers are accepted.
    let identifiers = config
        .tables
        .iter()
        .flat_map(|table| [&table.table, &table.instance_column, &table.id_column])
        .chain((!config.sequence_name.is_empty()).then_some(&config.sequence_name));
    for name in identifiers {
        if !is_identifier(name) {
            return misconfigured(format!("`{name}` is not a plain SQL identifier"));
        }
    }
    Ok(())
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63
}

impl Inner {
    pub(super) async fn load(
        db: &Database,
        conn: &mut Transaction,
        config: &MultiWriterConfig,
        source: IdSource,
    ) -> Result<(Inner, Option<tokio::sync::watch::Receiver<i64>>), StoreError> {
        let factor = if config.positive { 1 } else { -1 };
        let is_writer = config.writers.contains(&config.instance_name);
        let may_allocate = config.writers.is_empty() || is_writer;
        // `counted_up_to`: for a generator that counts IDs itself, the highest ID
        // its counter handed out in earlier lives. SQLite serves one process, so
        // nothing is in flight while it starts: every one of those IDs is
        // committed or died with the old process, and clients may hold tokens up
        // to it. (A generator that does not allocate leaves it to the writer.)
        let (own_from_sequence, counted_up_to, handed_out) = match &source {
            IdSource::Sequence { name, .. } => {
                if name.is_empty() {
                    return Err(StoreError::Misconfigured(format!(
                        "stream `{}`: PostgreSQL needs a sequence name",
                        config.stream_name
                    )));
                }
                let last_allocated = repair_sequence(conn, config, name, factor).await?;
                (is_writer.then_some(last_allocated), 0, last_allocated)
            }
            IdSource::Counter(counter) => {
                let high_water = load_high_water(conn, config, factor).await?;
                counter.durable.store(high_water, Ordering::Release);
                (None, if may_allocate { high_water } else { 0 }, high_water)
            }
        };

        let mut tracker = PositionTracker::new(&config.instance_name);
        let mut stored_own = 0;
        if !config.writers.is_empty() {
            let stored = load_stored_positions(conn, config, factor).await?;
            stored_own =
                stored.iter().find(|(writer, _)| *writer == config.instance_name).map_or(0, |(_, p)| *p);
            for (writer, position) in stored {
                tracker.load_position(&writer, position);
            }
        }
        if let Some(own) = own_from_sequence {
            // A writer holds nothing in flight while it starts: all of its IDs up to
            // the sequence's value are finished (or died with the old process). That
            // bounds the stream's position even when our `stream_positions` row is
            // stale (after a rollback of the software).
            tracker.load_position(&config.instance_name, own);
        }
        if is_writer && counted_up_to > stored_own {
            // Like the sequence's value above: our IDs up to the mark are finished.
            tracker.load_position(&config.instance_name, counted_up_to);
        }

        let mut highest_row = 0;
        let mut own_highest_row = 0;
        match tracker.positions().values().copied().min() {
            None => {
                let table_max = tables_max(conn, config, factor).await?;
                tracker.load_persisted_upto(table_max.max(counted_up_to).max(1));
            }
            Some(min_position) => {
                tracker.load_persisted_upto(min_position);
                // Rows at or above the lowest known position may have been persisted
                // out of order before the restart: read those, and only those.
                let rows = rows_from(conn, config, factor, min_position).await?;
                for (writer, id) in rows {
                    tracker.add_persisted_position(id);
                    if writer == config.instance_name {
                        own_highest_row = own_highest_row.max(id);
                        let own = tracker.positions().get(&writer).copied().unwrap_or(0);
                        tracker.load_position(&writer, own.max(id));
                    }
                    highest_row = highest_row.max(id);
                }
            }
        }
        let persisted_upto = tracker.persisted_upto();
        if is_writer {
            // What we announce must be an ID known to be finished: others take a
            // writer's position as one when closing gaps. The sequence's value may be
            // another writer's ID still in flight, so it served only to bound the
            // stream's position above; our own claim is what we recorded or wrote,
            // or the stream's position.
            let mut claim = stored_own.max(own_highest_row).max(persisted_upto).max(counted_up_to);
            if let (Some(sequence_value), IdSource::Sequence { name, .. }) = (own_from_sequence, &source)
                && claim < sequence_value
            {
                // IDs up to the sequence's value are unaccounted for (ours abandoned
                // by the old process, or others' in flight). Take a fresh ID of our
                // own and count it finished: a claim that is safe to announce and
                // lets the stream move past our abandoned IDs once the others catch
                // up, instead of waiting for our next write. Skipping an ID is safe.
                let row = conn.query_one(&format!("SELECT nextval('{name}')"), &[]).await?;
                claim = row.get::<i64>(0)?;
                tracing::debug!(stream = %config.stream_name, claim, sequence_value, "claimed a fresh position at start-up");
            }
            tracker.load_position(&config.instance_name, claim);
        }
        for writer in &config.writers {
            // A writer with no row yet starts at the linear position, so followers
            // never fetch its history from the beginning.
            if !tracker.positions().contains_key(writer) {
                tracker.load_position(writer, persisted_upto);
            }
        }
        // The counter then starts above the mark (and everything else seen).
        tracker.finish_loading(highest_row.max(counted_up_to));
        if config.writers.is_empty() {
            tracker.load_position(&config.instance_name, persisted_upto);
        }

        for (writer, final_position) in &config.retired {
            tracker.retire(writer, (final_position * factor).max(1));
        }
        // Only a listed writer records its position; nobody else needs the
        // table state or a background recorder (until it joins the writers).
        let (positions_table, background) = if is_writer {
            let (table, receiver) = PositionsTable::new(config.positive, stored_own);
            // Announce ourselves before allocating anything. Another writer starting
            // later assumes a writer without a row holds nothing in flight and sits
            // at the stream's position; with a row, it knows where our IDs begin.
            let own = tracker.position_for_writer(&config.instance_name);
            let sql = table.upsert_sql.for_engine(db.engine());
            conn.execute(sql, &[&config.stream_name, &config.instance_name, &(own * factor)]).await?;
            table.stored.fetch_max(own, Ordering::AcqRel);
            (OnceLock::from(table), Some(receiver))
        } else {
            (OnceLock::new(), None)
        };
        let inner = Inner {
            db: db.clone(),
            stream_name: config.stream_name.clone(),
            instance_name: config.instance_name.clone(),
            factor,
            may_allocate: AtomicBool::new(may_allocate),
            writers: Mutex::new(config.writers.clone()),
            positions_table,
            background_record_delay: config.background_record_delay,
            tables: config.tables.clone(),
            source,
            tracker: Mutex::new(tracker),
            handed_out: AtomicI64::new(handed_out),
            reading_sequence: tokio::sync::Mutex::new(()),
            changes: tokio::sync::watch::channel(0).0,
        };
        Ok((inner, background))
    }
}

/// Deletes the rows of writers no longer configured (a writer removed and later
/// re-added starts afresh instead of resuming from an ancient row), and returns
/// the others' positions as internal magnitudes.
async fn load_stored_positions(
    conn: &mut Transaction,
    config: &MultiWriterConfig,
    factor: i64,
) -> Result<Vec<(String, i64)>, StoreError> {
    let rows = conn
        .query(
            "SELECT instance_name, stream_id FROM stream_positions WHERE stream_name = $1",
            &[&config.stream_name],
        )
        .await?;
    let mut positions = Vec::with_capacity(rows.len());
    for row in rows {
        let (writer, stream_id): (String, i64) = (row.get(0)?, row.get(1)?);
        if !config.writers.contains(&writer) {
            conn.execute(
                "DELETE FROM stream_positions WHERE stream_name = $1 AND instance_name = $2",
                &[&config.stream_name, &writer],
            )
            .await?;
            tracing::info!(stream = %config.stream_name, writer, "forgot the position of a writer no longer configured");
            continue;
        }
        let internal = stream_id * factor;
        if internal < 1 {
            tracing::warn!(stream = %config.stream_name, writer, stream_id, "ignoring a stored position of the wrong sign");
            continue;
        }
        positions.push((writer, internal));
    }
    Ok(positions)
}

/// The counter's high-water mark (as a magnitude): the highest ID it ever handed
/// out, 0 when it never did (or before the table existed).
async fn load_high_water(
    conn: &mut Transaction,
    config: &MultiWriterConfig,
    factor: i64,
) -> Result<i64, StoreError> {
    let row = conn
        .query_opt(
            "SELECT stream_id FROM stream_id_high_water WHERE stream_name = $1",
            &[&config.stream_name],
        )
        .await?;
    let Some(row) = row else { return Ok(0) };
    let stream_id: i64 = row.get(0)?;
    let internal = stream_id.saturating_mul(factor);
    if internal < 1 {
        tracing::warn!(stream = %config.stream_name, stream_id, "ignoring a stream ID high-water mark of the wrong sign");
        return Ok(0);
    }
    Ok(internal)
}

/// The largest ID (as a magnitude) in any of the stream's tables, 0 when empty.
async fn tables_max(
    conn: &mut Transaction,
    config: &MultiWriterConfig,
    factor: i64,
) -> Result<i64, StoreError> {
    let mut highest = 0;
    for table in &config.tables {
        let sql = if factor > 0 {
            format!("SELECT MAX({}) FROM {}", table.id_column, table.table)
        } else {
            format!("SELECT -MIN({}) FROM {}", table.id_column, table.table)
        };
        let max: Option<i64> = conn.query_one(&sql, &[]).await?.get(0)?;
        highest = highest.max(max.unwrap_or(0));
    }
    Ok(highest)
}

/// Every `(writer, internal ID)` at or above `min_position`, ascending by ID.
async fn rows_from(
    conn: &mut Transaction,
    config: &MultiWriterConfig,
    factor: i64,
    min_position: i64,
) -> Result<Vec<(String, i64)>, StoreError> {
    let mut rows = Vec::new();
    for table in &config.tables {
        let (instance, id, name) = (&table.instance_column, &table.id_column, &table.table);
        let sql = if factor > 0 {
            format!("SELECT {instance}, {id} FROM {name} WHERE {id} >= $1")
        } else {
            format!("SELECT {instance}, {id} FROM {name} WHERE {id} <= $1")
        };
        for row in conn.query(&sql, &[&(min_position * factor)]).await? {
            let writer: Option<String> = row.get(0)?;
            let stream_id: i64 = row.get(1)?;
            rows.push((writer.unwrap_or_default(), stream_id * factor));
        }
    }
    // By ID, not by writer: the writer column may be NULL in old rows.
    rows.sort_by_key(|(_, id)| *id);
    Ok(rows)
}

/// Moves the sequence forward past the stream's tables and `stream_positions`
/// when it is behind either, and returns its last allocated value.
///
/// A sequence behind a table follows a rollback of the software; one behind a
/// recorded position follows a PostgreSQL failover (sequence values are
/// WAL-logged ahead, so a promoted replica's sequence can sit behind what the old
/// primary handed out). Skipping IDs is always safe; reusing one never is.
async fn repair_sequence(
    conn: &mut Transaction,
    config: &MultiWriterConfig,
    sequence: &str,
    factor: i64,
) -> Result<i64, StoreError> {
    // Processes starting together must not repair at once: a later, stale
    // setval could move the sequence back over IDs the other already handed out.
    // The lock lasts until the start-up transaction ends.
    conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&format!("repair {sequence}")]).await?;
    let row = conn.query_one(&format!("SELECT last_value, is_called FROM {sequence}"), &[]).await?;
    let (last_value, is_called): (i64, bool) = (row.get(0)?, row.get(1)?);
    // Not yet called means `last_value` is the *next* value. A fresh sequence thus
    // counts as having handed out nothing, and every reader takes 1 as persisted.
    let last_allocated = if is_called { last_value } else { (last_value - 1).max(1) };

    let table_max = tables_max(conn, config, factor).await?;
    let row = conn
        .query_one(
            "SELECT MAX(ABS(stream_id)) FROM stream_positions WHERE stream_name = $1",
            &[&config.stream_name],
        )
        .await?;
    let positions_max: i64 = row.get::<Option<i64>>(0)?.unwrap_or(0);
    let needed = table_max.max(positions_max);
    if needed <= last_allocated {
        return Ok(last_allocated);
    }
    // Forward only, in one statement: never below what the sequence holds now.
    conn.execute(
        &format!("SELECT setval('{sequence}', GREATEST($1, (SELECT last_value FROM {sequence})))"),
        &[&needed],
    )
    .await?;
    tracing::warn!(
        stream = %config.stream_name,
        sequence = %sequence,
        sequence_last_value = last_allocated,
        table_max,
        stream_positions_max = positions_max,
        repaired_to = needed,
        "the sequence was behind the stream's rows or recorded positions; moved it forward so no ID is reused"
    );
    Ok(needed)
}
