//! Containers: images ("flists"), the container runtime and corex, the in-container agent.

pub mod cgroups;
pub mod corex;
pub mod image;
pub mod manager;
pub mod runtime;
