//! Project automation, so that local runs and CI run the same steps.
//!
//! - `cargo xtask ci [STEP]`: every check CI runs, in order, or one of them:
//!   `services`, `fmt`, `clippy`, `test`, `docs`, `tidy`, `deps`.
//! - `cargo xtask services`: start PostgreSQL and Redis when they are not running.
//! - `cargo xtask demo`: a four-process deployment, two users talking through it,
//!   and what each process saw (the `tests` package's `demo` binary).
//! - `cargo xtask bench idgen|sqlite|stores|replication|topology|e2e|elastic`: the benchmarks, printed as
//!   ratios against baselines measured in the same run.
//! - `cargo xtask new-migration CRATE NAME`: create the next numbered migration for both
//!   engines.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, format_err};
use xshell::{Shell, cmd};

const STEPS: &[&str] = &["services", "fmt", "clippy", "test", "docs", "tidy", "deps"];
const POSTGRES_ADDRESS: &str = "127.0.0.1:5432";
const REDIS_ADDRESS: &str = "127.0.0.1:6379";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sh = Shell::new()?;
    sh.change_dir(project_root());
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["ci"] => {
            for step in STEPS {
                run_step(&sh, step)?;
            }
            eprintln!("xtask: all CI steps passed");
            Ok(())
        }
        ["ci", step] => run_step(&sh, step),
        ["services"] => services(&sh),
        ["demo"] => demo(&sh),
        ["new-migration", krate, name] => new_migration(krate, name),
        ["bench", target] => bench(&sh, target),
        _ => {
            eprintln!(
                "usage: cargo xtask ci [{}]\n       cargo xtask services\n       cargo xtask demo\n       cargo xtask bench idgen|sqlite|stores|replication|topology|e2e|elastic\n       cargo xtask new-migration CRATE NAME",
                STEPS.join("|")
            );
            bail!("unknown command: {}", args.join(" "))
        }
    }
}

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives one level below the root").to_owned()
}

