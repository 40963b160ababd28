//! Helpers shared by the store's integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;

use bytes::Bytes;
use rill_store::backend::{FileBackend, StorageBackend};
use rill_store::{StoreOptions, StoredMessage, SyncPolicy};

pub fn msg(i: u64, body_len: usize) -> StoredMessage {
    let body: Vec<u8> = (0..body_len).map(|j| (i as usize + j) as u8).collect();
    StoredMessage {
        exchange: format!("ex{}", i % 3),
        routing_key: format!("rk.{i}"),
        properties: Bytes::from(vec![0x80, 0x00, i as u8]),
        body: Bytes::from(body),
        timestamp_ms: 1_700_000_000_000 + i,
        flags: (i % 2) as u8,
    }
}

pub fn opts(segment_size: u32) -> StoreOptions {
    StoreOptions {
        segment_size,
        sync: SyncPolicy::Always,
    }
}

pub fn file_backend() -> Arc<dyn StorageBackend> {
    Arc::new(FileBackend)
}

/// Names of the files in `dir` with the given extension, sorted.
pub fn files_with_ext(dir: &std::path::Path, ext: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(ext))
        .collect();
    v.sort();
    v
}

/// Installs a tracing subscriber once so warnings show with `--nocapture`.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("warn")
        .try_init();
}

/// Captures formatted tracing output (all levels >= WARN) while `f` runs.
pub fn capture_warnings<T>(f: impl FnOnce() -> T) -> (T, String) {
    use std::io::Write;
    use std::sync::Mutex;
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let w = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || w.clone())
        .finish();
    // Callsites cache whether anyone listens; another test thread's subscriber coming or
    // going can leave a warning's callsite cached as unheard here. Rebuild it under ours.
    let out = tracing::subscriber::with_default(sub, || {
        tracing::callsite::rebuild_interest_cache();
        f()
    });
    let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
    (out, text)
}
