//! Job files: the TOML that `rill server --job FILE` reads, validated into a [`JobSpec`].
//!
//! ```toml
//! name = "wc"
//! job = "wordcount"
//! source_queue = "in"
//! sink_queue = "out"
//! checkpoint_interval_ms = 1000
//! parallelism = 1
//! ```
//!
//! Keys beyond the built-in job's own: `prefetch` (unacked deliveries per source consumer),
//! `bad_input` (`skip`, `dead-letter` or `fail`), `declare_queues` (declare the job's queues
//! if missing; default true, false makes a missing queue an error), `durable_queues` (whether
//! queues the job declares because they are missing are durable; default true), `vhost`, `user`,
//! `password` (the in-process session's login; default `/`, guest, guest), `checkpoint_dir`.
//! An unknown key, a value of the wrong type or out of range is an error that names the key
//! and its line.

use crate::spec::{BuiltinJob, JobOptions, JobSpec};
use rill_connect::format::BadInputPolicy;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// Why a job file was refused.
#[derive(Debug, thiserror::Error)]
pub enum JobFileError {
    #[error("cannot read job file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not TOML, an unknown key, a wrong type (toml's message names the line, the column and
    /// the key).
    #[error("job file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    /// A value TOML accepted but a job cannot use.
    #[error("job file {path}, line {line}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        key: &'static str,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    name: Spanned<String>,
    job: Spanned<String>,
    source_queue: Option<Spanned<String>>,
    sink_queue: Option<Spanned<String>>,
    checkpoint_interval_ms: Option<Spanned<u64>>,
    checkpoint_dir: Option<Spanned<String>>,
    parallelism: Option<Spanned<i64>>,
    prefetch: Option<Spanned<i64>>,
    bad_input: Option<Spanned<String>>,
    durable_queues: Option<Spanned<bool>>,
    declare_queues: Option<Spanned<bool>>,
    vhost: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    password: Option<Spanned<String>>,
}

