//! Bad config and bad database URLs: one clear line on stderr and a non-zero exit.

use tests::process::{Binary, run_to_exit};

/// Runs `binary` with `args` (and `config` written to `homeserver.toml`, if
/// given) and checks it fails with exactly one line containing `expected`.
fn check(binary: Binary, config: Option<&str>, args: &[&str], expected: &str) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut all_args: Vec<String> = Vec::new();
    if let Some(config) = config {
        let path = dir.path().join("homeserver.toml");
        std::fs::write(&path, config).expect("write the config");
        all_args.extend(["--config".to_owned(), path.display().to_string()]);
    }
    all_args.extend(args.iter().map(|arg| (*arg).to_owned()));
    let all_args: Vec<&str> = all_args.iter().map(String::as_str).collect();
    let finished = run_to_exit(binary, &all_args, dir.path());
    assert_eq!(finished.status.code(), Some(1), "{all_args:?} must fail; stderr:\n{}", finished.stderr);
    let lines: Vec<&str> = finished.stderr.lines().filter(|line| !line.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{all_args:?}: expected one line on stderr, got:\n{}", finished.stderr);
    assert!(lines[0].starts_with("error: "), "{:?}", lines[0]);
    assert!(lines[0].contains(expected), "{:?} lacks {expected:?}", lines[0]);
    assert!(finished.stdout.is_empty(), "nothing on stdout: {:?}", finished.stdout);
}

#[test]
fn unknown_keys_are_refused_with_their_position() {
    check(
        Binary::Master,
        Some("server_name = \"a\"\nlisten = 1\n"),
        &[],
        "line 2 column 1: unknown field `listen`",
    );
    check(Binary::Master, Some("server_name = \"a\"\n[http]\nport = 1\n"), &[], "unknown field `port`");
}

#[test]
fn missing_required_fields_are_named() {
    check(Binary::Master, Some("instance_name = \"master\"\n"), &[], "missing field `server_name`");
    check(
        Binary::Worker,
        Some("server_name = \"a\"\ninstance_name = \"w1\"\n[replication]\nredis = \"redis://127.0.0.1\"\n"),
        &[],
        "missing `[database] url`",
    );
    check(Binary::Worker, None, &[], "a worker needs a config file");
}

/// Writers are found through the database, but the followers of typing fetch
/// from its writer's `[instance_map]` address.
#[test]
fn a_typing_writer_missing_from_the_instance_map_is_refused() {
    check(
        Binary::Master,
        Some(
            "server_name = \"a\"\n[stream_writers]\ntyping = [\"persister1\"]\n[instance_map]\nmaster = \"127.0.0.1:8008\"\n",
        ),
        &[],
        "`[stream_writers] typing` names `persister1`, which is not in `[instance_map]`",
    );
}

#[test]
fn a_missing_config_file_is_named() {
    check(
        Binary::Master,
        None,
        &["--config", "/nonexistent/homeserver.toml"],
        "cannot read config file /nonexistent/homeserver.toml",
    );
}

#[test]
fn bad_database_urls_are_refused() {
    check(
        Binary::Master,
        None,
        &["--database-url", "mysql://root@localhost/db"],
        "invalid database URL mysql://root@localhost/db",
    );
    check(
        Binary::Master,
        None,
        &["--database-url", "postgres://synapse:hunter2@127.0.0.1:1/synapse"],
        "cannot connect to PostgreSQL at 127.0.0.1:1/synapse",
    );
    check(
        Binary::Master,
        None,
        &["--database-url", "sqlite:///nonexistent-dir/x/homeserver.db"],
        "the directory /nonexistent-dir/x does not exist",
    );
    check(
        Binary::Worker,
        Some("server_name = \"a\"\ninstance_name = \"w1\"\n[database]\nurl = \"sqlite://x.db\"\n"),
        &[],
        "workers need PostgreSQL",
    );
}

#[test]
fn bad_flags_are_refused() {
    check(Binary::Master, None, &["--http-listen", "not-an-address"], "is not an IP address and port");
    check(Binary::Master, None, &["--instance-name", "worker1"], "must be named `master`");
}

#[test]
fn a_port_in_use_is_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let address = taken.local_addr().expect("local address").to_string();
    check(Binary::Master, None, &["--http-listen", &address], &format!("listen for HTTP on {address}"));
}
