//! Table-driven tests: each case is a config text and the one line it must produce.

use super::*;

/// The streams whose client writes the reference server forwards.
const FORWARDED: [&str; 3] = ["events", "receipts", "typing"];

const WORKER_BASE: &str = r#"
server_name = "example.com"
instance_name = "worker1"
worker_replication_secret = "s"
[database]
url = "postgres://postgres@127.0.0.1/test"
[replication]
master = "127.0.0.1:9093"
"#;

fn check_err(role: Role, text: &str, expected: &str) {
    match ServerConfig::from_toml_str(text, role) {
        Ok(config) => panic!("expected an error containing {expected:?}, got {config:?}"),
        Err(err) => {
            let line = err.to_string();
            assert!(!line.contains('\n'), "error spans several lines: {line:?}");
            assert!(line.contains(expected), "{line:?} does not contain {expected:?}");
        }
    }
}

#[test]
fn minimal_master_file_gets_defaults() {
    let config = ServerConfig::from_toml_str("server_name = \"example.com\"", Role::Master).unwrap();
    assert_eq!(config.instance_name, "master");
    assert_eq!(config.database.url, DEFAULT_SQLITE_URL);
    assert_eq!(config.database.pool_size, 10);
    assert_eq!(config.http.listen.to_string(), DEFAULT_HTTP_LISTEN);
    assert!(config.is_writer_for("events"));
    assert_eq!(config.caches.size_of("anything"), 10_000);
}

#[test]
fn worker_with_writers_parses() {
    let text = format!(
        "{WORKER_BASE}\n[stream_writers]\nevents = [\"worker1\", \"worker2\"]\n[instance_map]\nmaster = \"127.0.0.1:8008\"\nworker1 = \"127.0.0.1:8101\"\nworker2 = \"127.0.0.1:8102\"\n[caches]\ndefault_size = 5\nsizes = {{ get_event = 50 }}\n"
    );
    let config = ServerConfig::from_toml_str(&text, Role::Worker).unwrap();
    assert!(config.is_writer_for("events"));
    assert!(!config.is_writer_for("receipts"));
    assert_eq!(config.writers_for("events"), ["worker1", "worker2"]);
    assert_eq!(config.caches.size_of("get_event"), 50);
    assert_eq!(config.caches.size_of("other"), 5);
}

