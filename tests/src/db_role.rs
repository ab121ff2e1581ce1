//! A PostgreSQL role of one test, for running a process as a user whose
//! privileges the test can take away (a real database fault) and give back.
//! The server is shared, so the role is dropped when the guard is, panics
//! included, and roles left by killed runs are dropped by the next.

use store_core::{Database, DatabaseOptions};

/// Every role this harness creates starts with this, then the creating
/// process's id, so that the leftovers of a killed run can be recognised.
const ROLE_PREFIX: &str = "e2e_role_";

/// A `LOGIN` role with what a process needs on one database; dropped with
/// its privileges when this is dropped.
#[derive(Debug)]
pub struct DbRole {
    name: String,
    /// The database, as the superuser that created it.
    admin_url: String,
}

/// Connects to `url` without migrating it: the administration database of
/// the server must stay as it is.
async fn connect(url: &str) -> Result<Database, String> {
    let options = DatabaseOptions { pool_size: 1, run_migrations: false };
    Database::connect_with(url, &options).await.map_err(|err| err.to_string())
}

/// Runs `sql` (statements separated by `;`) on `url`.
fn execute(url: &str, sql: &str) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    runtime.block_on(async {
        let db = connect(url).await?;
        let sql = sql.to_owned();
        let done = db
            .run_autocommit("e2e_role_admin", move |txn| {
                let sql = sql.clone();
                Box::pin(async move { txn.execute_batch(&sql).await })
            })
            .await
            .map_err(|err| err.to_string());
        db.close().await;
        done
    })
}

/// `url` with its user replaced by `user` (and no password).
fn with_user(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let host_and_path = rest.rsplit_once('@').map_or(rest, |(_, host_and_path)| host_and_path);
    format!("{scheme}://{user}@{host_and_path}")
}

impl DbRole {
    /// Creates the role and grants it, on the database at `database_url` (as
    /// its superuser, after the master has created the tables), everything a
    /// process needs: all privileges on every table and sequence of `public`
    /// and the use of the schema.
    pub fn create(database_url: &str) -> DbRole {
        drop_abandoned_roles();
        let name = format!("{ROLE_PREFIX}{}_{}", std::process::id(), crate::deployment::free_port());
        let role = DbRole { name, admin_url: database_url.to_owned() };
        execute(&store_test_support::postgres_admin_url(), &format!("CREATE ROLE {} LOGIN", role.name))
            .unwrap_or_else(|err| panic!("create role {}: {err}", role.name));
        role.as_superuser(&format!(
            "GRANT ALL ON ALL TABLES IN SCHEMA public TO {0};\n\
             GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {0};\n\
             GRANT CREATE, USAGE ON SCHEMA public TO {0}",
            role.name
        ));
        role
    }

    /// The role's name, for `GRANT` and `REVOKE`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The database's URL, connecting as this role.
    pub fn url(&self) -> String {
        with_user(&self.admin_url, &self.name)
    }

    /// Runs `sql` on the database as its superuser (`REVOKE`, `GRANT`).
    pub fn as_superuser(&self, sql: &str) {
        execute(&self.admin_url, sql).unwrap_or_else(|err| panic!("{sql}: {err}"));
    }
}

impl Drop for DbRole {
    fn drop(&mut self) {
        // Its privileges on the database first: a role that holds any cannot
        // be dropped. Nothing to report if the database is already gone.
        let _ = execute(&self.admin_url, &format!("DROP OWNED BY {}", self.name));
        if let Err(err) =
            execute(&store_test_support::postgres_admin_url(), &format!("DROP ROLE IF EXISTS {}", self.name))
        {
            // A panic inside a drop would abort a test already unwinding.
            eprintln!("could not drop the test role {}: {err}", self.name);
        }
    }
}

/// Drops the roles of runs whose process is gone. A role that still holds
/// privileges somewhere stays until its database is dropped too.
fn drop_abandoned_roles() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let names: Vec<String> = runtime.block_on(async {
        let Ok(db) = connect(&store_test_support::postgres_admin_url()).await else {
            return Vec::new();
        };
        let pattern = format!("{ROLE_PREFIX}%");
        let names = db
            .run_autocommit("e2e_list_roles", move |txn| {
                let pattern = pattern.clone();
                Box::pin(async move {
                    let rows = txn
                        .query("SELECT rolname::text FROM pg_roles WHERE rolname LIKE $1", &[&pattern])
                        .await?;
                    rows.iter().map(|row| row.get::<String>(0)).collect::<Result<Vec<_>, _>>()
                })
            })
            .await
            .unwrap_or_default();
        db.close().await;
        names
    });
    for name in names {
        let pid =
            name.trim_start_matches(ROLE_PREFIX).split('_').next().and_then(|pid| pid.parse::<u32>().ok());
        let alive = pid.is_some_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let _ =
                execute(&store_test_support::postgres_admin_url(), &format!("DROP ROLE IF EXISTS {name}"));
        }
    }
}
