//! The main process: writes every stream not assigned to a worker; runs alone on
//! embedded SQLite when started without a config.

fn main() -> std::process::ExitCode {
    homeserver::main(server_config::Role::Master)
}
