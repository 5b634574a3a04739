//! Errors of the history crate and the classification of ClickHouse failures.

use std::error::Error as _;
use std::io;

/// An error of the history crate.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("invalid history configuration: {field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("ClickHouse {operation} failed: {source}")]
    ClickHouse {
        operation: &'static str,
        #[source]
        source: clickhouse::error::Error,
    },
    #[error("migration {version} ({name}) failed at `{statement}`: {source}")]
    Migration {
        version: u32,
        name: &'static str,
        statement: String,
        #[source]
        source: clickhouse::error::Error,
    },
    #[error(
        "database {database} has schema version {found} but this build needs {needed}; \
         run the migrations (history.migrate: true)"
    )]
    SchemaTooOld {
        database: String,
        found: u32,
        needed: u32,
    },
    #[error("database {database} has schema version {found}, newer than this build's {known}")]
    SchemaTooNew {
        database: String,
        found: u32,
        known: u32,
    },
    #[error("the {flavor} schema needs ClickHouse 23.8 or newer, the server is {server_version}")]
    ServerTooOld {
        flavor: &'static str,
        server_version: String,
    },
    #[error("spool {path}: {source}")]
    Spool {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading history rows: {0}")]
    Decode(#[from] crate::rowbinary::DecodeError),
    #[error("the history writer has shut down")]
    Closed,
}

impl HistoryError {
    /// Whether this is ClickHouse not answering (rather than answering with an error).
    pub fn is_unreachable(&self) -> bool {
        use clickhouse::error::Error as E;
        match self {
            HistoryError::ClickHouse { source, .. } | HistoryError::Migration { source, .. } => {
                matches!(source, E::Network(_) | E::TimedOut)
            }
            _ => false,
        }
    }

    pub(crate) fn ch(operation: &'static str) -> impl FnOnce(clickhouse::error::Error) -> Self {
        move |source| HistoryError::ClickHouse { operation, source }
    }
}

/// What to do about a failed insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retry with backoff, as long as it takes (connection problems, timeouts, overload,
    /// authentication and permission problems that an operator fixes).
    Transient,
    /// The batch itself is unacceptable (schema or type errors): dead-letter it.
    Permanent,
    /// Not recognised: retried a bounded number of times, then dead-lettered.
    Unknown,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
            ErrorClass::Unknown => "unknown",
        }
    }
}

/// ClickHouse error codes that mean the data or the schema is wrong.
const PERMANENT_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    16,  // NO_SUCH_COLUMN_IN_TABLE
    20,  // NUMBER_OF_COLUMNS_DOESNT_MATCH
    26,  // CANNOT_PARSE_QUOTED_STRING
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    32,  // ATTEMPT_TO_READ_AFTER_EOF
    33,  // CANNOT_READ_ALL_DATA
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    43,  // ILLEGAL_TYPE_OF_ARGUMENT
    44,  // ILLEGAL_COLUMN
    47,  // UNKNOWN_IDENTIFIER
    50,  // UNKNOWN_TYPE
    53,  // TYPE_MISMATCH
    60,  // UNKNOWN_TABLE
    62,  // SYNTAX_ERROR
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    73,  // UNKNOWN_FORMAT
    81,  // UNKNOWN_DATABASE
    117, // INCORRECT_DATA
    130, // CANNOT_READ_ARRAY_FROM_TEXT
    131, // TOO_LARGE_STRING_SIZE
    349, // CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
];

/// Error codes worth retrying.
const TRANSIENT_CODES: &[u32] = &[
    159, // TIMEOUT_EXCEEDED
    160, // TOO_SLOW
    164, // READONLY
    192, // UNKNOWN_USER
    193, // WRONG_PASSWORD
    194, // REQUIRED_PASSWORD
    202, // TOO_MANY_SIMULTANEOUS_QUERIES
    203, // NO_FREE_CONNECTION
    209, // SOCKET_TIMEOUT
    210, // NETWORK_ERROR
    225, // NO_ZOOKEEPER
    236, // ABORTED
    241, // MEMORY_LIMIT_EXCEEDED
    242, // TABLE_IS_READ_ONLY
    243, // NOT_ENOUGH_SPACE
    252, // TOO_MANY_PARTS
    319, // UNKNOWN_STATUS_OF_INSERT
    394, // QUERY_WAS_CANCELLED
    425, // SYSTEM_ERROR
    497, // ACCESS_DENIED
    516, // AUTHENTICATION_FAILED
    999, // KEEPER_EXCEPTION
];

/// The `Code: N` of a ClickHouse exception message.
pub fn exception_code(msg: &str) -> Option<u32> {
    let rest = &msg[msg.find("Code: ")? + 6..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Classifies a failed insert.
pub fn classify(err: &clickhouse::error::Error) -> ErrorClass {
    use clickhouse::error::Error as E;
    match err {
        E::Network(_) | E::TimedOut => ErrorClass::Transient,
        E::BadResponse(msg) => match exception_code(msg) {
            Some(c) if PERMANENT_CODES.contains(&c) => ErrorClass::Permanent,
            Some(c) if TRANSIENT_CODES.contains(&c) => ErrorClass::Transient,
            Some(_) => ErrorClass::Unknown,
            // No exception body: a proxy or an overloaded server answering by status.
            None if msg.starts_with('5') => ErrorClass::Transient,
            None => ErrorClass::Unknown,
        },
        _ => ErrorClass::Unknown,
    }
}

/// Whether the request certainly never reached the server (connection refused), so the
/// batch certainly did not land.
pub fn certainly_not_sent(err: &clickhouse::error::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = err.source();
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io.kind() == io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use clickhouse::error::Error as E;

    #[test]
    fn codes_are_parsed_from_both_message_styles() {
        assert_eq!(
            exception_code("Code: 60, e.displayText() = DB::Exception: Table lumen.flows doesn't exist., e.what() = DB::Exception"),
            Some(60)
        );
        assert_eq!(
            exception_code("Code: 252. DB::Exception: Too many parts (TOO_MANY_PARTS)"),
            Some(252)
        );
        assert_eq!(exception_code("503 Service Unavailable"), None);
    }

    #[test]
    fn classes() {
        let bad = |s: &str| E::BadResponse(s.to_owned());
        assert_eq!(
            classify(&bad(
                "Code: 16, e.displayText() = DB::Exception: No such column"
            )),
            ErrorClass::Permanent
        );
        assert_eq!(
            classify(&bad("Code: 33. DB::Exception: Cannot read all data")),
            ErrorClass::Permanent
        );
        assert_eq!(
            classify(&bad("Code: 252. DB::Exception: Too many parts")),
            ErrorClass::Transient
        );
        assert_eq!(
            classify(&bad("Code: 241. Memory limit exceeded")),
            ErrorClass::Transient
        );
        assert_eq!(
            classify(&bad("503 Service Unavailable")),
            ErrorClass::Transient
        );
        assert_eq!(
            classify(&bad("Code: 4242. something new")),
            ErrorClass::Unknown
        );
        assert_eq!(classify(&E::TimedOut), ErrorClass::Transient);
        let refused = E::Network(Box::new(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "refused",
        )));
        assert_eq!(classify(&refused), ErrorClass::Transient);
        assert!(certainly_not_sent(&refused));
        assert!(!certainly_not_sent(&E::TimedOut));
    }
}
