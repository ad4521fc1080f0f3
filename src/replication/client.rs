//! The walsender connection before streaming: connect, `IDENTIFY_SYSTEM`, slot
//! commands, plain SQL, and `START_REPLICATION`.

use std::future::Future;
use std::time::Duration;

use postgres_protocol::message::frontend;

use super::auth::authenticate;
use super::coalesce::Coalescer;
use super::command::{self, SnapshotAction};
use super::config::PgConfig;
use super::connection::{Backend, Connection, parse_server_version};
use super::error::ReplicationError;
use super::stream::ReplicationStream;
use super::tls;
use crate::lsn::Lsn;

/// What `IDENTIFY_SYSTEM` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemInfo {
    /// The cluster's unique system identifier.
    pub systemid: String,
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlogpos: Lsn,
    /// The database this connection is bound to (`replication=database`).
    pub dbname: Option<String>,
}

/// A slot as `CREATE_REPLICATION_SLOT` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSlot {
    pub slot_name: String,
    /// The first LSN the slot will stream; the exported snapshot shows the
    /// database exactly as of this point.
    pub consistent_point: Lsn,
    /// Set with [`SnapshotAction::Export`].
    pub snapshot_name: Option<String>,
    pub output_plugin: String,
}

/// A connection to a walsender (`replication=database`), ready for commands.
pub struct ReplicationClient {
    conn: Connection,
    server_version_num: u32,
    command_timeout: Duration,
    slot_creation_timeout: Duration,
    /// Set while a command is in flight; still set after a timeout or I/O error
    /// cut it short, when the protocol state is unknown and the connection must
    /// not be reused.
    busy: bool,
}

impl std::fmt::Debug for ReplicationClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationClient")
            .field("server_version_num", &self.server_version_num)
            .field("command_timeout", &self.command_timeout)
            .finish_non_exhaustive()
    }
}

impl ReplicationClient {
    /// Default bound on one command round trip.
    pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
    /// Default bound on `CREATE_REPLICATION_SLOT`, which waits for every
    /// transaction running at that moment to finish: a long Odoo cron job can
    /// hold it up for a long time.
    pub const DEFAULT_SLOT_CREATION_TIMEOUT: Duration = Duration::from_secs(30 * 60);

    /// Connects with `replication=database`, the session settings of
    /// [`super::config::SESSION_SETTINGS`] and `client_encoding=UTF8`.
    /// `cfg.connect_timeout` bounds TCP, TLS, authentication and startup together.
    pub async fn connect(cfg: &PgConfig) -> Result<Self, ReplicationError> {
        // Configuration problems are reported before any I/O.
        let tls_config = tls::client_config(cfg)?;
        let what = || format!("connecting to {}:{}", cfg.host, cfg.port);
        let conn = tokio::time::timeout(cfg.connect_timeout, async {
            let mut conn = Connection::open(cfg, tls_config).await?;
            conn.startup(cfg, Some("database")).await?;
            authenticate(&mut conn, cfg).await?;
            wait_ready(&mut conn).await?;
            Ok::<_, ReplicationError>(conn)
        })
        .await
        .map_err(|_| ReplicationError::Timeout {
            what: what(),
            after: cfg.connect_timeout,
        })??;
        let version = conn
            .params
            .get("server_version")
            .cloned()
            .unwrap_or_default();
        let server_version_num = parse_server_version(&version).ok_or_else(|| {
            ReplicationError::Protocol(format!(
                "cannot read the server version from server_version {version:?}"
            ))
        })?;
        tracing::debug!(host = %cfg.host, port = cfg.port, db = %cfg.dbname, server_version_num, "replication connection established");
        Ok(ReplicationClient {
            conn,
            server_version_num,
            command_timeout: Self::DEFAULT_COMMAND_TIMEOUT,
            slot_creation_timeout: Self::DEFAULT_SLOT_CREATION_TIMEOUT,
            busy: false,
        })
    }

