//! Wake-ups on changes in a directory (inotify), so the policy directory and the endpoints
//! file are reread within milliseconds of a change rather than at the next poll. Polling
//! stays as the fallback: when inotify cannot be used, and for a watched directory that is
//! itself replaced (the periodic check still sees the new content).

use std::path::Path;

use futures::StreamExt;
use inotify::{Inotify, WatchMask};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Changes that complete a new version of a file: a write closed, a file moved in or out
/// (editors and Kubernetes ConfigMap updates rename), a file deleted. A bare create is
/// left out: the write that follows it is what counts, so a half-written file is not read.
fn mask() -> WatchMask {
    WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::DELETE
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
}

/// A receiver that yields once after any change in `dir` (bursts coalesce into one
/// pending wake-up), or `None` when the directory cannot be watched (logged; the caller
/// keeps polling).
pub fn watch_dir(dir: &Path) -> Option<mpsc::Receiver<()>> {
    let inotify = match Inotify::init() {
        Ok(i) => i,
        Err(e) => {
            warn!(error = %e, "inotify unavailable; changes are found by polling");
            return None;
        }
    };
    if let Err(e) = inotify.watches().add(dir, mask()) {
        warn!(dir = %dir.display(), error = %e, "cannot watch the directory; changes are found by polling");
        return None;
    }
    let mut events = match inotify.into_event_stream([0u8; 4096]) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "inotify stream failed; changes are found by polling");
            return None;
        }
    };
    let (tx, rx) = mpsc::channel(1);
    let dir = dir.display().to_string();
    tokio::spawn(async move {
        while let Some(ev) = events.next().await {
            match ev {
                Ok(ev) => {
                    debug!(%dir, name = ?ev.name, mask = ?ev.mask, "change");
                    // Full: a wake-up is already pending, which covers this change.
                    if let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
                        return;
                    }
                }
                Err(e) => {
                    warn!(%dir, error = %e, "inotify read failed; changes are found by polling");
                    return;
                }
            }
        }
    });
    Some(rx)
}

/// The next wake-up of `watch`; never resolves when there is none (polling only).
pub async fn changed(watch: &mut Option<mpsc::Receiver<()>>) {
    match watch {
        Some(rx) => {
            if rx.recv().await.is_none() {
                *watch = None;
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_write_or_rename_in_the_directory_wakes_the_watcher() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = watch_dir(dir.path());
        assert!(w.is_some(), "inotify works here");
        std::fs::write(dir.path().join("a.yaml"), "x: 1\n").expect("write");
        tokio::time::timeout(Duration::from_secs(5), changed(&mut w))
            .await
            .expect("woken by a closed write");
        std::fs::write(dir.path().join(".tmp"), "x: 2\n").expect("write");
        // The closed write of the temporary file wakes it too; drain that one.
        tokio::time::timeout(Duration::from_secs(5), changed(&mut w))
            .await
            .expect("woken");
        std::fs::rename(dir.path().join(".tmp"), dir.path().join("a.yaml")).expect("rename");
        tokio::time::timeout(Duration::from_secs(5), changed(&mut w))
            .await
            .expect("woken by a rename");
    }
}
