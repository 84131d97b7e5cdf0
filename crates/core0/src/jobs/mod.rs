//! The job manager: every command runs as a tracked job.

/// Running jobs, queues, and result publishing.
pub struct JobManager {}