#[test]
fn bad_files_give_one_clear_line() {
    let cases: &[(Role, &str, &str)] = &[
        (Role::Master, "server_name = \"a\"\nbogus = 1\n", "line 2 column 1: unknown field `bogus`"),
        (Role::Master, "instance_name = \"master\"\n", "missing field `server_name`"),
        (Role::Master, "server_name = \"a\"\n[database]\npool = 3\n", "unknown field `pool`"),
        (Role::Master, "server_name = 3\n", "invalid type"),
        (Role::Master, "server_name = \n", "line 1"),
        (Role::Master, "server_name = \"a\"\ninstance_name = \"w\"\n", "must be named `master`"),
        (
            Role::Master,
            "server_name = \"a\"\n[http]\nlisten = \"localhost\"\n",
            "is not an IP address and port",
        ),
        (
            Role::Master,
            "server_name = \"a\"\n[database]\nurl = \"sqlite::memory:\"\npool_size = 0\n",
            "pool_size` must be at least 1",
        ),
        (
            Role::Master,
            "server_name = \"a\"\n[stream_writers]\ntyping = [\"persister1\"]\n",
            "names `persister1`, which is not in `[instance_map]`",
        ),
        (Role::Master, "server_name = \"a\"\n[http]\nadvertise = \"nohost\"\n", "`[http] advertise`"),
        (
            Role::Master,
            "server_name = \"a\"\n[stream_writers]\nevents = []\n",
            "`[stream_writers] events` is empty",
        ),
        (Role::Master, "server_name = \"a\"\n[instance_map]\nw = \"nohost\"\n", "is not HOST:PORT"),
        (Role::Master, "server_name = \"a\"\n[replication]\nmaster = \"127.0.0.1:1\"\n", "is for workers"),
        (
            Role::Worker,
            "server_name = \"a\"\n[database]\nurl = \"postgres://x\"\n",
            "missing `instance_name`",
        ),
        (Role::Worker, "server_name = \"a\"\ninstance_name = \"w\"\n", "missing `[database] url`"),
        (
            Role::Worker,
            "server_name = \"a\"\ninstance_name = \"master\"\n[database]\nurl = \"postgres://x\"\n",
            "cannot be named `master`",
        ),
        (
            Role::Worker,
            "server_name = \"a\"\ninstance_name = \"w\"\n[database]\nurl = \"sqlite://x.db\"\n",
            "workers need PostgreSQL",
        ),
        (
            Role::Worker,
            "server_name = \"a\"\ninstance_name = \"w\"\n[database]\nurl = \"postgres://x\"\n",
            "a worker needs `[replication] master",
        ),
        (
            Role::Worker,
            "server_name = \"a\"\ninstance_name = \"w\"\n[database]\nurl = \"postgres://x\"\n[replication]\nmaster = \"h:1\"\nredis = \"redis://h\"\n",
            "choose one transport",
        ),
        (
            Role::Worker,
            "server_name = \"a\"\ninstance_name = \"w\"\n[database]\nurl = \"postgres://x\"\n[replication]\nredis = \"http://h\"\n",
            "is not a redis:// or rediss:// URL",
        ),
        (
            Role::Worker,
            "server_name = \"a\"\ninstance_name = \"w\"\n[database]\nurl = \"postgres://x\"\n[replication]\nredis = \"redis://cache.internal:6379\"\n",
            "names cache.internal, another host, without a password",
        ),
        (
            Role::Master,
            "server_name = \"a\"\n[replication]\nlisten = \"127.0.0.1:9093\"\n",
            "`[replication] listen` needs `worker_replication_secret`",
        ),
        (
            Role::Worker,
            "server_name = \"a\"\ninstance_name = \"w\"\n[database]\nurl = \"postgres://x\"\n[replication]\nmaster = \"127.0.0.1:9093\"\n",
            "`[replication] master` needs `worker_replication_secret`",
        ),
        (
            Role::Master,
            "server_name = \"a\"\nworker_replication_secret = \" \"\n[replication]\nlisten = \"127.0.0.1:9093\"\n",
            "`worker_replication_secret` is empty",
        ),
        (
            Role::Master,
            "server_name = \"a\"\nworker_replication_secret = \"s\"\n[replication]\nlisten = \"127.0.0.1:9093\"\nmax_connections = 0\n",
            "max_connections` must be at least 1",
        ),
        (
            Role::Worker,
            "server_name = \"a\"\ninstance_name = \"my worker\"\n[database]\nurl = \"postgres://x\"\n[replication]\nredis = \"redis://127.0.0.1\"\n",
            "`instance_name` holds whitespace or a control character",
        ),
        (
            Role::Worker,
            "server_name = \"a\"\ninstance_name = \"w\\u0007\"\n[database]\nurl = \"postgres://x\"\n[replication]\nredis = \"redis://127.0.0.1\"\n",
            "`instance_name` holds whitespace or a control character",
        ),
        (
            Role::Master,
            "server_name = \"a\"\n[stream_writers]\nevents = [\"p 1\"]\n[instance_map]\n\"p 1\" = \"127.0.0.1:1\"\n",
            "holds whitespace",
        ),
        (
            Role::Master,
            "server_name = \"a\"\n[replication]\nping_interval_ms = 5000\nping_timeout_ms = 1000\n",
            "must be longer than `ping_interval_ms`",
        ),
        (
            Role::Master,
            "server_name = \"a\"\n[replication]\nmax_pending = 0\n",
            "max_pending` must be at least 1",
        ),
    ];
    for (role, text, expected) in cases {
        check_err(*role, text, expected);
    }
}

