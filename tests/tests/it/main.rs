//! End-to-end tests: the real `master` and `worker` binaries as child processes,
//! talking HTTP over loopback, on real SQLite files and a real PostgreSQL.

mod bounds;
mod client;
mod client_api;
mod config_errors;
mod db_role;
mod deployment;
mod exactly_once;
mod faults;
mod process;
mod proxy;
mod raw_peer;
mod redis_server;
mod startup;
mod topology;
mod trust;
