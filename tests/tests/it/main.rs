//! End-to-end tests: the real `master` and `worker` binaries as child processes,
//! talking HTTP over loopback, on real SQLite files and a real PostgreSQL. The
//! harness they drive them with is the package's library (`tests/src/`).

mod accounts;
mod bounds;
mod client_api;
mod config_errors;
mod elastic;
mod exactly_once;
mod faults;
mod first_client;
mod group_commit;
mod history;
mod permissions;
mod startup;
mod topology;
mod trust;
