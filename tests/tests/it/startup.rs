//! The binaries start, serve `/health` and stop cleanly on SIGTERM and SIGINT.

use std::os::unix::process::ExitStatusExt as _;

use store_core::Engine;
use store_test_support::{TestDb, TestResult};

use tests::process::{Binary, Finished, Server, run_to_exit};

fn assert_clean_exit(finished: &Finished) {
    assert!(
        finished.status.success(),
        "expected exit code 0, got {:?} (signal {:?}); stderr:\n{}",
        finished.status.code(),
        finished.status.signal(),
        finished.stderr
    );
    assert!(finished.stderr.contains("shutting down"), "stderr:\n{}", finished.stderr);
}

#[test]
fn master_runs_on_embedded_sqlite_with_no_config() {
    let dir = tempfile::tempdir().expect("temporary directory");
    // No arguments at all: the README's `cargo run --release --bin master`.
    let server = Server::start(Binary::Master, &[], dir.path());
    assert_eq!(server.base_url, "http://127.0.0.1:8008");
    assert!(
        server.startup_line.contains("data in SQLite data/homeserver.db"),
        "the start-up line says where the data is: {}",
        server.startup_line
    );
    assert!(dir.path().join("data/homeserver.db").is_file(), "the database lives under ./data/");
    assert_eq!(server.get("/health"), (200, "OK".to_owned()));
    assert_eq!(server.get("/no-such-page").0, 404);
    assert_clean_exit(&server.stop_with("TERM"));
}

#[test]
fn master_restarts_on_its_data_and_stops_on_sigint() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let args = ["--http-listen", "127.0.0.1:0"];
    let first = Server::start(Binary::Master, &args, dir.path());
    let first_run = first.stop_with("TERM");
    assert_clean_exit(&first_run);
    assert!(first_run.stderr.contains("applied database migrations"), "{}", first_run.stderr);

    let second = Server::start(Binary::Master, &args, dir.path());
    assert_eq!(second.get("/health").0, 200);
    let second_run = second.stop_with("INT");
    assert_clean_exit(&second_run);
    assert!(!second_run.stderr.contains("applied database migrations"), "a restart applies no migration");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_and_worker_run_on_postgres() -> TestResult {
    let test_db = TestDb::new(Engine::Postgres).await?;
    let dir = tempfile::tempdir()?;
    let master = Server::start(
        Binary::Master,
        &["--database-url", &test_db.url, "--http-listen", "127.0.0.1:0"],
        dir.path(),
    );
    assert!(
        master.startup_line.starts_with("master `master` listening on http://127.0.0.1:"),
        "{}",
        master.startup_line
    );
    assert!(master.startup_line.contains("postgres://"), "{}", master.startup_line);

    let worker_config = dir.path().join("worker.toml");
    std::fs::write(
        &worker_config,
        format!(
            "server_name = \"test\"\ninstance_name = \"worker1\"\nworker_replication_secret = \"s\"\n\
             [database]\nurl = \"{}\"\npool_size = 2\n[http]\nlisten = \"127.0.0.1:0\"\n\
             [replication]\nredis = \"redis://127.0.0.1:6379\"\n[instance_map]\nmaster = \"{}\"\n",
            test_db.url,
            master.base_url.trim_start_matches("http://"),
        ),
    )?;
    let worker =
        Server::start(Binary::Worker, &["--config", worker_config.to_str().ok_or("path")?], dir.path());
    assert!(worker.startup_line.starts_with("worker `worker1` listening on"), "{}", worker.startup_line);
    assert_eq!(master.get("/health"), (200, "OK".to_owned()));
    assert_eq!(worker.get("/health"), (200, "OK".to_owned()));
    assert_clean_exit(&worker.stop_with("TERM"));
    assert_clean_exit(&master.stop_with("TERM"));
    Ok(())
}

#[test]
fn help_documents_every_option() {
    let dir = tempfile::tempdir().expect("temporary directory");
    for binary in [Binary::Master, Binary::Worker] {
        let finished = run_to_exit(binary, &["--help"], dir.path());
        assert!(finished.status.success());
        for option in [
            "--config <FILE>",
            "--database-url <URL>",
            "--instance-name <NAME>",
            "--http-listen <IP:PORT>",
            "RUST_LOG",
        ] {
            assert!(finished.stdout.contains(option), "--help lacks {option}:\n{}", finished.stdout);
        }
    }
}
