//! Integration tests against real PostgreSQL and Redis (started by `scripts/services.sh` when
//! not running) and the mock LLM over HTTP. Every test has its own database, key prefix,
//! streams and consumer group, so tests run in parallel.

#![expect(
    unreachable_pub,
    reason = "helpers are shared between the test modules"
)]
#![allow(
    clippy::too_many_lines,
    reason = "a scenario test reads top to bottom: its setup, faults and counts in one place"
)]

mod actions;
mod bursts_and_budgets;
mod citus;
mod cluster;
mod console;
mod console_browser;
mod edges;
mod foundation;
mod group_commit;
mod handoff;
mod helpers;
mod history;
mod injection;
mod isolation;
mod llm_client;
mod mock_llm;
mod model_chain;
mod operator;
mod personal_data;
mod phases;
mod pipeline;
mod processes;
mod real_model;
mod reliability;
mod secrets;
mod shards;
mod soak;
mod stream_guarantees;
mod streamed_replies;
mod tls;
mod traces;
mod transcripts;
mod webdriver;
