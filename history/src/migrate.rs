//! Applies the versioned migrations of [`crate::schema`] and reconciles retention.
//!
//! Safe to run twice and from several relays at once: every step is idempotent on its own
//! (`IF NOT EXISTS`, columns added only when absent, "already exists" races tolerated), and
//! runs under a lock so concurrent starts do not interleave. The lock is a table whose
//! `CREATE` (without `IF NOT EXISTS`) succeeds for exactly one process; a lock left by a
//! crashed process is broken after `migration_lock_timeout` (harmless, the steps being
//! idempotent). Applied versions are recorded in `lumen_schema_migrations` with the flavor;
//! an existing database keeps its flavor when the server is upgraded.

use std::time::{Duration, Instant};

use clickhouse::Client;
use serde::Deserialize;
use tracing::{info, warn};

use crate::config::{HistoryConfig, SchemaChoice};
use crate::error::{exception_code, HistoryError};
use crate::queries;
use crate::schema::{self, tables, Flavor, Step, LATEST_VERSION};

/// What the database holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaInfo {
    pub database: String,
    pub flavor: Flavor,
    /// Highest applied migration (0 when none).
    pub version: u32,
    /// `version()` of the server.
    pub server_version: String,
}

/// A ClickHouse client for `cfg` (RowBinary without schema validation, LZ4 both ways).
pub fn client(cfg: &crate::config::ClickHouseConfig) -> Client {
    let mut c = Client::default()
        .with_url(cfg.url.clone())
        .with_validation(false)
        .with_compression(clickhouse::Compression::Lz4);
    if let Some(u) = &cfg.user {
        c = c.with_user(u.clone());
    }
    if let Some(p) = &cfg.password {
        c = c.with_password(p.clone());
    }
    c
}

async fn exec(
    client: &Client,
    sql: &str,
    timeout: Duration,
) -> Result<(), clickhouse::error::Error> {
    match tokio::time::timeout(timeout, client.query(sql).execute()).await {
        Ok(r) => r,
        Err(_) => Err(clickhouse::error::Error::TimedOut),
    }
}

