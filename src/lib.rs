//! pgswitch: a PostgreSQL wire-protocol pooling proxy for zero-downtime
//! blue/green cutovers.
//!
//! Data plane: [`client`] (handshake and session loop), [`pool`], [`server`],
//! [`protocol`]. Control plane: [`switch`] (active backend and gate), [`app`]
//! (listener, reload, shutdown).

pub mod admin;
pub mod app;
pub mod auth;
pub mod cancel;
pub mod client;
pub mod config;
pub mod cutover;
pub mod metrics;
pub mod pool;
pub mod protocol;
pub mod replication;
pub mod server;
pub mod session_params;
pub mod statements;
pub mod switch;
pub mod tls;
