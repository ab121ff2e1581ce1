//! A worker process: shares the master's PostgreSQL database, writes the streams
//! assigned to it and follows the others.

fn main() -> std::process::ExitCode {
    homeserver::main(server_config::Role::Worker)
}
