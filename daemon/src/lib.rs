//! What Lumen's daemons (the node exporter and the relay) share: a YAML config file with
//! `LUMEN_<DAEMON>_*` environment overrides and errors that name the file, variable or
//! field and the problem; logging to stderr; the shutdown signal; the exit status.

use std::{collections::HashMap, net::SocketAddr, path::Path, str::FromStr, time::Duration};

use serde::de::DeserializeOwned;

/// Where environment overrides come from (the process environment, or a map in tests).
pub trait Environment {
    fn var(&self, key: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Environment for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Environment for HashMap<String, String> {
    fn var(&self, key: &str) -> Option<String> {
        self.get(key).cloned()
    }
}

/// A configuration that cannot be used, and where it came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("environment variable {name}={value:?}: {reason}")]
    Env {
        name: String,
        value: String,
        reason: String,
    },
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl ConfigError {
    /// A field whose value cannot be used.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// Reads a YAML config file.
pub fn read_yaml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_yaml(&path.display().to_string(), &text)
}

/// Parses YAML config text; `path` names it in errors.
pub fn parse_yaml<T: DeserializeOwned>(path: &str, text: &str) -> Result<T, ConfigError> {
    serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// The environment variables of one daemon: `<prefix><KEY>`.
pub struct EnvOverrides<'a> {
    env: &'a dyn Environment,
    prefix: &'static str,
}

impl<'a> EnvOverrides<'a> {
    pub fn new(env: &'a dyn Environment, prefix: &'static str) -> Self {
        Self { env, prefix }
    }

    fn name(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The raw value of `<prefix><key>`, if set.
    pub fn string(&self, key: &str) -> Option<String> {
        self.env.var(&self.name(key))
    }

    /// `<prefix><key>` parsed as `T`.
    pub fn parse<T: FromStr>(&self, key: &str) -> Result<Option<T>, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        self.with(key, |v| v.parse::<T>().map_err(|e| e.to_string()))
    }

    /// `<prefix><key>` as a duration (`250ms`, `5s`, `1h30m`).
    pub fn duration(&self, key: &str) -> Result<Option<Duration>, ConfigError> {
        self.with(key, |v| {
            humantime::parse_duration(v).map_err(|e| e.to_string())
        })
    }

    /// `<prefix><key>` as a socket address; empty means none (a disabled listener).
    pub fn optional_address(&self, key: &str) -> Result<Option<Option<SocketAddr>>, ConfigError> {
        self.with(key, optional_address)
    }

    /// `<prefix><key>` as a comma-separated list.
    pub fn list(&self, key: &str) -> Option<Vec<String>> {
        self.string(key).map(|v| list(&v))
    }

    /// `<prefix><key>` through `parse`, whose error becomes the reason.
    pub fn with<T>(
        &self,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        let name = self.name(key);
        match self.env.var(&name) {
            None => Ok(None),
            Some(value) => parse(&value).map(Some).map_err(|reason| ConfigError::Env {
                name,
                value,
                reason,
            }),
        }
    }
}

/// A comma-separated list, trimmed, without empty items.
pub fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A listen address where empty means "do not listen".
pub fn optional_address(v: &str) -> Result<Option<SocketAddr>, String> {
    if v.trim().is_empty() {
        return Ok(None);
    }
    v.trim().parse().map(Some).map_err(|e| format!("{e}"))
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), colored on a terminal.
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The exit status of `program`'s main: failures printed as one chain of causes.
pub fn exit_code(program: &str, result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn overrides_parse_and_name_the_variable_in_errors() {
        let e = env(&[
            ("X_PORT", "80"),
            ("X_WAIT", "1m30s"),
            ("X_LIST", " a, ,b "),
            ("X_METRICS", ""),
            ("X_BAD", "eighty"),
        ]);
        let o = EnvOverrides::new(&e, "X_");
        assert_eq!(o.parse::<u16>("PORT").expect("port"), Some(80));
        assert_eq!(o.parse::<u16>("MISSING").expect("unset"), None);
        assert_eq!(
            o.duration("WAIT").expect("duration"),
            Some(Duration::from_secs(90))
        );
        assert_eq!(o.list("LIST"), Some(vec!["a".to_owned(), "b".to_owned()]));
        assert_eq!(o.optional_address("METRICS").expect("empty"), Some(None));
        let err = o.parse::<u16>("BAD").expect_err("not a number");
        assert!(
            err.to_string()
                .starts_with("environment variable X_BAD=\"eighty\": "),
            "{err}"
        );
    }

    #[test]
    fn yaml_errors_name_the_file_and_line() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct C {
            port: u16,
        }
        let err = parse_yaml::<C>("relay.yaml", "# ports\nport: x\n").expect_err("bad");
        let s = err.to_string();
        assert!(s.starts_with("relay.yaml: "), "{s}");
        assert!(s.contains("line 2"), "{s}");
        let err = read_yaml::<C>(Path::new("/nonexistent/lumen.yaml")).expect_err("missing");
        assert!(
            err.to_string().starts_with("/nonexistent/lumen.yaml: "),
            "{err}"
        );
    }
}