/// The server's `version()`.
pub async fn server_version(client: &Client) -> Result<String, HistoryError> {
    client
        .query("SELECT version()")
        .fetch_one::<String>()
        .await
        .map_err(HistoryError::ch("reading the server version"))
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct Applied {
    version: u32,
    flavor: String,
}

async fn applied(client: &Client, db: &str) -> Result<Vec<Applied>, HistoryError> {
    let exists: u64 = queries::table_exists(db, tables::MIGRATIONS)
        .to_query(client)
        .fetch_one()
        .await
        .map_err(HistoryError::ch("looking for the migrations table"))?;
    if exists == 0 {
        return Ok(vec![]);
    }
    queries::applied_migrations(db)
        .to_query(client)
        .fetch_all()
        .await
        .map_err(HistoryError::ch("reading applied migrations"))
}

/// Reads the schema state without changing anything.
pub async fn inspect(client: &Client, cfg: &HistoryConfig) -> Result<SchemaInfo, HistoryError> {
    let db = &cfg.clickhouse.database;
    let server_version = server_version(client).await?;
    let applied = applied(client, db).await?;
    let flavor = match applied.first().and_then(|a| Flavor::parse(&a.flavor)) {
        Some(f) => f,
        None => choose_flavor(cfg.schema, &server_version)?,
    };
    Ok(SchemaInfo {
        database: db.clone(),
        flavor,
        version: applied.iter().map(|a| a.version).max().unwrap_or(0),
        server_version,
    })
}

fn choose_flavor(choice: SchemaChoice, server_version: &str) -> Result<Flavor, HistoryError> {
    let natural = Flavor::for_server_version(server_version);
    match choice {
        SchemaChoice::Auto => Ok(natural),
        SchemaChoice::Compat => Ok(Flavor::Compat),
        SchemaChoice::Modern if natural == Flavor::Modern => Ok(Flavor::Modern),
        SchemaChoice::Modern => Err(HistoryError::ServerTooOld {
            flavor: "modern",
            server_version: server_version.to_owned(),
        }),
    }
}

/// Applies every migration (see [`migrate_to`]).
pub async fn migrate(client: &Client, cfg: &HistoryConfig) -> Result<SchemaInfo, HistoryError> {
    migrate_to(client, cfg, LATEST_VERSION).await
}

/// Applies migrations up to `target` and reconciles TTL retention (modern flavor).
pub async fn migrate_to(
    client: &Client,
    cfg: &HistoryConfig,
    target: u32,
) -> Result<SchemaInfo, HistoryError> {
    let db = cfg.clickhouse.database.as_str();
    let timeout = cfg.clickhouse.request_timeout;
    let ddl_err = |statement: &str| {
        let statement = statement.to_owned();
        move |source| HistoryError::Migration {
            version: 0,
            name: "bootstrap",
            statement,
            source,
        }
    };
    for sql in [
        format!("CREATE DATABASE IF NOT EXISTS {db}"),
        schema::create_migrations_table(db),
    ] {
        exec(client, &sql, timeout).await.map_err(ddl_err(&sql))?;
    }
    let owner = format!(
        "pid {} at {:?}",
        std::process::id(),
        std::time::SystemTime::now()
    );
    acquire_lock(client, db, cfg.migration_lock_timeout, timeout).await?;
    let result = apply_locked(client, cfg, target, &owner).await;
    let unlock = format!("DROP TABLE IF EXISTS {db}.{}", tables::LOCK);
    if let Err(e) = exec(client, &unlock, timeout).await {
        warn!(error = %e, "releasing the migration lock failed; the next start waits it out");
    }
    result
}

async fn acquire_lock(
    client: &Client,
    db: &str,
    lock_timeout: Duration,
    timeout: Duration,
) -> Result<(), HistoryError> {
    let create = schema::create_lock_table(db);
    let started = Instant::now();
    loop {
        match exec(client, &create, timeout).await {
            Ok(()) => return Ok(()),
            Err(clickhouse::error::Error::BadResponse(msg)) if exception_code(&msg) == Some(57) => {
                if started.elapsed() > lock_timeout {
                    warn!(
                        waited = ?started.elapsed(),
                        "breaking a migration lock nobody released (a crashed relay?)"
                    );
                    let drop = format!("DROP TABLE IF EXISTS {db}.{}", tables::LOCK);
                    let _ = exec(client, &drop, timeout).await;
                } else {
                    tokio::time::sleep(Duration::from_millis(100 + fastrand::u64(0..200))).await;
                }
            }
            Err(source) => {
                return Err(HistoryError::Migration {
                    version: 0,
                    name: "lock",
                    statement: create,
                    source,
                })
            }
        }
    }
}

async fn column_exists(
    client: &Client,
    db: &str,
    table: &str,
    column: &str,
) -> Result<bool, HistoryError> {
    let n: u64 = queries::column_exists(db, table, column)
        .to_query(client)
        .fetch_one()
        .await
        .map_err(HistoryError::ch("looking up a column"))?;
    Ok(n > 0)
}

async fn apply_locked(
    client: &Client,
    cfg: &HistoryConfig,
    target: u32,
    owner: &str,
) -> Result<SchemaInfo, HistoryError> {
    let db = cfg.clickhouse.database.as_str();
    let timeout = cfg.clickhouse.request_timeout;
    let mut info = inspect(client, cfg).await?;
    if info.version > LATEST_VERSION {
        return Err(HistoryError::SchemaTooNew {
            database: db.to_owned(),
            found: info.version,
            known: LATEST_VERSION,
        });
    }
    for m in schema::migrations(info.flavor, db, &cfg.retention) {
        if m.version <= info.version || m.version > target {
            continue;
        }
        for step in &m.steps {
            let (sql, tolerated): (&str, &[u32]) = match step {
                Step::Sql(sql) => (sql, &[57]),
                Step::AddColumn { table, column, sql } => {
                    if column_exists(client, db, table, column).await? {
                        continue;
                    }
                    (sql, &[15, 44])
                }
            };
            match exec(client, sql, timeout).await {
                Ok(()) => {}
                Err(clickhouse::error::Error::BadResponse(msg))
                    if exception_code(&msg).is_some_and(|c| tolerated.contains(&c)) => {}
                Err(source) => {
                    return Err(HistoryError::Migration {
                        version: m.version,
                        name: m.name,
                        statement: sql.to_owned(),
                        source,
                    })
                }
            }
        }
        queries::record_migration(db, m.version, m.name, info.flavor.as_str(), owner)
            .to_query(client)
            .execute()
            .await
            .map_err(HistoryError::ch("recording a migration"))?;
        info!(
            version = m.version,
            name = m.name,
            flavor = info.flavor.as_str(),
            "applied history migration"
        );
        info.version = m.version;
    }
    if info.flavor == Flavor::Modern && info.version >= 1 {
        reconcile_ttl(client, cfg).await?;
    }
    Ok(info)
}

/// Brings modern tables' TTL in line with the configured retention.
async fn reconcile_ttl(client: &Client, cfg: &HistoryConfig) -> Result<(), HistoryError> {
    let db = cfg.clickhouse.database.as_str();
    for (table, col, days) in cfg.retention.tables() {
        let engine: String = queries::engine_full(db, table)
            .to_query(client)
            .fetch_one()
            .await
            .map_err(HistoryError::ch("reading a table's TTL"))?;
        if !schema::engine_has_ttl(&engine, days) {
            let sql = schema::modify_ttl(db, table, col, days);
            exec(client, &sql, cfg.clickhouse.request_timeout)
                .await
                .map_err(|source| HistoryError::Migration {
                    version: 0,
                    name: "retention",
                    statement: sql.clone(),
                    source,
                })?;
            info!(table, days, "changed history retention");
        }
    }
    Ok(())
}

/// Fails unless the database is at this build's schema version.
pub fn require_current(info: &SchemaInfo) -> Result<(), HistoryError> {
    if info.version < LATEST_VERSION {
        return Err(HistoryError::SchemaTooOld {
            database: info.database.clone(),
            found: info.version,
            needed: LATEST_VERSION,
        });
    }
    if info.version > LATEST_VERSION {
        return Err(HistoryError::SchemaTooNew {
            database: info.database.clone(),
            found: info.version,
            known: LATEST_VERSION,
        });
    }
    Ok(())
}

/// File in the spool directory remembering the database's flavor and version, so a relay
/// restarted while ClickHouse is away can keep spooling rows of the right layout.
pub const SCHEMA_HINT_FILE: &str = "schema";

/// Records `info` in the spool directory (best effort).
pub fn save_schema_hint(spool_dir: &std::path::Path, info: &SchemaInfo) {
    let text = format!(
        "{} {} {}\n",
        info.flavor.as_str(),
        info.version,
        info.database
    );
    let tmp = spool_dir.join(format!("{SCHEMA_HINT_FILE}.tmp"));
    let done = std::fs::create_dir_all(spool_dir)
        .and_then(|()| std::fs::write(&tmp, text))
        .and_then(|()| std::fs::rename(&tmp, spool_dir.join(SCHEMA_HINT_FILE)));
    if let Err(e) = done {
        warn!(error = %e, "cannot record the schema in the spool directory");
    }
}

/// The flavor and version recorded by [`save_schema_hint`] for `database`.
pub fn load_schema_hint(spool_dir: &std::path::Path, database: &str) -> Option<(Flavor, u32)> {
    let text = std::fs::read_to_string(spool_dir.join(SCHEMA_HINT_FILE)).ok()?;
    let mut it = text.split_whitespace();
    let flavor = Flavor::parse(it.next()?)?;
    let version = it.next()?.parse().ok()?;
    (it.next()? == database).then_some((flavor, version))
}
