//! Job results kept by the API after the node forgot them.
//!
//! A node keeps `result:<id>` for 300 s after a job ends. Every result the API reads (a job
//! lookup, or the background wait after `POST .../processes`) is saved in the state store under
//! `jobs/<node>/<jobid>` with an expiry of now + `job_retention`, so `GET .../jobs/{jobid}` and
//! its stream still answer long after the node's TTL. A result already archived as it is, is not
//! written again. Expired entries are ignored on read and removed by a periodic sweep.

use crate::store::{self, StateStore, StoreError};
use grid_client::NodeClient;
use grid_proto::api::JobResult;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Key prefix of archived results.
pub const PREFIX: &str = "jobs/";

/// How long the background wait keeps asking a node for the result of a job it started.
const WAIT_STEP: Duration = Duration::from_secs(60);

/// Consecutive node errors after which a background wait gives up.
const MAX_WAIT_ERRORS: u32 = 10;

/// One archived result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArchivedJob {
    /// The result as the API answers it.
    pub result: JobResult,
    /// Seconds since the epoch after which the entry is dropped.
    pub expires_at: u64,
}

/// The archive of job results.
#[derive(Clone)]
pub struct Archive {
    store: Arc<dyn StateStore>,
    retention: Duration,
}

impl std::fmt::Debug for Archive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Archive")
            .field("retention", &self.retention)
            .finish()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The store key of job `job` of node `node`.
pub fn key(node: &str, job: &str) -> String {
    format!("{PREFIX}{node}/{job}")
}

impl Archive {
    /// An archive in `store` keeping results for `retention`.
    pub fn new(store: Arc<dyn StateStore>, retention: Duration) -> Self {
        Self { store, retention }
    }

    /// Saves a finished job's result (a running state is not saved). Returns whether it wrote:
    /// a result already archived as it is (and not expired) is only read, so looking a finished
    /// job up again and again writes nothing (no new revision, no history entry, no watch event).
    pub async fn save(&self, node: &str, result: &JobResult) -> Result<bool, StoreError> {
        if result.state == grid_proto::State::Running.api_str() {
            return Ok(false);
        }
        let key = key(node, &result.id);
        let expected = match self.store.get(&key).await? {
            Some(kv) => match store::decode_json::<ArchivedJob>(&kv) {
                Ok(v) if v.value.expires_at > now_secs() && v.value.result == *result => {
                    return Ok(false);
                }
                // Expired, unreadable, or a different result (a duplicate id's, replaced by the
                // real one): replaced.
                _ => kv.mod_revision,
            },
            None => 0,
        };
        let entry = ArchivedJob {
            result: result.clone(),
            expires_at: now_secs().saturating_add(self.retention.as_secs()),
        };
        match store::cas_json(self.store.as_ref(), &key, expected, &entry).await {
            Ok(_) => Ok(true),
            // Another reader archived it meanwhile.
            Err(StoreError::Conflict { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The archived result of a job, unless missing or expired.
    pub async fn get(&self, node: &str, job: &str) -> Result<Option<JobResult>, StoreError> {
        let got = store::get_json::<ArchivedJob>(self.store.as_ref(), &key(node, job)).await?;
        Ok(got
            .filter(|v| v.value.expires_at > now_secs())
            .map(|v| v.value.result))
    }

    /// Removes expired entries; returns how many.
    pub async fn sweep(&self) -> Result<usize, StoreError> {
        let now = now_secs();
        let mut removed = 0;
        for kv in self.store.list(PREFIX).await? {
            let expired = match store::decode_json::<ArchivedJob>(&kv) {
                Ok(v) => v.value.expires_at <= now,
                // An entry we cannot read is of no use to anyone.
                Err(_) => true,
            };
            if expired
                && self
                    .store
                    .delete(&kv.key, Some(kv.mod_revision))
                    .await
                    .unwrap_or(false)
            {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Runs [`Archive::sweep`] every `every` until the task is aborted.
    pub fn spawn_sweeper(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let archive = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match archive.sweep().await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(removed = n, "swept expired job results"),
                    Err(e) => tracing::warn!(error = %e, "job archive sweep failed"),
                }
            }
        })
    }

    /// In the background, waits for job `job` on `node` to end and archives its result.
    pub fn watch_job(&self, node: String, client: NodeClient, job: String) {
        let archive = self.clone();
        tokio::spawn(async move {
            let mut errors = 0;
            loop {
                match client.wait_result(&job, WAIT_STEP).await {
                    Ok(Some(r)) => {
                        if let Err(e) = archive.save(&node, &JobResult::from(&r)).await {
                            tracing::warn!(node, job, error = %e, "cannot archive job result");
                        }
                        return;
                    }
                    Ok(None) => {
                        errors = 0;
                        // Still running, or gone without a result (the node was rebooted).
                        match client.is_running(&job).await {
                            Ok(true) => continue,
                            Ok(false) => match client.result_now(&job).await {
                                Ok(Some(_)) => continue,
                                _ => return,
                            },
                            Err(_) => errors += 1,
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        if errors >= MAX_WAIT_ERRORS {
                            tracing::warn!(node, job, error = %e, "giving up waiting for job result");
                            return;
                        }
                        tokio::time::sleep(Duration::from_secs(u64::from(errors).min(30))).await;
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::redb::RedbStore;

    fn result(id: &str, state: &str) -> JobResult {
        JobResult {
            id: id.into(),
            name: "core.system".into(),
            level: 0,
            start_time: 1,
            stdout: "a\n".into(),
            stderr: String::new(),
            state: state.into(),
            data: String::new(),
            code: Some(0),
        }
    }

    #[tokio::test]
    async fn saves_reads_and_expires() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn StateStore> =
            Arc::new(RedbStore::open(&dir.path().join("s.redb")).expect("open store"));
        let archive = Archive::new(store.clone(), Duration::from_secs(3600));
        assert!(
            archive
                .save("n1", &result("j1", "success"))
                .await
                .expect("save")
        );
        assert!(
            !archive
                .save("n1", &result("j2", "running"))
                .await
                .expect("running is skipped")
        );
        assert_eq!(
            archive.get("n1", "j1").await.expect("get"),
            Some(result("j1", "success"))
        );
        assert_eq!(archive.get("n1", "j2").await.expect("get"), None);
        assert_eq!(archive.get("n2", "j1").await.expect("get"), None);

        // Saving the same result again writes nothing; a different one replaces it.
        let revision = store.current_revision().await.expect("revision");
        assert!(
            !archive
                .save("n1", &result("j1", "success"))
                .await
                .expect("save again")
        );
        assert_eq!(store.current_revision().await.expect("revision"), revision);
        assert!(
            archive
                .save("n1", &result("j1", "error"))
                .await
                .expect("replace")
        );
        assert_eq!(
            archive.get("n1", "j1").await.expect("get"),
            Some(result("j1", "error"))
        );

        let expired = Archive::new(store.clone(), Duration::ZERO);
        expired
            .save("n1", &result("j3", "error"))
            .await
            .expect("save");
        assert_eq!(archive.get("n1", "j3").await.expect("get"), None);
        assert_eq!(archive.sweep().await.expect("sweep"), 1);
        assert!(store.get(&key("n1", "j3")).await.expect("get").is_none());
        assert!(store.get(&key("n1", "j1")).await.expect("get").is_some());
    }
}