    /// The server's version as `server_version_num` would report it (150019).
    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    /// A server parameter reported at startup (`server_version`, `TimeZone`,
    /// `DateStyle`, `integer_datetimes`, ...).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.conn.params.get(name).map(String::as_str)
    }

    /// Bounds each command round trip (default [`Self::DEFAULT_COMMAND_TIMEOUT`]);
    /// also used for the status updates of the stream this client turns into.
    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.command_timeout = timeout;
    }

    /// Bounds `CREATE_REPLICATION_SLOT` (default
    /// [`Self::DEFAULT_SLOT_CREATION_TIMEOUT`]).
    pub fn set_slot_creation_timeout(&mut self, timeout: Duration) {
        self.slot_creation_timeout = timeout;
    }

    /// `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<SystemInfo, ReplicationError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = single_row(&rows, "IDENTIFY_SYSTEM", 4)?;
        let systemid = required(row, 0, "IDENTIFY_SYSTEM", "systemid")?.to_string();
        let timeline = required(row, 1, "IDENTIFY_SYSTEM", "timeline")?
            .parse::<u32>()
            .map_err(|_| unexpected("IDENTIFY_SYSTEM", "timeline is not a number"))?;
        let xlogpos = parse_lsn(
            required(row, 2, "IDENTIFY_SYSTEM", "xlogpos")?,
            "IDENTIFY_SYSTEM",
        )?;
        Ok(SystemInfo {
            systemid,
            timeline,
            xlogpos,
            dbname: row[3].clone(),
        })
    }

    /// `CREATE_REPLICATION_SLOT name [TEMPORARY] LOGICAL pgoutput` with the given
    /// snapshot action. A temporary slot disappears when this connection closes.
    pub async fn create_logical_slot(
        &mut self,
        name: &str,
        temporary: bool,
        snapshot: SnapshotAction,
    ) -> Result<CreatedSlot, ReplicationError> {
        let sql = command::create_logical_slot(name, temporary, snapshot, self.server_version_num)?;
        let timeout = self.slot_creation_timeout;
        let rows = self
            .with_timeout(
                timeout,
                format!("creating replication slot {name:?}"),
                |c| c.run_query(sql),
            )
            .await?;
        let row = single_row(&rows, "CREATE_REPLICATION_SLOT", 4)?;
        const CMD: &str = "CREATE_REPLICATION_SLOT";
        Ok(CreatedSlot {
            slot_name: required(row, 0, CMD, "slot_name")?.to_string(),
            consistent_point: parse_lsn(required(row, 1, CMD, "consistent_point")?, CMD)?,
            snapshot_name: row[2].clone(),
            output_plugin: required(row, 3, CMD, "output_plugin")?.to_string(),
        })
    }

    /// `DROP_REPLICATION_SLOT name [WAIT]`. With `wait`, a slot that another
    /// connection is using is dropped once that connection lets go (bounded by the
    /// command timeout); without, that case is an error (SQLSTATE 55006).
    pub async fn drop_slot(&mut self, name: &str, wait: bool) -> Result<(), ReplicationError> {
        let sql = command::drop_slot(name, wait)?;
        self.simple_query(&sql).await.map(|_| ())
    }

    /// Runs SQL (or a replication command) with the simple query protocol and
    /// returns the rows of all its statements as text (`None` for NULL). The first
    /// server error is returned after the server is ready again, so the client
    /// stays usable.
    pub async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        let timeout = self.command_timeout;
        let sql = sql.to_string();
        let what = format!("query {}", abbreviate(&sql));
        self.with_timeout(timeout, what, |c| c.run_query(sql)).await
    }

    /// `START_REPLICATION SLOT slot LOGICAL start (options)` and switch to
    /// streaming. `options` are pgoutput's (`proto_version`, `publication_names`
    /// — see [`super::publication_names_value`] — `messages`, `streaming`, ...);
    /// names and values are quoted here.
    pub async fn start_logical_replication(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, &str)],
    ) -> Result<ReplicationStream, ReplicationError> {
        let sql = command::start_logical_replication(slot, start, options)?;
        let timeout = self.command_timeout;
        self.with_timeout(
            timeout,
            format!("starting replication from slot {slot:?}"),
            |c| c.start_copy_both(sql),
        )
        .await?;
        tracing::debug!(slot, %start, "logical replication started");
        let mut reader = self.conn.reader;
        // Linux only: lowering SO_RCVLOWAT signals queued bytes at once there
        // (tcp_set_rcvlowat); other kernels are not known to, so they read plainly.
        reader.coalesce(cfg!(target_os = "linux").then(|| Coalescer::new(self.conn.socket)));
        Ok(ReplicationStream::new(
            reader,
            self.conn.writer,
            self.command_timeout,
        ))
    }

    /// Ends the session politely (`Terminate`). Dropping the client closes the
    /// socket too; this just spares the server log a "connection reset" line.
    pub async fn close(self) {
        let _ = tokio::time::timeout(self.command_timeout, self.conn.terminate()).await;
    }

    async fn with_timeout<'a, T, F, Fut>(
        &'a mut self,
        timeout: Duration,
        what: String,
        op: F,
    ) -> Result<T, ReplicationError>
    where
        F: FnOnce(&'a mut Connection) -> Fut,
        Fut: Future<Output = Result<T, ReplicationError>> + 'a,
    {
        if self.busy {
            return Err(ReplicationError::Broken);
        }
        self.busy = true;
        let busy = &mut self.busy;
        match tokio::time::timeout(timeout, op(&mut self.conn)).await {
            Err(_) => Err(ReplicationError::Timeout {
                what,
                after: timeout,
            }),
            Ok(Err(e)) if !e.is_completed_command() => Err(e),
            Ok(result) => {
                *busy = false;
                result
            }
        }
    }
}