/// Reads and validates a job file.
pub fn load(path: &Path) -> Result<JobSpec, JobFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| JobFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Validates job file text (`path` only names it in errors).
///
/// ```
/// use rill_jobs::jobfile::parse;
/// let spec = parse("name = \"wc\"\njob = \"wordcount\"\nsource_queue = \"in\"\nsink_queue = \"out\"\n",
///     "wc.toml".as_ref()).unwrap();
/// assert_eq!(spec.name, "wc");
/// let err = parse("name = \"wc\"\njob = \"wordcount\"\nsource_queue = \"in\"\nsink_queue = \"out\"\nparallelism = 0\n",
///     "wc.toml".as_ref()).unwrap_err();
/// assert_eq!(err.to_string(), "job file wc.toml, line 5: key `parallelism`: must be at least 1");
/// ```
pub fn parse(text: &str, path: &Path) -> Result<JobSpec, JobFileError> {
    let raw: Raw = toml::from_str(text).map_err(|e| JobFileError::Syntax {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_owned(),
    })?;
    let line_of =
        |span: std::ops::Range<usize>| text[..span.start.min(text.len())].matches('\n').count() + 1;
    let invalid =
        |key: &'static str, span: std::ops::Range<usize>, message: String| JobFileError::Invalid {
            path: path.to_path_buf(),
            line: line_of(span),
            key,
            message,
        };
    let nonempty = |key: &'static str, v: &Spanned<String>| {
        if v.get_ref().is_empty() {
            Err(invalid(key, v.span(), "must not be empty".into()))
        } else {
            Ok(v.get_ref().clone())
        }
    };
    let required = |key: &'static str, v: &Option<Spanned<String>>, job: &Spanned<String>| match v {
        Some(v) => nonempty(key, v),
        None => Err(invalid(
            key,
            job.span(),
            format!("missing: job '{}' needs it", job.get_ref()),
        )),
    };

    let name = nonempty("name", &raw.name)?;
    let job = match raw.job.get_ref().as_str() {
        "wordcount" => BuiltinJob::Wordcount {
            source_queue: required("source_queue", &raw.source_queue, &raw.job)?,
            sink_queue: required("sink_queue", &raw.sink_queue, &raw.job)?,
        },
        other => {
            return Err(invalid(
                "job",
                raw.job.span(),
                format!("unknown job '{other}' (built-in jobs: wordcount)"),
            ))
        }
    };
    let mut options = JobOptions::default();
    if let Some(p) = &raw.parallelism {
        options.parallelism = match usize::try_from(*p.get_ref()) {
            Ok(n) if (1..=1024).contains(&n) => n,
            Ok(0) | Err(_) => {
                return Err(invalid(
                    "parallelism",
                    p.span(),
                    "must be at least 1".into(),
                ))
            }
            Ok(_) => {
                return Err(invalid(
                    "parallelism",
                    p.span(),
                    "must be at most 1024".into(),
                ))
            }
        };
    }
    if let Some(p) = &raw.prefetch {
        options.prefetch = match u32::try_from(*p.get_ref()) {
            Ok(n) if (1..=10_000_000).contains(&n) => Some(n),
            _ => {
                return Err(invalid(
                    "prefetch",
                    p.span(),
                    "must be between 1 and 10000000".into(),
                ))
            }
        };
    }
    if let Some(ms) = &raw.checkpoint_interval_ms {
        if *ms.get_ref() == 0 {
            return Err(invalid(
                "checkpoint_interval_ms",
                ms.span(),
                "must be at least 1".into(),
            ));
        }
        options.checkpoint_interval_ms = Some(*ms.get_ref());
    }
    if let Some(dir) = &raw.checkpoint_dir {
        options.checkpoint_dir = Some(PathBuf::from(nonempty("checkpoint_dir", dir)?));
    }
    if let Some(b) = &raw.bad_input {
        options.bad_input = b
            .get_ref()
            .parse::<BadInputPolicy>()
            .map_err(|m| invalid("bad_input", b.span(), m))?;
    }
    if let Some(d) = &raw.durable_queues {
        options.durable_queues = *d.get_ref();
    }
    if let Some(d) = &raw.declare_queues {
        options.declare_queues = *d.get_ref();
    }
    if let Some(v) = &raw.vhost {
        options.credentials.vhost = nonempty("vhost", v)?;
    }
    if let Some(u) = &raw.user {
        options.credentials.user = nonempty("user", u)?;
    }
    if let Some(p) = &raw.password {
        options.credentials.password = p.get_ref().clone();
    }
    Ok(JobSpec { name, job, options })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WC: &str = "name = \"wc\"\njob = \"wordcount\"\nsource_queue = \"in\"\nsink_queue = \"out\"\ncheckpoint_interval_ms = 1000\nparallelism = 1\n";

    fn err(text: &str) -> String {
        parse(text, Path::new("wc.toml")).unwrap_err().to_string()
    }

    #[test]
    fn the_contract_file_parses() {
        let spec = parse(WC, Path::new("wc.toml")).unwrap();
        assert_eq!(spec.name, "wc");
        assert_eq!(
            spec.job,
            BuiltinJob::Wordcount {
                source_queue: "in".into(),
                sink_queue: "out".into()
            }
        );
        assert_eq!(spec.options.parallelism, 1);
        assert_eq!(spec.options.checkpoint_interval_ms, Some(1000));
        assert!(spec.options.durable_queues);
        assert_eq!(spec.options.bad_input, BadInputPolicy::Fail);
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let e = err(&WC.replace("parallelism = 1", "parallelism = 0"));
        assert_eq!(
            e,
            "job file wc.toml, line 6: key `parallelism`: must be at least 1"
        );
        let e = err(&WC.replace("job = \"wordcount\"", "job = \"wordcunt\""));
        assert_eq!(
            e,
            "job file wc.toml, line 2: key `job`: unknown job 'wordcunt' (built-in jobs: wordcount)"
        );
        let e = err(&format!("{WC}bad_input = \"ignore\"\n"));
        assert!(
            e.starts_with(
                "job file wc.toml, line 7: key `bad_input`: unknown bad-input policy 'ignore'"
            ),
            "{e}"
        );
        let e = err(&WC.replace("sink_queue = \"out\"\n", ""));
        assert_eq!(
            e,
            "job file wc.toml, line 2: key `sink_queue`: missing: job 'wordcount' needs it"
        );
        // toml reports unknown keys and wrong types with line, column and key.
        let e = err(&format!("{WC}paralelism = 2\n"));
        assert!(e.contains("line 7") && e.contains("paralelism"), "{e}");
        let e = err(&WC.replace("parallelism = 1", "parallelism = \"two\""));
        assert!(e.contains("line 6") && e.contains("parallelism"), "{e}");
        let e = err("name = \"wc\"\njob = wordcount\n");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn optional_keys() {
        let spec = parse(
            &format!("{WC}prefetch = 50\nbad_input = \"dead-letter\"\ndurable_queues = false\nvhost = \"v\"\nuser = \"u\"\npassword = \"p\"\n"),
            Path::new("wc.toml"),
        )
        .unwrap();
        assert_eq!(spec.options.prefetch, Some(50));
        assert_eq!(spec.options.bad_input, BadInputPolicy::DeadLetter);
        assert!(!spec.options.durable_queues);
        assert_eq!(spec.options.credentials.vhost, "v");
        assert_eq!(spec.options.credentials.user, "u");
        assert_eq!(spec.options.credentials.password, "p");
    }
}
