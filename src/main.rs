//! The `gatehouse` command: parse flags, run the command, map failures to documented exit codes.

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[cfg(feature = "mimalloc")]
mod allocator;

/// The allocator of the `gatehouse` binary; library users keep theirs. (Why: Cargo.toml.)
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: allocator::MiMalloc = allocator::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "gatehouse",
    version,
    about = "An HTTP/1.1 + HTTP/2 server and reverse proxy in which nothing fails silently"
)]
struct Cli {
    /// Diagnostic log format (the access log is always JSON).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormatArg>,
    /// Diagnostic log level or filter, e.g. `info`, `debug`, `gatehouse=debug`.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormatArg {
    Json,
    Text,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server. Without -c and without ./gatehouse.toml, runs the embedded default.
    Serve {
        /// Configuration file.
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
    },
    /// Validate configuration, certificates and keys without binding anything.
    Check {
        /// Configuration file.
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
    },
    /// Ask a running server to reload its configuration and certificates (same as SIGHUP).
    /// Exits 0 when applied, 78 when refused as invalid, 69 when the server cannot be reached.
    Reload {
        /// Admin API address. Default: [admin] address from the configuration file.
        #[arg(long, value_name = "ADDR")]
        admin: Option<String>,
        /// Configuration file to take the admin address and token file from.
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
        /// File holding the admin bearer token. Default: [admin] token_file from the configuration.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// Zero-downtime binary upgrade (same as SIGUSR2): the server starts its binary anew and hands
    /// it the listening sockets. Exits 0 once the new process serves, 1 when it failed (the old
    /// one keeps serving), 69 when the server cannot be reached.
    Upgrade {
        /// Admin API address. Default: [admin] address from the configuration file.
        #[arg(long, value_name = "ADDR")]
        admin: Option<String>,
        /// Configuration file to take the admin address and token file from.
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
        /// File holding the admin bearer token. Default: [admin] token_file from the configuration.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// Diagnose a server (any server): DNS, proxy, TCP, TLS, ALPN, HTTP/2 settings, connection
    /// reuse, and why a downgrade happened. Exits 0 when it negotiates what was asked and reuses
    /// connections, 1 when a problem was found (and explained), 2 when it could not connect.
    Doctor(DoctorArgs),
}

#[derive(clap::Args, Debug)]
struct DoctorArgs {
    /// The URL to diagnose, e.g. https://example.com/ (no scheme: https).
    url: String,
    /// Requests sent for the connection reuse test.
    #[arg(long, default_value_t = gatehouse::doctor::DEFAULT_REQUESTS, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    requests: u32,
    /// Offer and require HTTP/1.1 only.
    #[arg(long, conflicts_with = "http2")]
    http1: bool,
    /// Offer and require HTTP/2 only (ALPN h2; h2c by prior knowledge for http:// URLs).
    #[arg(long)]
    http2: bool,
    /// HTTP CONNECT proxy to go through, overriding HTTPS_PROXY/HTTP_PROXY/ALL_PROXY ("" for none).
    #[arg(long, value_name = "URL")]
    proxy: Option<String>,
    /// Trust only the CA certificates in this PEM file (default: the system store).
    #[arg(long, value_name = "FILE")]
    cacert: Option<PathBuf>,
    /// Report certificate problems as warnings instead of problems.
    #[arg(long, short = 'k')]
    insecure: bool,
    /// Print the report as one JSON document (field names are stable; see docs/doctor.md).
    #[arg(long)]
    json: bool,
}

/// `gatehouse doctor`: the report on stdout, the documented exit code.
fn doctor(a: DoctorArgs) -> ExitCode {
    let want = match (a.http1, a.http2) {
        (true, _) => gatehouse::doctor::Want::Http1,
        (_, true) => gatehouse::doctor::Want::Http2,
        _ => gatehouse::doctor::Want::Any,
    };
    let report = gatehouse::doctor::run(&gatehouse::doctor::Options {
        url: a.url,
        requests: a.requests,
        want,
        proxy: a.proxy,
        cacert: a.cacert,
        insecure: a.insecure,
    });
    if a.json {
        match serde_json::to_string_pretty(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => eprintln!("gatehouse: cannot encode the report: {e}"),
        }
    } else {
        print!("{}", report.render());
    }
    ExitCode::from(u8::try_from(report.exit_code).unwrap_or(1))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(2),
            };
        }
    };
    if let Command::Doctor(args) = cli.command {
        return doctor(args);
    }
    match try_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gatehouse: {}", e.message.trim_end());
            ExitCode::from(u8::try_from(e.code).unwrap_or(1))
        }
    }
}

fn try_main(cli: Cli) -> Result<(), gatehouse::app::Exit> {
    // The flag wins; otherwise `[log] format` from the configuration (a configuration that does not
    // load is reported by the command itself, so it falls back to text here).
    let format = match cli.log_format {
        Some(LogFormatArg::Json) => gatehouse::config::LogFormat::Json,
        Some(LogFormatArg::Text) => gatehouse::config::LogFormat::Text,
        None => {
            let path = match &cli.command {
                Command::Serve { config }
                | Command::Check { config }
                | Command::Reload { config, .. }
                | Command::Upgrade { config, .. } => config.as_deref(),
                Command::Doctor(_) => None,
            };
            gatehouse::config::load(path)
                .map(|(c, _)| c.log.format)
                .unwrap_or(gatehouse::config::LogFormat::Text)
        }
    };
    gatehouse::observe::logging::init(format, &cli.log_level)
        .map_err(|message| gatehouse::app::Exit { code: 2, message })?;
    match cli.command {
        Command::Serve { config } => gatehouse::app::serve(config.as_deref()),
        Command::Check { config } => {
            let report = gatehouse::app::check(config.as_deref())?;
            print!("{report}");
            Ok(())
        }
        Command::Reload {
            admin,
            config,
            token_file,
        } => {
            let report = gatehouse::app::reload(admin.as_deref(), config.as_deref(), token_file.as_deref())?;
            // Warnings first, then the one-line result; all on stdout, since the command succeeded.
            print!("{report}");
            Ok(())
        }
        Command::Upgrade {
            admin,
            config,
            token_file,
        } => {
            let report = gatehouse::app::upgrade(admin.as_deref(), config.as_deref(), token_file.as_deref())?;
            print!("{report}");
            Ok(())
        }
        Command::Doctor(_) => Ok(()),
    }
}
