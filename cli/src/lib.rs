//! The `lumen` command line: `observe`, `status` and `nodes` against a Lumen
//! node exporter or relay over the Hubble-compatible Observer API, in plaintext or
//! (mutual) TLS.

pub mod args;
pub mod commands;
pub mod policy;
pub mod request;
pub mod time;
pub mod tls;

use std::ffi::OsString;

use clap::{CommandFactory, FromArgMatches};

pub use args::{Cli, Command, ObserveArgs};
pub use request::{build_filters, build_request, FilterFlag, RequestError};

/// What went wrong, printed as one line after `lumen: `.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot connect to {server}: {reason}")]
    Connect { server: String, reason: String },
    #[error("{0}")]
    Server(String),
    #[error("cannot write output: {0}")]
    Output(#[source] std::io::Error),
}

/// A parsed command line: the clap structure plus observe's filter flags in
/// command-line order (needed for `--not`).
#[derive(Debug)]
pub struct Invocation {
    pub cli: Cli,
    pub filter_flags: Vec<FilterFlag>,
}

/// Result of parsing: run, or print help/version and exit successfully.
#[derive(Debug)]
pub enum Parsed {
    Run(Box<Invocation>),
    Display(String),
}

/// Parses arguments (including the program name).
pub fn parse<I, T>(args: I) -> Result<Parsed, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = match Cli::command().try_get_matches_from(args) {
        Ok(m) => m,
        Err(e) => {
            use clap::error::ErrorKind;
            return match e.kind() {
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    Ok(Parsed::Display(e.render().to_string()))
                }
                _ => Err(CliError::Usage(one_line_clap_error(&e))),
            };
        }
    };
    let cli =
        Cli::from_arg_matches(&matches).map_err(|e| CliError::Usage(one_line_clap_error(&e)))?;
    let filter_flags = match matches.subcommand_matches("observe") {
        Some(m) => ordered_filter_flags(m),
        None => Vec::new(),
    };
    Ok(Parsed::Run(Box::new(Invocation { cli, filter_flags })))
}

fn one_line_clap_error(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let first = rendered
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid arguments");
    let msg = first.trim().strip_prefix("error: ").unwrap_or(first.trim());
    format!("{msg} (see 'lumen --help')")
}

/// Filter flag occurrences sorted by position, each marked negated when a
/// `--not` stands between it and the previous filter flag.
fn ordered_filter_flags(m: &clap::ArgMatches) -> Vec<FilterFlag> {
    let mut occurrences: Vec<(usize, &'static str, String)> = Vec::new();
    for id in args::FILTER_FLAGS {
        let Some(indices) = m.indices_of(id) else {
            continue;
        };
        let indices: Vec<usize> = indices.collect();
        if matches!(*id, "ipv4" | "ipv6") {
            if m.get_flag(id) {
                occurrences.extend(indices.into_iter().map(|i| (i, *id, String::new())));
            }
            continue;
        }
        let values: Vec<String> = match *id {
            "identity" | "from_identity" | "to_identity" => m
                .get_many::<u32>(id)
                .map(|v| v.map(u32::to_string).collect())
                .unwrap_or_default(),
            _ => m
                .get_many::<String>(id)
                .map(|v| v.cloned().collect())
                .unwrap_or_default(),
        };
        occurrences.extend(indices.into_iter().zip(values).map(|(i, v)| (i, *id, v)));
    }
    occurrences.sort_by_key(|(i, _, _)| *i);
    let mut nots: Vec<usize> = m
        .indices_of("not")
        .map(Iterator::collect)
        .unwrap_or_default();
    nots.sort_unstable();
    let mut out = Vec::with_capacity(occurrences.len());
    let mut prev = 0usize;
    for (idx, id, value) in occurrences {
        let negated = nots.iter().any(|n| *n >= prev && *n < idx);
        out.push(FilterFlag { id, value, negated });
        prev = idx;
    }
    out
}

/// Runs a parsed invocation, writing results to stdout.
pub async fn run(inv: Invocation) -> Result<(), CliError> {
    let Invocation { cli, filter_flags } = inv;
    match &cli.command {
        Command::Observe(args) => commands::observe(&cli, args, &filter_flags).await,
        Command::Status => commands::status(&cli).await,
        Command::Nodes | Command::List(args::ListCommand::Nodes) => commands::nodes(&cli).await,
        Command::Policy(p) => policy::policy(&cli, p).await,
        Command::Identity(args::IdentityCommand::List) => policy::identities(&cli).await,
    }
}

/// Parses, runs and reports errors; returns the process exit code.
pub async fn main_with_args<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let result = match parse(args) {
        Ok(Parsed::Display(text)) => {
            print!("{text}");
            return 0;
        }
        Ok(Parsed::Run(inv)) => run(*inv).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => 0,
        Err(CliError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            eprintln!("lumen: {}", e.to_string().replace('\n', " "));
            match e {
                CliError::Usage(_) | CliError::Request(_) | CliError::Tls(_) => 2,
                _ => 1,
            }
        }
    }
}

#[cfg(test)]
mod tests;
