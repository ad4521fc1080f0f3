//! What each subcommand does, as library functions the binary calls, so tests
//! can drive them in-process.

use std::process::ExitCode;

use crate::cli::{Invocation, SlotAction};
use crate::config::Settings;

/// Whether text logs get ANSI colours: only on a terminal, and never when
/// `NO_COLOR` is set to a non-empty value (<https://no-color.org>). Log files,
/// journald and container log drivers get plain text.
pub fn log_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown requested: finishing in-flight work (a second signal exits at once)");
    // An operator who signals twice wants out now: nothing unconfirmed was
    // acknowledged, so the next start replays it.
    tokio::spawn(async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::warn!("second signal: exiting without waiting for in-flight confirms");
        std::process::exit(1);
    });
    #[cfg(unix)]
    tokio::spawn(async {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            term.recv().await;
            tracing::warn!("second signal: exiting without waiting for in-flight confirms");
            std::process::exit(1);
        }
    });
}

pub async fn main(invocation: Invocation) -> ExitCode {
    match invocation {
        Invocation::Tail(settings) => crate::tail::run(settings, shutdown_signal()).await,
        Invocation::Run(settings) => crate::supervisor::run(settings, shutdown_signal()).await,
        Invocation::Check(settings) => crate::check::run(&settings).await,
        Invocation::Slot(action, settings) => slot_command(action, &settings).await,
        Invocation::Snapshot(tables, settings) => {
            match crate::snapshot::incremental::send_signal(&settings.source, &tables).await {
                Ok(lsn) => {
                    println!(
                        "asked for a snapshot of {} (signal at LSN {lsn}); the connector holding the slot starts it when it reads the signal",
                        tables.join(", ")
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(crate::session::SessionError::Snapshot(e)),
            }
        }
    }
}

async fn slot_command(action: SlotAction, settings: &Settings) -> ExitCode {
    match crate::slot::command(action, &settings.source, &settings.slot).await {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(crate::session::SessionError::Slot(e)),
    }
}

/// A one-shot command's failure: the same message and exit code `run` gives
/// for the same condition (docs/operations.md).
fn fail(e: crate::session::SessionError) -> ExitCode {
    eprintln!("odoo-cdc: {e}");
    ExitCode::from(e.exit_code())
}

#[cfg(test)]
mod tests {
    use super::log_colour;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(log_colour(true, None));
        assert!(log_colour(true, Some(OsStr::new(""))));
        assert!(!log_colour(true, Some(OsStr::new("1"))));
        assert!(!log_colour(false, None));
        assert!(!log_colour(false, Some(OsStr::new("1"))));
    }
}
