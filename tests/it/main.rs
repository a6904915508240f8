//! Integration tests: one binary, so the suite links once. Each module is one capability.

mod common;

mod axum_example;
mod check;
mod cli;
mod connections;
mod dist;
mod drain;
mod exhaustion;
mod h2_abuse;
mod malformed;
mod protocols;
mod reload;
mod reload_listeners;
mod systemd;
mod timeouts;
