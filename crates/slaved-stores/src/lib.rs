//! The worker-side store (Synapse's "slaved stores"): the read halves of every
//! store crate, composed with the uniform constructor and fed by replication.
//!
//! Laid out now so the dependency graph is fixed from the start; `WorkerStore`
//! arrives with the slaved-stores issue. **Invariant:** nothing here can obtain a
//! stream ID generator, so a worker cannot write a stream it is not configured to
//! write.

#![warn(missing_docs)]
