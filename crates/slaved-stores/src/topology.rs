//! Which instance writes which stream: checked in one process's config, and
//! agreed between the processes of a deployment through the database.

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
/// writers, as recorded in `deployment_stream_writers`.
///
/// The master is the authority: it records its config at every start (a
/// changed deployment is a warning). Any other process must match what is
/// recorded, or refuses to start; one started before the master ever ran
/// records its own view, which later workers must then match.
pub(crate) async fn agree_on_writers(
    conn: &mut Transaction,
    config: &ServerConfig,
) -> Result<(), StoreError> {
    let is_master = config.instance_name == server_config::MASTER_INSTANCE;
    for stream in WRITABLE_STREAMS {
        let ours = config.writers_for(stream);
        let ours_text = serde_json::to_string(&ours)
            .map_err(|err| StoreError::Misconfigured(format!("cannot record writers: {err}")))?;
        let recorded = read_recorded(conn, stream).await?;
        match recorded {
            Some((recorded, by)) if recorded != ours_text => {
                if is_master {
                    tracing::warn!(
                        stream,
                        from = %recorded,
                        to = %ours_text,
                        "the deployment's writers changed (recorded by `{by}`); restart every other process with the new config"
                    );
                    record(conn, stream, &ours_text, &config.instance_name).await?;
                } else {
                    return Err(StoreError::Misconfigured(format!(
                        "`[stream_writers] {stream}` is {ours_text} here but {recorded} for the deployment (recorded by `{by}`); every process must list the same writers"
                    )));
                }
            }
            Some(_) => {}
            None => {
                record(conn, stream, &ours_text, &config.instance_name).await?;
                if !is_master {
                    // Another process may have recorded first, in a race: compare
                    // with whatever won.
                    if let Some((recorded, by)) = read_recorded(conn, stream).await?
                        && recorded != ours_text
                    {
                        return Err(StoreError::Misconfigured(format!(
                            "`[stream_writers] {stream}` is {ours_text} here but {recorded} for the deployment (recorded by `{by}`); every process must list the same writers"
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}

async fn read_recorded(conn: &mut Transaction, stream: &str) -> Result<Option<(String, String)>, StoreError> {
    let rows = conn
        .query(
            "SELECT writers, recorded_by FROM deployment_stream_writers WHERE stream_name = $1",
            &[&stream],
        )
        .await?;
    rows.first().map(|row| Ok((row.get(0)?, row.get(1)?))).transpose()
}

async fn record(conn: &mut Transaction, stream: &str, writers: &str, by: &str) -> Result<(), StoreError> {
    // The master's record replaces any other; another process's only fills a gap.
    let on_conflict = if by == server_config::MASTER_INSTANCE {
        "DO UPDATE SET writers = EXCLUDED.writers, recorded_by = EXCLUDED.recorded_by"
    } else {
        "DO NOTHING"
    };
    let sql = format!(
        "INSERT INTO deployment_stream_writers (stream_name, writers, recorded_by) VALUES ($1, $2, $3) \
         ON CONFLICT (stream_name) {on_conflict}"
    );
    conn.execute(&sql, &[&stream, &writers, &by]).await?;
    Ok(())
}
