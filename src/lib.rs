//! icmp answers the users of many businesses through LLM-driven conversations.
//!
//! Producers put user messages on a Redis Stream; worker processes in one consumer group run
//! each message through the message pipeline (validate → conversation → stage → context →
//! select? → extract? → respond → one PostgreSQL transaction → cache → publish → ack).
//!
//! # Layout
//!
//! In the order a message meets them:
//!
//! - [`startup`]: the composition root: how a worker process, an operator command, the
//!   benchmark and the tests connect and build a worker.
//! - [`config`]: the typed configuration (file, profile, `ICMP__SECTION__KEY` environment).
//! - [`error`]: the error taxonomy: categories, stable codes, statuses, retryability.
//! - [`protocol`]: the wire format: inbound decoding and validation, reply and dead-letter fields.
//! - [`stream`]: Redis Streams mechanics (delivery and reclaiming, order queues, heartbeat, the
//!   fenced finish, retention, the operator's dead-letter commands); Lua scripts in `lua/`.
//! - [`worker`]: holding entries from delivery to finish, and the run loop.
//! - [`pipeline`]: the message pipeline: idempotency, coalesced turns, the read, LLM and write
//!   phases, one module per step.
//! - [`definitions`]: a business's definition as the pipeline reads it (business, stages,
//!   compiled templates): in-process, then Redis, then PostgreSQL, dropped on every change.
//! - [`template`]: templates and their context: compile once, render against a message's
//!   variables (shared by business definitions and the pipeline).
//! - [`llm`]: the LLM service trait, the OpenAI-compatible client, the circuit breaker and the
//!   mock server.
//! - [`actions`]: stage actions: webhooks written to an outbox with the message and delivered
//!   effectively once by a dispatcher, signed; the mock server's receiver.
//! - [`retry`]: backoff for transient faults and reconnecting loops (the one module that knows
//!   the `backoff` crate).
//! - [`store`]: PostgreSQL (pool, migrations, queries, the write-set transaction).
//! - [`redis_connection`]: connections to one Redis server or a Redis Cluster.
//! - [`cache`]: the Redis cache of definitions and conversation state, and budget counters.
//! - [`model`]: domain records shared by the store, the cache and the pipeline.
//! - [`business`]: business definition files and `icmp import`.
//! - [`producer`]: a producer's side: send a message to the workers and wait for its reply.
//! - [`status`]: `icmp status`: lag, consumers, queues, dead letters, per-business ratios.
//! - [`trace`]: `icmp trace`: everything known about one message.
//! - [`personal_data`]: one user's data: export, erase, retention, and the operators' audit
//!   trail.
//! - [`console`]: `icmp console`: the web console over status, dead letters, conversations and
//!   trace, with replay and purge behind a token.
//! - [`transcript`]: golden transcripts, recorded and replayed (`icmp replay`).
//! - [`tls`]: TLS to PostgreSQL and Redis: certificate roots and `sslmode`.
//! - [`telemetry`]: logs, metrics and the `/metrics` `/healthz` `/readyz` endpoint.
//! - `bench`: the end-to-end benchmark behind `icmp bench` (the `bench` feature, on by default).
//!
//! The `icmp` binary's command line is `src/cli/`, one module per command.

pub mod actions;
#[cfg(feature = "bench")]
pub mod bench;
pub mod business;
pub mod cache;
pub mod config;
pub mod console;
pub mod definitions;
pub mod error;
pub mod handoff;
pub mod llm;
pub mod model;
pub mod personal_data;
pub mod pipeline;
pub mod producer;
pub mod protocol;
pub mod redis_connection;
pub mod retry;
pub mod startup;
pub mod status;
pub mod store;
pub mod stream;
pub mod telemetry;
pub mod template;
pub mod tls;
pub mod trace;
pub mod transcript;
pub mod worker;