#[test]
fn cache_byte_budgets_default_override_and_refuse_zero() {
    let config = ServerConfig::from_toml_str("server_name = \"a\"", Role::Master).unwrap();
    assert_eq!(config.caches.max_bytes_of("anything"), 64 * 1024 * 1024);
    let text = "server_name = \"a\"\n[caches]\ndefault_max_bytes = 1000\nmax_bytes = { get_event = 5000 }\n";
    let config = ServerConfig::from_toml_str(text, Role::Master).unwrap();
    assert_eq!(config.caches.max_bytes_of("get_event"), 5000);
    assert_eq!(config.caches.max_bytes_of("other"), 1000);
    // Zero would make a cache that caches nothing: a typo, not a choice.
    check_err(
        Role::Master,
        "server_name = \"a\"\n[caches]\ndefault_max_bytes = 0\n",
        "`[caches] default_max_bytes` must be at least 1",
    );
    check_err(
        Role::Master,
        "server_name = \"a\"\n[caches]\nmax_bytes = { get_event = 0 }\n",
        "`[caches] max_bytes.get_event` must be at least 1",
    );
}

#[test]
fn duplicate_writer_is_refused() {
    let text = format!(
        "{WORKER_BASE}\n[stream_writers]\nevents = [\"worker1\", \"worker1\"]\n[instance_map]\nworker1 = \"h:1\"\n"
    );
    check_err(Role::Worker, &text, "lists `worker1` twice");
}

