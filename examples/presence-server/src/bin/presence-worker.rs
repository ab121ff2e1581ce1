//! A worker of a deployment with presence: the reference server's worker on
//! the `PresenceServerStore` composition, with the presence endpoints.

fn main() -> std::process::ExitCode {
    homeserver::main_with::<presence_server::PresenceServerStore, _>(
        server_config::Role::Worker,
        presence_server::routes,
    )
}
