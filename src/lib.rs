//! pgswitch: a PostgreSQL wire-protocol pooling proxy for zero-downtime
//! blue/green cutovers.
//!
//! Data plane: [`client`] (handshake and session loop) over a [`data_plane`]
//! handle: [`backends`] and their [`pool`]s of [`server`] connections,
//! [`statements`], [`session_params`], [`protocol`]. Control plane: [`switch`]
//! (active backend and gate, the two planes' meeting point), [`cutover`],
//! [`replication`], [`admin`], the lifecycle commands [`check`] and
//! [`verify`]. [`runtime`] composes them. See ARCHITECTURE.md.

pub mod admin;
pub mod auth;
pub mod backends;
pub mod cancel;
pub mod check;
pub mod client;
pub mod client_conn;
pub mod config;
pub mod cutover;
pub mod data_plane;
pub mod demo;
#[doc(hidden)]
pub mod fuzzing;
pub mod logging;
pub mod metrics;
pub mod pg_bin;
pub mod pool;
pub mod prepare;
pub mod protocol;
pub mod reachability;
pub mod replication;
pub mod runtime;
pub mod scram;
pub mod server;
pub mod session_params;
pub mod state;
pub mod statements;
pub mod switch;
pub mod tls;
pub mod verify;
