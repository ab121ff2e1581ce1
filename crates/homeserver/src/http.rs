//! The HTTP listener: `/health` now; the client API and the internal endpoints
//! join it in later issues.

use axum::Router;
use axum::extract::State;
use axum::routing::get;

/// What every handler can reach.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub(crate) instance_name: String,
}

pub(crate) fn router(state: AppState) -> Router {
    Router::new().route("/health", get(health)).with_state(state)
}

/// `GET /health`: 200 `OK` while the process serves, as Synapse answers, so load
/// balancers and orchestrators configured for Synapse work unchanged.
async fn health(State(state): State<AppState>) -> &'static str {
    tracing::trace!(instance = %state.instance_name, "health check");
    "OK"
}
