//! Starting the transports `[replication]` asks for.

use std::sync::Arc;

use server_config::ReplicationConfig;
use tokio::task::JoinHandle;

use crate::Hub;
use crate::redis::{RedisAddress, check_reachable, run_forever};
use crate::tcp;

/// Starts what `config` asks for: the TCP listener (`listen`), the connection
/// to the master (`master`), and/or Redis (`redis`). The transports run until
/// their tasks are aborted (Redis is reconnected to forever once it answered at
/// start); the error names a setting that cannot work.
pub async fn start(hub: &Arc<Hub>, config: &ReplicationConfig) -> Result<Vec<JoinHandle<()>>, String> {
    let mut tasks = Vec::new();
    if let Some(url) = &config.redis {
        let address = RedisAddress::parse(url).map_err(|err| format!("`[replication] redis`: {err}"))?;
        check_reachable(&address).await.map_err(|err| format!("`[replication] redis`: {err}"))?;
        tasks.push(tokio::spawn(run_forever(Arc::clone(hub), address)));
    }
    if let Some(listen) = &config.listen {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|err| format!("`[replication] listen` = {listen:?}: cannot listen: {err}"))?;
        tasks.push(tokio::spawn(tcp::serve(Arc::clone(hub), listener)));
    }
    if let Some(master) = &config.master {
        tasks.push(tokio::spawn(tcp::connect_forever(Arc::clone(hub), master.clone())));
    }
    Ok(tasks)
}
