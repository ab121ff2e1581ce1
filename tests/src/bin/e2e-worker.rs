//! The `worker` binary, built inside the end-to-end test package.

fn main() -> std::process::ExitCode {
    homeserver::main(server_config::Role::Worker)
}