#[test]
fn overrides_replace_file_values_before_validation() {
    let dir = std::env::temp_dir().join(format!("server-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("worker.toml");
    std::fs::write(&path, format!("{WORKER_BASE}[instance_map]\nmaster = \"127.0.0.1:8008\"\n")).unwrap();
    let overrides = Overrides {
        database_url: Some("postgres://other@127.0.0.1/db".to_owned()),
        instance_name: Some("worker9".to_owned()),
        http_listen: Some("127.0.0.1:9999".to_owned()),
    };
    let config = ServerConfig::load(&path, Role::Worker, &overrides).unwrap();
    assert_eq!(config.database.url, "postgres://other@127.0.0.1/db");
    assert_eq!(config.instance_name, "worker9");
    assert_eq!(config.http.listen.port(), 9999);

    // An override is validated like the file's own value.
    let bad = Overrides { instance_name: Some("master".to_owned()), ..Overrides::default() };
    let err = ServerConfig::load(&path, Role::Worker, &bad).unwrap_err().to_string();
    assert!(err.starts_with(&format!("config file {}", path.display())), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_file_names_the_path() {
    let err =
        ServerConfig::load(Path::new("/nonexistent/homeserver.toml"), Role::Master, &Overrides::default())
            .unwrap_err()
            .to_string();
    assert!(err.starts_with("cannot read config file /nonexistent/homeserver.toml:"), "{err}");
}

#[test]
fn workers_cannot_run_without_a_file() {
    let err = ServerConfig::defaults(Role::Worker, &Overrides::default()).unwrap_err().to_string();
    assert!(err.contains("a worker needs a config file"), "{err}");
    let master = ServerConfig::defaults(Role::Master, &Overrides::default()).unwrap();
    assert_eq!(master.database.url, DEFAULT_SQLITE_URL);
}

#[test]
fn the_example_configs_are_valid() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/examples");
    for (file, role) in
        [("master.toml", Role::Master), ("persister.toml", Role::Worker), ("worker.toml", Role::Worker)]
    {
        let config = ServerConfig::load(&examples.join(file), role, &Overrides::default())
            .unwrap_or_else(|err| panic!("docs/examples/{file}: {err}"));
        assert_eq!(config.server_name, "example.com");
        config
            .check_client_forwarding(&FORWARDED)
            .unwrap_or_else(|err| panic!("docs/examples/{file} cannot serve clients: {err}"));
    }
}

#[test]
fn serving_clients_needs_the_secret_and_the_writers_addresses() {
    let cases: &[(Role, &str, &str)] = &[
        (
            Role::Master,
            "server_name = \"a\"\n[stream_writers]\nevents = [\"p1\"]\n[instance_map]\np1 = \"127.0.0.1:1\"\n",
            "`p1` writes `events`, so this process forwards client writes to it, which needs `worker_replication_secret`",
        ),
        (
            Role::Worker,
            "server_name = \"a\"\ninstance_name = \"w\"\nworker_replication_secret = \"s\"\n[database]\nurl = \"postgres://p@h/d\"\n[replication]\nmaster = \"127.0.0.1:1\"\n",
            "`master` writes `events`, but `[instance_map]` has no address for it",
        ),
    ];
    for (role, text, expected) in cases {
        let config = ServerConfig::from_toml_str(text, *role).expect("valid for storage and replication");
        let err =
            config.check_client_forwarding(&FORWARDED).expect_err("not enough to serve clients").to_string();
        assert!(err.contains(expected), "{err:?} does not contain {expected:?}");
    }
    // Writers other than the master record their addresses in the database.
    let found_in_the_database = ServerConfig::from_toml_str(
        "server_name = \"a\"\nworker_replication_secret = \"s\"\n[stream_writers]\nevents = [\"p1\", \"p2\"]\n",
        Role::Master,
    )
    .expect("valid");
    assert!(found_in_the_database.check_client_forwarding(&FORWARDED).is_ok());
    let monolith = ServerConfig::from_toml_str("server_name = \"a\"", Role::Master).expect("valid");
    assert!(monolith.check_client_forwarding(&FORWARDED).is_ok(), "the monolith writes everything itself");
}

#[test]
fn redis_urls_take_credentials_tls_and_loopback_hosts() {
    let worker = |url: &str| {
        ServerConfig::from_toml_str(
            &format!(
                "server_name = \"a\"\ninstance_name = \"w\"\n[database]\nurl = \"postgres://x\"\n[replication]\nredis = \"{url}\"\n"
            ),
            Role::Worker,
        )
    };
    for url in [
        "redis://127.0.0.1:6379",
        "redis://localhost",
        "redis://[::1]:6379/2",
        "redis://:pw@cache.internal:6379",
        "redis://user:pw@cache.internal/3",
        "rediss://user:pw@cache.internal:6380",
        "rediss://127.0.0.1",
    ] {
        worker(url).unwrap_or_else(|err| panic!("{url}: {err}"));
    }
    for url in ["redis://cache.internal", "rediss://user@cache.internal", "redis://10.0.0.5:6379"] {
        let err = worker(url).expect_err(url).to_string();
        assert!(err.contains("without a password"), "{url}: {err}");
    }
}

#[test]
fn secrets_never_reach_debug_or_errors() {
    let text = "server_name = \"a\"\ninstance_name = \"w\"\nworker_replication_secret = \"hunter2\"\n\
                [database]\nurl = \"postgres://u:dbpass@h/d?password=qpass\"\n\
                [replication]\nredis = \"redis://:redispass@cache.internal:6379\"\n";
    let config = ServerConfig::from_toml_str(text, Role::Worker).expect("valid");
    let shown = format!("{config:?}");
    for secret in ["hunter2", "dbpass", "qpass", "redispass"] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    let overrides =
        Overrides { database_url: Some("postgres://u:dbpass@h/d".to_owned()), ..Overrides::default() };
    assert!(!format!("{overrides:?}").contains("dbpass"));
    let refused = text.replace(":redispass@", "@");
    let err = ServerConfig::from_toml_str(&refused, Role::Worker).expect_err("no password").to_string();
    assert!(!err.contains("hunter2") && !err.contains("dbpass"), "{err}");
}

#[test]
fn urls_are_redacted_in_user_info_and_query() {
    let cases = [
        ("postgres://alice:s3cret@db:5432/synapse", "postgres://alice:***@db:5432/synapse"),
        ("postgres://alice@db/synapse", "postgres://alice@db/synapse"),
        ("postgres://db/synapse?user=a", "postgres://db/synapse?user=a"),
        ("postgres://db/synapse?user=a&password=s3cret", "postgres://db/synapse?user=a&password=***"),
        ("postgres://db/synapse?PASSWORD=s3cret&x=1", "postgres://db/synapse?PASSWORD=***&x=1"),
        ("sqlite://data/homeserver.db", "sqlite://data/homeserver.db"),
        ("sqlite::memory:", "sqlite::memory:"),
        ("postgres://a:b@c@host/db", "postgres://a:***@c@host/db"),
        ("postgres://u:pa/ss?x@db/x", "postgres://u:***@db/x"),
        ("rediss://:pw@cache:6380/0", "rediss://:***@cache:6380/0"),
    ];
    for (url, expected) in cases {
        assert_eq!(redact_url(url), expected, "{url}");
    }
}

#[test]
fn registration_is_open_only_on_the_loopback_monolith_unless_the_file_says() {
    let monolith = ServerConfig::from_toml_str("server_name = \"a\"", Role::Master).unwrap();
    assert!(monolith.enable_registration, "SQLite on loopback: someone trying it out");
    let public =
        ServerConfig::from_toml_str("server_name = \"a\"\n[http]\nlisten = \"0.0.0.0:8008\"\n", Role::Master)
            .unwrap();
    assert!(!public.enable_registration);
    let worker = ServerConfig::from_toml_str(WORKER_BASE, Role::Worker).unwrap();
    assert!(!worker.enable_registration, "PostgreSQL: a deployment");
    let opened =
        ServerConfig::from_toml_str(&format!("enable_registration = true\n{WORKER_BASE}"), Role::Worker)
            .unwrap();
    assert!(opened.enable_registration);
    let closed =
        ServerConfig::from_toml_str("server_name = \"a\"\nenable_registration = false\n", Role::Master)
            .unwrap();
    assert!(!closed.enable_registration);
}

#[test]
fn registration_secrets_and_public_urls_are_checked() {
    check_err(
        Role::Master,
        "server_name = \"a\"\nregistration_shared_secret = \" \"\n",
        "`registration_shared_secret` is empty",
    );
    check_err(
        Role::Master,
        "server_name = \"a\"\n[http]\npublic_baseurl = \"matrix.example\"\n",
        "`[http] public_baseurl` \"matrix.example\" is not an http(s):// URL",
    );
    let config = ServerConfig::from_toml_str(
        "server_name = \"a\"\nregistration_shared_secret = \"hush\"\n[http]\npublic_baseurl = \"https://m.example\"\n",
        Role::Master,
    )
    .unwrap();
    assert!(!format!("{config:?}").contains("hush"), "the secret stays out of Debug");
    assert_eq!(config.http.public_baseurl.as_deref(), Some("https://m.example"));
}

#[test]
fn the_advertised_address_is_the_listener_unless_it_is_a_wildcard() {
    let advertised = |http: &str| {
        let text = format!("server_name = \"a\"\n[http]\n{http}\n");
        let http = ServerConfig::from_toml_str(&text, Role::Master).expect("valid").http;
        http.advertised(http.listen)
    };
    assert_eq!(advertised("listen = \"127.0.0.1:8008\""), Some("127.0.0.1:8008".to_owned()));
    assert_eq!(advertised("listen = \"0.0.0.0:8008\""), None);
    assert_eq!(advertised("listen = \"[::]:8008\""), None);
    assert_eq!(
        advertised("listen = \"0.0.0.0:8008\"\nadvertise = \"persister1.internal:8008\""),
        Some("persister1.internal:8008".to_owned())
    );
}