impl ReplicationError {
    /// A server error answered after the server became ready again: the command
    /// failed but the connection is in a known state.
    fn is_completed_command(&self) -> bool {
        matches!(self, ReplicationError::Server(_))
    }
}

impl Connection {
    async fn run_query(
        &mut self,
        sql: String,
    ) -> Result<Vec<Vec<Option<String>>>, ReplicationError> {
        const CONTEXT: &str = "running a query";
        send_query(self, &sql).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.recv(CONTEXT).await? {
                Backend::DataRow(row) => rows.push(row),
                Backend::RowDescription | Backend::CommandComplete | Backend::EmptyQuery => {}
                Backend::Error(e) => {
                    error.get_or_insert(e);
                }
                Backend::ReadyForQuery => break,
                other => {
                    return Err(ReplicationError::Protocol(format!(
                        "unexpected {} in the answer to a query",
                        other.describe()
                    )));
                }
            }
        }
        match error {
            Some(e) => Err(ReplicationError::Server(e)),
            None => Ok(rows),
        }
    }

    async fn start_copy_both(&mut self, sql: String) -> Result<(), ReplicationError> {
        const CONTEXT: &str = "starting replication";
        send_query(self, &sql).await?;
        match self.recv(CONTEXT).await? {
            Backend::CopyBothResponse => Ok(()),
            Backend::Error(e) => {
                // The server follows with ReadyForQuery; wait for it so the
                // error counts as a completed command.
                while !matches!(self.recv(CONTEXT).await?, Backend::ReadyForQuery) {}
                Err(ReplicationError::Server(e))
            }
            other => Err(ReplicationError::Protocol(format!(
                "expected CopyBothResponse to START_REPLICATION, got {}",
                other.describe()
            ))),
        }
    }
}

async fn send_query(conn: &mut Connection, sql: &str) -> Result<(), ReplicationError> {
    frontend::query(sql, conn.writer.buf())
        .map_err(|e| ReplicationError::Protocol(format!("encoding a query: {e}")))?;
    conn.writer.flush("sending a query").await
}

/// Reads to `ReadyForQuery` after authentication succeeded (parameters and the
/// cancel key in between are absorbed by `recv`).
async fn wait_ready(conn: &mut Connection) -> Result<(), ReplicationError> {
    match conn.recv("starting the session").await? {
        Backend::ReadyForQuery => Ok(()),
        Backend::Error(e) => Err(ReplicationError::Server(e)),
        other => Err(ReplicationError::Protocol(format!(
            "unexpected {} during session startup",
            other.describe()
        ))),
    }
}

fn unexpected(command: &str, why: &str) -> ReplicationError {
    ReplicationError::Protocol(format!("unexpected result from {command}: {why}"))
}

fn single_row<'a>(
    rows: &'a [Vec<Option<String>>],
    command: &str,
    columns: usize,
) -> Result<&'a [Option<String>], ReplicationError> {
    match rows {
        [row] if row.len() >= columns => Ok(row),
        [row] => Err(unexpected(
            command,
            &format!("{} columns, expected {columns}", row.len()),
        )),
        _ => Err(unexpected(
            command,
            &format!("{} rows, expected 1", rows.len()),
        )),
    }
}

fn required<'a>(
    row: &'a [Option<String>],
    i: usize,
    command: &str,
    column: &str,
) -> Result<&'a str, ReplicationError> {
    row.get(i)
        .and_then(|v| v.as_deref())
        .ok_or_else(|| unexpected(command, &format!("{column} is NULL")))
}

fn parse_lsn(s: &str, command: &str) -> Result<Lsn, ReplicationError> {
    s.parse()
        .map_err(|_| unexpected(command, &format!("{s:?} is not an LSN")))
}

fn abbreviate(sql: &str) -> String {
    const MAX: usize = 80;
    match sql.char_indices().nth(MAX) {
        Some((i, _)) => format!("{:?}...", &sql[..i]),
        None => format!("{sql:?}"),
    }
}
