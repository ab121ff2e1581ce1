//! The master of a deployment with presence: the reference server's master on
//! the `PresenceServerStore` composition, with the presence endpoints.

fn main() -> std::process::ExitCode {
    homeserver::main_with::<presence_server::PresenceServerStore, _>(
        server_config::Role::Master,
        presence_server::routes,
    )
}
