//! `--since`/`--until` values: RFC 3339 timestamps or relative durations.

use chrono::{DateTime, Utc};

/// Parses `2024-05-01T12:00:00Z`, `5m`, `1h30m`, `1h30m ago` (relative to `now`).
pub fn parse_time(s: &str, now: DateTime<Utc>) -> Result<prost_types::Timestamp, String> {
    let t = if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        t.with_timezone(&Utc)
    } else {
        let rel = s.trim().strip_suffix("ago").unwrap_or(s).trim();
        let d = humantime::parse_duration(rel).map_err(|_| {
            "expected an RFC 3339 time or a duration like 5m or 1h30m ago".to_owned()
        })?;
        let d = chrono::Duration::from_std(d).map_err(|_| "duration too large".to_owned())?;
        now.checked_sub_signed(d)
            .ok_or_else(|| "duration too large".to_owned())?
    };
    Ok(prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    })
}
