//! End-to-end tests: the real `master` and `worker` binaries as child processes,
//! talking HTTP over loopback, on real SQLite files and a real PostgreSQL.

mod client;
mod client_api;
mod config_errors;
mod deployment;
mod exactly_once;
mod process;
mod startup;
mod topology;
