//! Integration tests: one binary, so the suite links once. Each module is one capability.

mod common;

mod access_log;
mod axum_example;
mod check;
mod cli;
mod conn_counters;
mod connections;
mod dashboard;
mod dist;
mod doctor;
mod drain;
mod exhaustion;
mod h2_abuse;
mod idle_release;
mod malformed;
mod metrics;
mod protocols;
mod proxy;
mod proxy_h1;
mod proxy_resilience;
mod proxy_shedding;
mod redaction;
mod reload;
mod reload_listeners;
mod resilience;
mod static_cache;
mod switches;
mod systemd;
mod timeouts;
mod tracing;
mod upgrade;
