//! What each subcommand does, as library functions the binary calls, so tests
//! can drive them in-process.

use std::process::ExitCode;

use crate::cli::{Invocation, SlotAction};
use crate::config::Settings;

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
                Err(e) => {
                    eprintln!("odoo-cdc: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

async fn slot_command(action: SlotAction, settings: &Settings) -> ExitCode {
    match crate::slot::command(action, settings).await {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("odoo-cdc: {e}");
            ExitCode::from(1)
        }
    }
}
