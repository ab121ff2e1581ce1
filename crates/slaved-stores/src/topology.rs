//! Which instance writes which stream: checked in one process's config, and
//! agreed between the processes of a deployment through the database.

use std::collections::BTreeMap;

use store_core::{ServerConfig, StoreError, Transaction};

use crate::WRITABLE_STREAMS;

/// Checks what one process's config can get wrong about writers on its own:
/// an unknown stream, or several writers for a single-writer stream. (Writers
/// missing from `[instance_map]` are the config crate's check.)
pub fn check_stream_writers(config: &ServerConfig) -> Result<(), String> {
    for (stream, writers) in &config.stream_writers {
        if !WRITABLE_STREAMS.contains(&stream.as_str()) {
            return Err(format!(
                "`[stream_writers] {stream}`: no such stream; the streams with configurable writers are {}",
                WRITABLE_STREAMS.join(", ")
            ));
        }
        if stream == replication::typing::TYPING_STREAM && writers.len() > 1 {
            return Err(format!(
                "`[stream_writers] {stream}` lists {} writers; typing has exactly one",
                writers.len()
            ));
        }
    }
    Ok(())
}

/// Makes sure this process agrees with the deployment on every stream's
/// writers, as recorded in `deployment_stream_writers`, before anything is
/// loaded: a generator deletes the recorded positions of writers its config
/// does not list, so a misconfigured process must never get that far.
///
/// The master is the authority: it records its lists at every start (a changed
/// list is a warning: the other processes must be restarted with it). Any other
/// process must match the record, and refuses to start before the master has
/// made one.
///
/// Runs first in the start-up transaction, so a worker's generators delete
/// positions by the very record it agreed with; the master writes only when its
/// lists changed, so processes starting together on a recorded deployment do
/// not conflict (when they do, `build_store` retries). One connection suffices.
pub(crate) async fn agree_on_writers(
    conn: &mut Transaction,
    config: &ServerConfig,
) -> Result<(), StoreError> {
    let ours = WRITABLE_STREAMS
        .iter()
        .map(|stream| {
            serde_json::to_string(&config.writers_for(stream))
                .map(|writers| (*stream, writers))
                .map_err(|err| StoreError::Misconfigured(format!("cannot record writers: {err}")))
        })
        .collect::<Result<Vec<(&str, String)>, StoreError>>()?;
    agree(conn, &ours, config.instance_name == server_config::MASTER_INSTANCE).await
}

async fn agree(txn: &mut Transaction, ours: &[(&str, String)], is_master: bool) -> Result<(), StoreError> {
    let rows = txn.query("SELECT stream_name, writers FROM deployment_stream_writers", &[]).await?;
    let recorded = rows
        .iter()
        .map(|row| Ok((row.get(0)?, row.get(1)?)))
        .collect::<Result<BTreeMap<String, String>, StoreError>>()?;
    for (stream, writers) in ours {
        match (recorded.get(*stream), is_master) {
            (Some(recorded), _) if recorded == writers => {}
            (recorded, true) => {
                if let Some(previous) = recorded {
                    tracing::warn!(
                        stream,
                        from = %previous,
                        to = %writers,
                        "the deployment's writers changed; restart every other process with the new config"
                    );
                }
                txn.execute(
                    "INSERT INTO deployment_stream_writers (stream_name, writers, recorded_by) VALUES ($1, $2, $3) \
                     ON CONFLICT (stream_name) DO UPDATE SET writers = EXCLUDED.writers",
                    &[stream, writers, &server_config::MASTER_INSTANCE],
                )
                .await?;
            }
            (Some(recorded), false) => {
                return Err(StoreError::Misconfigured(format!(
                    "`[stream_writers] {stream}` is {writers} here but {recorded} for the deployment (as the master recorded it); every process must list the same writers"
                )));
            }
            (None, false) => {
                return Err(StoreError::Misconfigured(format!(
                    "the master has not recorded the deployment's writers of `{stream}` in this database yet; start the master first"
                )));
            }
        }
    }
    Ok(())
}