fn run_step(sh: &Shell, step: &str) -> anyhow::Result<()> {
    eprintln!("xtask: == {step} ==");
    let started = Instant::now();
    match step {
        "services" => services(sh)?,
        "fmt" => cmd!(sh, "cargo fmt --all -- --check")
            .run()
            .context("code is not formatted: run `cargo fmt --all`")?,
        "clippy" => cmd!(sh, "cargo clippy --workspace --all-targets --locked -- -D warnings").run()?,
        "test" => test(sh)?,
        "docs" => {
            let _env = sh.push_env("RUSTDOCFLAGS", "-D warnings");
            cmd!(sh, "cargo doc --workspace --no-deps --locked").run()?;
        }
        "tidy" => tidy()?,
        "deps" => deps(sh)?,
        other => bail!("unknown CI step `{other}`; the steps are {}", STEPS.join(", ")),
    }
    eprintln!("xtask: {step} passed in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Runs the demo, `tests/src/bin/demo.rs`, on the services it needs. It lives in
/// the `tests` package, beside the harness it drives the processes with, so
/// that xtask depends on no crate of the workspace and stays quick to build.
fn demo(sh: &Shell) -> anyhow::Result<()> {
    services(sh)?;
    eprintln!(
        "xtask: building the demo and the binaries it runs (dev profile: quick to build, fast enough for a demo)"
    );
    // The demo runs `e2e-master` and `e2e-worker`, which `cargo run` alone would
    // not build.
    cmd!(sh, "cargo build --quiet -p tests --bins").run().context("build the demo and its binaries")?;
    // The demo has reported its failure, and cleaned up, by the time it exits.
    if cmd!(sh, "cargo run --quiet -p tests --bin demo").run().is_err() {
        std::process::exit(1);
    }
    Ok(())
}

/// Runs a group of benchmarks. They stay out of `ci`: they take minutes and their
/// figures only mean something as the ratios they print.
fn bench(sh: &Shell, target: &str) -> anyhow::Result<()> {
    match target {
        "idgen" => {
            services(sh)?;
            cmd!(sh, "cargo bench --locked -p store-core --bench tracker").run()?;
            cmd!(sh, "cargo bench --locked -p store-core --bench idgen_db").run()?;
            Ok(())
        }
        "sqlite" => {
            cmd!(sh, "cargo bench --locked -p store-core --bench sqlite_engines").run()?;
            Ok(())
        }
        "stores" => {
            services(sh)?;
            cmd!(sh, "cargo bench --locked -p store-events --bench stores").run()?;
            Ok(())
        }
        "replication" => {
            services(sh)?;
            cmd!(sh, "cargo bench --locked -p replication-proto --bench codec").run()?;
            cmd!(sh, "cargo bench --locked -p replication --bench replication").run()?;
            Ok(())
        }
        "topology" => {
            services(sh)?;
            cmd!(sh, "cargo bench --locked -p tests --bench topology").run()?;
            Ok(())
        }
        "e2e" => {
            services(sh)?;
            cmd!(sh, "cargo bench --locked -p tests --bench e2e").run()?;
            Ok(())
        }
        "elastic" => {
            services(sh)?;
            cmd!(sh, "cargo bench --locked -p tests --bench elastic").run()?;
            Ok(())
        }
        other => {
            bail!(
                "unknown benchmark group `{other}`; the groups are: idgen, sqlite, stores, replication, topology, e2e, elastic"
            )
        }
    }
}

/// Runs every test of the workspace, on both engines (each engine-specific test is
/// stamped out for PostgreSQL and SQLite), plus the end-to-end package.
fn test(sh: &Shell) -> anyhow::Result<()> {
    let have_nextest =
        cmd!(sh, "cargo nextest --version").quiet().ignore_stdout().ignore_stderr().run().is_ok();
    if have_nextest {
        cmd!(sh, "cargo nextest run --workspace --locked --no-fail-fast").run()?;
        // nextest does not run doctests.
        cmd!(sh, "cargo test --workspace --locked --doc").run()?;
    } else {
        cmd!(sh, "cargo test --workspace --locked --no-fail-fast --exclude tests").run()?;
        // Whole deployments one at a time, as the nextest config groups them.
        cmd!(sh, "cargo test --locked --no-fail-fast -p tests -- --test-threads=1").run()?;
    }
    Ok(())
}

/// The layers of docs/ARCHITECTURE.md, lowest first, by crate name: a crate
/// named `store-*` is a store crate, so a new one needs no entry here.
fn layer(package: &str) -> (u8, &'static str) {
    match package {
        "replication-proto" => (0, "leaf"),
        "store-core" => (1, "database layer"),
        "server-config" => (2, "config file or store crate"),
        name if name.starts_with("store-") => (2, "config file or store crate"),
        "replication" => (3, "replication"),
        "slaved-stores" => (4, "composition"),
        "homeserver" => (5, "binaries"),
        _ => (6, "tests and tools"),
    }
}

/// What is wrong with `package` depending on `dependency`, both of the
/// workspace, if anything.
fn layering_violation(package: &str, dependency: &str) -> Option<String> {
    let ((own_layer, own_kind), (their_layer, their_kind)) = (layer(package), layer(dependency));
    // Tests and tools may use one another; every other layer only what is below,
    // except that replication knows no store crate: each brings its own stream.
    let allowed = their_layer < own_layer || (own_layer == 6 && their_layer == 6);
    let store_crate_in_replication =
        package == "replication" && dependency.starts_with("store-") && their_layer == 2;
    (!allowed || store_crate_in_replication).then(|| {
        format!(
            "{package} ({own_kind}) depends on {dependency} ({their_kind}): a crate depends only on lower \
             layers, store crates and the config file on none of each other, and replication on no store crate"
        )
    })
}

/// Checks the layering rules of docs/ARCHITECTURE.md: one rule per layer over
/// the workspace's own dependencies (a crate depends only on lower layers; the
/// store crates and replication, side by side, on none of each other), plus
/// the wire protocol's freedom from a runtime and a database.
fn deps(sh: &Shell) -> anyhow::Result<()> {
    let metadata: serde_json::Value = serde_json::from_str(
        &cmd!(sh, "cargo metadata --format-version 1 --no-deps --locked").quiet().read()?,
    )
    .context("cargo metadata prints JSON")?;
    let packages = metadata["packages"].as_array().context("cargo metadata lists packages")?;
    let members: Vec<&str> = packages.iter().filter_map(|package| package["name"].as_str()).collect();
    for package in packages {
        let name = package["name"].as_str().context("a package has a name")?;
        let dependencies = package["dependencies"].as_array().context("a package lists its dependencies")?;
        // Normal and build dependencies: dev-dependencies may reach anywhere.
        let used = dependencies.iter().filter(|dependency| dependency["kind"].as_str() != Some("dev"));
        for dependency in used.filter_map(|dependency| dependency["name"].as_str()) {
            if !members.contains(&dependency) {
                continue;
            }
            if let Some(violation) = layering_violation(name, dependency) {
                bail!("{violation} (see docs/ARCHITECTURE.md)");
            }
        }
    }
    for (dependency, rule) in [("tokio", "no runtime"), ("sqlx", "no database"), ("rusqlite", "no database")]
    {
        // Fails when `dependency` is nowhere in the package's graph; prints
        // nothing when it is there only through dev-dependencies.
        let reachable =
            cmd!(sh, "cargo tree --quiet --locked -p replication-proto -i {dependency} -e normal")
                .quiet()
                .ignore_stderr()
                .read()
                .is_ok_and(|tree| !tree.trim().is_empty());
        if reachable {
            bail!("replication-proto depends on {dependency}: the wire protocol is a leaf, {rule}");
        }
    }
    Ok(())
}

/// Checks what neither rustc nor clippy do: every Rust file opens with a `//!`
/// module doc, and migrations are numbered without gaps, the same for both engines.
fn tidy() -> anyhow::Result<()> {
    let root = project_root();
    let mut missing_docs = Vec::new();
    for dir in ["crates", "examples", "xtask", "tests"] {
        visit_rust_files(&root.join(dir), &mut |path| {
            let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
            if !text.trim_start().starts_with("//!") {
                missing_docs.push(path.strip_prefix(&root).unwrap_or(path).display().to_string());
            }
            Ok(())
        })?;
    }
    if !missing_docs.is_empty() {
        bail!(
            "these files do not start with a `//!` doc saying what they are for: {}",
            missing_docs.join(", ")
        );
    }

    for dir in migration_dirs(&root)? {
        check_migrations(&dir)?;
    }
    Ok(())
}

/// Every `migrations/` folder of a crate (ours and the examples'): each store
/// crate owns its schema.
fn migration_dirs(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for parent in ["crates", "examples"] {
        for entry in std::fs::read_dir(root.join(parent)).with_context(|| format!("read {parent}/"))? {
            let dir = entry?.path().join("migrations");
            if dir.is_dir() {
                dirs.push(dir);
            }
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// One crate's migrations are numbered without gaps, the same for both engines.
fn check_migrations(dir: &Path) -> anyhow::Result<()> {
    let postgres = migration_files(&dir.join("postgres"))?;
    let sqlite = migration_files(&dir.join("sqlite"))?;
    for (engine, files) in [("postgres", &postgres), ("sqlite", &sqlite)] {
        for (idx, (number, name)) in files.iter().enumerate() {
            let expected = u32::try_from(idx + 1)?;
            if *number != expected {
                bail!(
                    "{}/{engine}/{name}: expected number {expected:04}; migrations are numbered without gaps",
                    dir.display()
                );
            }
        }
    }
    if postgres != sqlite {
        bail!("{0}/postgres and {0}/sqlite must hold the same file names", dir.display());
    }
    Ok(())
}

fn visit_rust_files(dir: &Path, visit: &mut dyn FnMut(&Path) -> anyhow::Result<()>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|name| name == "target") {
                continue;
            }
            visit_rust_files(&path, visit)?;
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            visit(&path)?;
        }
    }
    Ok(())
}

/// `(number, file name)` of each `NNNN_name.sql`, sorted.
fn migration_files(dir: &Path) -> anyhow::Result<Vec<(u32, String)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".sql") else {
            bail!("{}/{name}: only .sql files belong here", dir.display());
        };
        let (number, description) = stem
            .split_once('_')
            .ok_or_else(|| format_err!("{}/{name}: expected NNNN_description.sql", dir.display()))?;
        if number.len() != 4 || description.is_empty() {
            bail!("{}/{name}: expected NNNN_description.sql", dir.display());
        }
        let number =
            number.parse::<u32>().with_context(|| format!("{}/{name}: bad number", dir.display()))?;
        files.push((number, name));
    }
    files.sort();
    Ok(files)
}

