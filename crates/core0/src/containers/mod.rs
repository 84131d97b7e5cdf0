//! Containers: images ("flists"), the container runtime and corex, the in-container agent.

pub mod image;
pub mod runtime;
