//! Endpoint metadata for enrichment: the current [`EndpointIndex`] behind a cheap
//! snapshot handle, reloaded from the watched endpoints file. A file that fails to parse
//! is rejected with its file/line message, counted, and the last good metadata stays in
//! force.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use lumen_policy::{EndpointIndex, EndpointInfo, EndpointsFile, IdentityAllocator};
use tracing::{error, info};

use crate::metrics::Metrics;

/// Shared endpoint metadata of one flow.
pub type EndpointRef = Arc<EndpointInfo>;

/// One consistent version of the metadata.
pub struct MetadataSnapshot {
    pub index: EndpointIndex,
    /// Version counter, bumped on every accepted reload.
    pub generation: u64,
}

impl MetadataSnapshot {
    pub fn empty() -> Self {
        Self {
            index: EndpointIndex::build(&EndpointsFile::default(), &IdentityAllocator::default()),
            generation: 0,
        }
    }

    /// The endpoint owning `ip`, or the reserved world endpoint.
    pub fn lookup(&self, ip: IpAddr) -> EndpointRef {
        self.index.lookup_ip(ip)
    }
}

/// Handle to the current snapshot; readers take an `Arc` once per batch.
#[derive(Clone)]
pub struct MetadataHandle(Arc<RwLock<Arc<MetadataSnapshot>>>);

impl Default for MetadataHandle {
    fn default() -> Self {
        Self(Arc::new(RwLock::new(Arc::new(MetadataSnapshot::empty()))))
    }
}

impl MetadataHandle {
    pub fn current(&self) -> Arc<MetadataSnapshot> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn replace(&self, index: EndpointIndex) -> Arc<MetadataSnapshot> {
        let mut g = self.0.write().unwrap_or_else(|p| p.into_inner());
        let snap = Arc::new(MetadataSnapshot {
            index,
            generation: g.generation + 1,
        });
        *g = snap.clone();
        snap
    }

    /// Load `path` and install it; on error keep what is in force and return the error.
    pub fn reload(
        &self,
        path: &Path,
        allocator: &IdentityAllocator,
    ) -> Result<Arc<MetadataSnapshot>, Box<lumen_policy::MetadataError>> {
        let file = EndpointsFile::load(path).map_err(Box::new)?;
        Ok(self.replace(EndpointIndex::build(&file, allocator)))
    }
}

/// Watches the endpoints file (content changes, including atomic renames over it) and
/// reloads it; calls `on_change` with each accepted snapshot.
pub struct EndpointsWatcher {
    pub path: PathBuf,
    pub poll: Duration,
    pub allocator: IdentityAllocator,
}

impl EndpointsWatcher {
    /// Returns the fingerprint of the file's content (None if unreadable).
    fn fingerprint(&self) -> Option<u64> {
        use std::hash::{Hash, Hasher};
        let bytes = std::fs::read(&self.path).ok()?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut h);
        Some(h.finish())
    }

    pub async fn run(
        self,
        handle: MetadataHandle,
        metrics: Arc<Metrics>,
        mut on_change: impl FnMut(&MetadataSnapshot) + Send,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut last: Option<u64> = None;
        let mut first = true;
        // A change in the file's directory wakes the check at once; the poll is the
        // fallback.
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => std::path::PathBuf::from("."),
        };
        let mut wake = crate::fswatch::watch_dir(&dir);
        loop {
            let fp = self.fingerprint();
            if fp != last || first {
                first = false;
                last = fp;
                match handle.reload(&self.path, &self.allocator) {
                    Ok(snap) => {
                        metrics.endpoints.set(snap.index.endpoints().len() as i64);
                        info!(
                            file = %self.path.display(),
                            endpoints = snap.index.endpoints().len(),
                            generation = snap.generation,
                            "endpoint metadata loaded"
                        );
                        let collisions = snap.index.identities().collisions();
                        metrics.identity_collisions.set(collisions.len() as i64);
                        for c in collisions {
                            tracing::warn!(collision = ?c, "identity collision resolved");
                        }
                        on_change(&snap);
                    }
                    Err(e) => {
                        metrics.metadata_errors.inc();
                        error!("rejected endpoint metadata, keeping the last good version: {e}");
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.poll) => {}
                _ = crate::fswatch::changed(&mut wake) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
