//! Integration tests: one binary, so the suite links once. Each module is one capability.

mod common;

mod axum_example;
mod cli;
mod connections;
mod h2_abuse;
mod protocols;