fn new_migration(krate: &str, name: &str) -> anyhow::Result<()> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
        bail!("a migration name is snake_case, e.g. add_receipts");
    }
    let dir = project_root().join("crates").join(krate);
    if !dir.join("Cargo.toml").is_file() {
        bail!("crates/{krate} is not a crate of this workspace");
    }
    let dir = dir.join("migrations");
    let next = if dir.is_dir() { migration_files(&dir.join("postgres"))?.len() + 1 } else { 1 };
    for engine in ["postgres", "sqlite"] {
        std::fs::create_dir_all(dir.join(engine)).with_context(|| format!("create {}", dir.display()))?;
        let path = dir.join(format!("{engine}/{next:04}_{name}.sql"));
        std::fs::write(&path, format!("-- {name} ({engine}). Explain here why the change is needed.\n"))
            .with_context(|| format!("write {}", path.display()))?;
        eprintln!("created {}", path.display());
    }
    Ok(())
}

/// Starts PostgreSQL and Redis if nothing answers on their ports, and fails with
/// the reason when they cannot be started.
fn services(sh: &Shell) -> anyhow::Result<()> {
    ensure_service(sh, "PostgreSQL", POSTGRES_ADDRESS, start_postgres)?;
    ensure_service(sh, "Redis", REDIS_ADDRESS, start_redis)?;
    Ok(())
}

