//! The end-to-end harness: running the `master` and `worker` binaries as child
//! processes, whole deployments of them on a fresh PostgreSQL database, and the
//! clients that talk to them, over plain HTTP and the replication protocol.
//!
//! One harness for everything that drives real processes: the end-to-end tests
//! (`tests/it/`), the `topology` and `e2e` benchmarks (`benches/`) and the demo
//! (`src/bin/demo.rs`, run by `cargo xtask demo`). The package's `e2e-master` and
//! `e2e-worker` binaries are the `master` and `worker` entry points, rebuilt here
//! so that Cargo builds them beside the tests, benchmarks and demo that run them.
//!
//! The helpers panic on failure, as a test wants; the few the demo needs to
//! report a failure in words instead (starting and stopping a process) also
//! come as `try_` variants returning the reason.

#![warn(missing_docs)]

pub mod client;
pub mod db_role;
pub mod deployment;
pub mod elastic;
pub mod load;
pub mod process;
pub mod proxy;
pub mod raw_peer;
pub mod redis_server;
