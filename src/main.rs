//! The `odoo-cdc` binary: parse, validate, then hand over to the library.
//!
//! Exit codes (`odoo_cdc::session::exit_code`, also in docs/operations.md):
//! - 0: clean shutdown (SIGTERM/SIGINT, in-flight confirms awaited);
//! - 1: runtime failure that retrying cannot fix, not covered below;
//! - 2: bad configuration or usage (the message names the option);
//! - 3: the slot or publication is missing, was dropped or invalidated;
//! - 4: authentication failed (PostgreSQL or RabbitMQ credentials, TLS trust);
//! - 5: a value or pgoutput message could not be decoded (`--on-decode-error=fail`).
//!
//! Retryable failures never exit: the supervisor reconnects with backoff.

use std::process::ExitCode;

use odoo_cdc::cli::{self, Invocation};
use odoo_cdc::config::LogFormat;

/// mimalloc instead of glibc malloc. lapin runs its socket loop on its own
/// thread, so every message's frames and confirm promises are allocated on
/// one thread and freed on the other; glibc serialises that on its arena lock
/// (`malloc_consolidate`, `__lll_lock_wait_private` were ~25% of the
/// connector's CPU in row granularity). mimalloc frees cross-thread blocks
/// without a shared lock. Figures in docs/performance.md.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let invocation = match cli::parse(std::env::args_os()) {
        Err(e) => {
            // --help and --version are not errors.
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
        Ok(Err(config_error)) => {
            eprintln!("odoo-cdc: configuration error: {config_error}");
            return ExitCode::from(2);
        }
        Ok(Ok(inv)) => inv,
    };
    let log_format = match &invocation {
        Invocation::Tail(s)
        | Invocation::Run(s)
        | Invocation::Check(s)
        | Invocation::Slot(_, s)
        | Invocation::Snapshot(_, s) => s.log_format,
    };
    init_logging(log_format);
    // One thread: the reader, the publisher and lapin's I/O hand work to each
    // other through wake-ups, which cost a futex call and a context switch
    // each across threads (the larger part of the connector's CPU per change
    // on a multi-threaded runtime) and are plain queue pushes on one thread.
    // The connector's work per change is a few microseconds, far from a core.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("odoo-cdc: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(odoo_cdc::app::main(invocation))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ODOO_CDC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=error"));
    use std::io::IsTerminal as _;
    let colour = odoo_cdc::app::log_colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
