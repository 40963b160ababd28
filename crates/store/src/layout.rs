//! Where queues live in the data directory: `<data_dir>/queues/<16 hex digits>/`, named by a
//! stable 64-bit FNV-1a hash of (vhost, queue) so any bytes in names are safe, with a `meta`
//! file inside holding the real names for humans (and to detect a hash collision). Exchanges
//! that keep state (a deduplication cache) live the same way under `<data_dir>/exchanges/`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::{FileBackend, OpenMode, StorageBackend};
use crate::error::IoContext;
use crate::StoreError;

fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The directory of queue `queue` in `vhost`: `<data_dir>/queues/<hash>`.
///
/// ```
/// let a = rill_store::queue_dir("/data".as_ref(), "/", "orders");
/// assert!(a.starts_with("/data/queues"));
/// assert_ne!(a, rill_store::queue_dir("/data".as_ref(), "/o", "rders"));
/// ```
pub fn queue_dir(data_dir: &Path, vhost: &str, queue: &str) -> PathBuf {
    entity_dir(data_dir, Entity::Queue, vhost, queue)
}

/// The directory of exchange `exchange` in `vhost`: `<data_dir>/exchanges/<hash>`.
///
/// ```
/// let x = rill_store::exchange_dir("/data".as_ref(), "/", "orders");
/// assert!(x.starts_with("/data/exchanges"));
/// assert_ne!(x, rill_store::queue_dir("/data".as_ref(), "/", "orders"));
/// ```
pub fn exchange_dir(data_dir: &Path, vhost: &str, exchange: &str) -> PathBuf {
    entity_dir(data_dir, Entity::Exchange, vhost, exchange)
}

#[derive(Debug, Clone, Copy)]
enum Entity {
    Queue,
    Exchange,
}

impl Entity {
    fn word(self) -> &'static str {
        match self {
            Entity::Queue => "queue",
            Entity::Exchange => "exchange",
        }
    }
}

fn entity_dir(data_dir: &Path, entity: Entity, vhost: &str, name: &str) -> PathBuf {
    // Length-prefixing the vhost keeps ("ab", "c") and ("a", "bc") apart.
    let h = fnv1a64(&[
        &(vhost.len() as u64).to_le_bytes(),
        vhost.as_bytes(),
        name.as_bytes(),
    ]);
    let parent = match entity {
        Entity::Queue => "queues",
        Entity::Exchange => "exchanges",
    };
    data_dir.join(parent).join(format!("{h:016x}"))
}

fn meta_text(entity: Entity, vhost: &str, name: &str) -> String {
    format!("vhost: {vhost:?}\n{}: {name:?}\n", entity.word())
}

/// Creates [`queue_dir`] if needed and writes its `meta` file; errors if the directory already
/// belongs to another (vhost, queue) — a hash collision.
pub fn ensure_queue_dir(data_dir: &Path, vhost: &str, queue: &str) -> Result<PathBuf, StoreError> {
    ensure_queue_dir_with(
        &(Arc::new(FileBackend) as Arc<dyn StorageBackend>),
        data_dir,
        vhost,
        queue,
    )
}

/// [`ensure_queue_dir`] on a given backend.
pub fn ensure_queue_dir_with(
    backend: &Arc<dyn StorageBackend>,
    data_dir: &Path,
    vhost: &str,
    queue: &str,
) -> Result<PathBuf, StoreError> {
    ensure_entity_dir(backend, data_dir, Entity::Queue, vhost, queue)
}

/// [`ensure_queue_dir`] for an exchange: creates [`exchange_dir`] with its `meta` file.
pub fn ensure_exchange_dir(
    data_dir: &Path,
    vhost: &str,
    exchange: &str,
) -> Result<PathBuf, StoreError> {
    ensure_entity_dir(
        &(Arc::new(FileBackend) as Arc<dyn StorageBackend>),
        data_dir,
        Entity::Exchange,
        vhost,
        exchange,
    )
}

fn ensure_entity_dir(
    backend: &Arc<dyn StorageBackend>,
    data_dir: &Path,
    entity: Entity,
    vhost: &str,
    name: &str,
) -> Result<PathBuf, StoreError> {
    let dir = entity_dir(data_dir, entity, vhost, name);
    let meta = dir.join("meta");
    let text = meta_text(entity, vhost, name);
    backend.create_dir_all(&dir).ctx(&dir)?;
    if backend.exists(&meta).ctx(&meta)? {
        let f = backend.open(&meta, OpenMode::Existing).ctx(&meta)?;
        let len = f.len().ctx(&meta)?.min(64 * 1024);
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, 0).ctx(&meta)?;
        if buf == text.as_bytes() {
            return Ok(dir);
        }
        if !buf.is_empty() {
            return Err(StoreError::corrupt(
                &meta,
                format!(
                    "directory belongs to {}, not vhost {vhost:?} {} {name:?}",
                    String::from_utf8_lossy(&buf).trim(),
                    entity.word()
                ),
            ));
        }
    }
    let f = backend.open(&meta, OpenMode::CreateTruncate).ctx(&meta)?;
    f.write_all_at(text.as_bytes(), 0).ctx(&meta)?;
    Ok(dir)
}
