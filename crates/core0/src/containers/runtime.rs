//! The container runtime: overlay root, namespaces, cgroups, corex as PID 1.
