//! Built-in stream jobs over queues, job files, and the two ways to run a job: as its own
//! process against any AMQP 0-9-1 broker (`rill job run`), or inside `rill server`
//! (`--job FILE`) over in-process sessions.
//!
//! # Layout
//! - [`spec`]: what to run ([`JobSpec`]: a built-in job and its options).
//! - [`jobfile`]: job files (TOML) and their errors, which name the bad key and its line.
//! - [`progress`]: the progress line every job logs every few seconds.
//! - [`wordcount`]: the built-in `wordcount` job and its output contract.
//! - [`runner`]: running a job standalone (retries) or inside `rill server`, for built-in
//!   jobs and jobs of your own.
//! - [`supervisor`]: `rill job run` runs its job in worker processes and restarts them all
//!   when one fails.
//! - [`signals`]: stopping a job cleanly on SIGTERM/SIGINT.

pub mod jobfile;
pub mod progress;
pub mod runner;
pub mod signals;
pub mod spec;
pub mod supervisor;
pub mod wordcount;

pub use spec::{BuiltinJob, JobOptions, JobSpec};
