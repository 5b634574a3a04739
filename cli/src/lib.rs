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
    /// The server took the connection but sent no gRPC answer in time (not an
    /// Observer API, or hung).
    #[error("{server} did not answer within {} (--timeout)", humantime::format_duration(*.timeout))]
    NoAnswer {
        server: String,
        timeout: std::time::Duration,
    },
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

/// A clap error as one line: the message with what clap lists under it (the missing
/// arguments, a similar argument's name) and where to read more, without the usage block.
fn one_line_clap_error(e: &clap::Error) -> String {
    one_line_usage_error(&e.render().to_string())
}

/// See [`one_line_clap_error`]; takes clap's rendered (plain) text.
pub(crate) fn one_line_usage_error(rendered: &str) -> String {
    let mut msg = String::new();
    let mut tips = Vec::new();
    let mut help = "lumen".to_owned();
    for line in rendered.lines().map(str::trim) {
        if let Some(usage) = line.strip_prefix("Usage:") {
            // "Usage: lumen policy dump --endpoint <ENDPOINT>": the command path.
            let words: Vec<&str> = usage
                .split_whitespace()
                .take_while(|w| !w.starts_with(['-', '[', '<']))
                .collect();
            if !words.is_empty() {
                help = words.join(" ");
            }
            break;
        }
        if line.is_empty() || line.starts_with("For more information") {
            continue;
        }
        if let Some(tip) = line.strip_prefix("tip:") {
            let tip = tip.trim();
            // Lumen has no positional arguments a dash-value could be meant for.
            if !tip.starts_with("to pass ") {
                tips.push(format!("tip: {tip}"));
            }
            continue;
        }
        let line = line.strip_prefix("error:").map_or(line, str::trim);
        if !msg.is_empty() {
            msg.push(' ');
        }
        msg.push_str(line);
    }
    if msg.is_empty() {
        msg.push_str("invalid arguments");
    }
    for tip in tips {
        msg.push_str(&format!(" ({tip})"));
    }
    format!("{msg} (see '{help} --help')")
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
