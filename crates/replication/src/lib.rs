//! Replication between processes: the line protocol compatible with Synapse's,
//! the `Stream` trait and registry, and the TCP and Redis transports.
//!
//! Laid out now so the dependency graph is fixed from the start; the protocol
//! arrives with the replication issue.

#![warn(missing_docs)]
