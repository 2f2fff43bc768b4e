//! The `llm-gateway` command: serve (the default) or check a config file.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use llm_gateway::{app, config, reload, telemetry};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(all(feature = "jemalloc", not(feature = "mimalloc")))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(version, about = "A streaming-first gRPC gateway to LLM providers")]
struct Cli {
    /// The YAML config file; without it (and without LLM_GATEWAY_CONFIG), the
    /// embedded default: a `mock` model, no keys.
    #[arg(long, env = "LLM_GATEWAY_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve gRPC and the admin listener (the default).
    Serve,
    /// Validate a config file without serving; exits non-zero on the first problem.
    CheckConfig {
        /// The file to check (defaults to --config).
        path: Option<PathBuf>,
    },
}

/// The config to serve, and the file to reload it from (none for the
/// embedded default).
fn load(path: Option<PathBuf>) -> Result<(config::Config, Option<reload::Source>), config::ConfigError> {
    match path {
        Some(p) => reload::Source::read(p).map(|(source, c)| (c, Some(source))),
        None => config::load_default().map(|c| (c, None)),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { path }) => {
            let Some(path) = path.or(cli.config) else {
                eprintln!("check-config: give a PATH (or --config)");
                return ExitCode::from(2);
            };
            match config::load_file(&path) {
                Ok(c) => {
                    println!(
                        "{}: ok ({} provider(s), {} model(s), {} key(s))",
                        path.display(),
                        c.providers.len(),
                        c.models.len(),
                        c.api_keys.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        None | Some(Command::Serve) => {
            let (config, source) = match load(cli.config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(serve(config, source))
        }
    }
}

async fn serve(config: config::Config, mut source: Option<reload::Source>) -> ExitCode {
    let shutdown = shutdown_signal();
    // SIGHUP asks for a reload; one pending request is enough.
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    if let Some(s) = source.as_mut() {
        s.requests = Some(reload_rx);
    }
    let hangups = hangup_signals(reload_tx);
    let telemetry = match telemetry::init(&config.telemetry) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let listeners = match app::Listeners::bind(&config).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            telemetry.shutdown();
            return ExitCode::FAILURE;
        }
    };
    let result = tokio::select! {
        r = app::run_with(config, source, listeners, shutdown) => r,
        () = hangups => Ok(()),
    };
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "stopped with an error");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM or SIGINT (Ctrl-C). The handlers are installed when this is
/// called, before the gateway serves, so that no signal in between is lost.
fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let handlers = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
        async move {
            match handlers {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Forwards each SIGHUP to `tx` as a reload request. Never returns while the
/// handler is installed; without one (not unix, or it failed), stays pending
/// so that it never ends the serving it is raced against.
fn hangup_signals(tx: tokio::sync::mpsc::Sender<()>) -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let handler = signal(SignalKind::hangup());
        async move {
            match handler {
                Ok(mut hup) => {
                    while hup.recv().await.is_some() {
                        // Full: a reload is already pending, which will read
                        // the file as it is now.
                        let _ = tx.try_send(());
                    }
                    std::future::pending::<()>().await
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no SIGHUP handler: reload only when the file changes");
                    std::future::pending::<()>().await
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        drop(tx);
        std::future::pending::<()>()
    }
}
