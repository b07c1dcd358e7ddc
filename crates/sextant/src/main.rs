//! The `sextant` binary: parses the command line and hands off. `serve` runs a node until
//! SIGTERM/SIGINT; every other command is a client of a running node (see `commands`).
#![forbid(unsafe_code)]

mod cli;
mod commands;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches};
use sextant_server::Server;

fn main() -> std::process::ExitCode {
    // Parsed in two steps: `serve` needs the matches to tell a flag or variable from a default.
    let matches = cli::Cli::command().get_matches();
    let args = match cli::Cli::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match args.command {
            cli::Command::Serve(serve) => {
                let serve_matches = matches.subcommand_matches("serve").unwrap_or(&matches);
                run_server(*serve, serve_matches).await
            }
            cmd => {
                let tls = commands::ClientTls {
                    ca: args.tls_ca,
                    cert: args.tls_client_cert,
                    key: args.tls_client_key,
                };
                let token = args.token.as_deref().filter(|t| !t.is_empty());
                commands::run(&args.server, &args.grpc_server, &tls, token, cmd).await
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run_server(args: cli::ServeArgs, matches: &clap::ArgMatches) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SEXTANT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = args.into_config(matches)?;
    let server = Server::start(config)
        .await
        .context("cannot start sextant")?;
    wait_for_signal().await?;
    server.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        r = tokio::signal::ctrl_c() => { r?; tracing::info!("SIGINT received") }
    }
    Ok(())
}