fn ensure_service(
    sh: &Shell,
    name: &str,
    address: &str,
    start: fn(&Shell) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if answers(address) {
        eprintln!("xtask: {name} is running on {address}");
        return Ok(());
    }
    eprintln!("xtask: {name} is not running on {address}; starting it");
    start(sh).with_context(|| format!("start {name}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if answers(address) {
            eprintln!("xtask: {name} is up on {address}");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("{name} was started but nothing answers on {address} after 30s")
}

fn answers(address: &str) -> bool {
    let address: SocketAddr = address.parse().expect("service addresses are IP:PORT constants");
    TcpStream::connect_timeout(&address, Duration::from_secs(1)).is_ok()
}

fn start_postgres(sh: &Shell) -> anyhow::Result<()> {
    let versions: Vec<String> = std::fs::read_dir("/etc/postgresql")
        .context("PostgreSQL is not installed here (no /etc/postgresql); install it with `apt-get install postgresql`")?
        .filter_map(|entry| entry.ok().map(|entry| entry.file_name().to_string_lossy().into_owned()))
        .collect();
    let version = versions.iter().max().ok_or_else(|| format_err!("/etc/postgresql holds no cluster"))?;
    cmd!(sh, "pg_ctlcluster --skip-systemctl-redirect {version} main start")
        .run()
        .context("pg_ctlcluster could not start the cluster")?;
    Ok(())
}

fn start_redis(sh: &Shell) -> anyhow::Result<()> {
    cmd!(sh, "redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no")
        .run()
        .context("redis-server could not start (is it installed? `apt-get install redis-server`)")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::layering_violation;

    #[test]
    fn each_layer_depends_only_on_lower_ones() {
        for (package, dependency) in [
            ("store-events", "store-core"),
            ("server-config", "store-core"),
            ("store-core", "replication-proto"),
            ("replication", "server-config"),
            ("replication", "store-core"),
            ("slaved-stores", "replication"),
            ("slaved-stores", "store-events"),
            ("homeserver", "slaved-stores"),
            ("tests", "homeserver"),
            ("xtask", "tests"),
        ] {
            assert_eq!(layering_violation(package, dependency), None, "{package} → {dependency}");
        }
    }

    #[test]
    fn upward_and_sideways_dependencies_are_refused() {
        for (package, dependency) in [
            ("store-core", "store-events"),
            ("store-core", "server-config"),
            ("store-events", "server-config"),
            ("replication-proto", "server-config"),
            ("store-events", "store-receipts"),
            ("store-events", "replication"),
            ("replication", "store-events"),
            ("replication", "slaved-stores"),
            ("slaved-stores", "homeserver"),
            ("homeserver", "tests"),
            // A new store crate is one by its name, with no edit to the rules.
            ("store-presence", "store-events"),
            ("replication", "store-presence"),
        ] {
            assert!(layering_violation(package, dependency).is_some(), "{package} → {dependency}");
        }
    }
}
