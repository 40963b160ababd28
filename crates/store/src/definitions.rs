//! Durable definitions: one versioned blob, replaced atomically (write a temp file, fdatasync,
//! rename over the old file, fsync the directory). A crash at any point leaves either the old
//! or the new file; a leftover temp file is ignored and removed on open.
//!
//! ```text
//! definitions.rill   magic "RILLDEF\0"  version u32  payload_len u32  crc32c(payload) u32  payload
//! payload            6 sections (vhosts, users, permissions, exchanges, queues, bindings), each
//!                    count u32 then entries; strings and byte strings are u32 LE length + bytes,
//!                    booleans one byte (0/1), string lists count u32 + strings
//! ```
//! The encoding is hand-written rather than serde-derived: it is small, has no dependencies,
//! and is explicitly little-endian.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::{FileBackend, OpenMode, StorageBackend};
use crate::error::IoContext;
use crate::format::{self, Header, DEF_MAGIC, HEADER_LEN};
use crate::StoreError;

const FILE_NAME: &str = "definitions.rill";
const TEMP_NAME: &str = "definitions.rill.tmp";

/// A virtual host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VhostDef {
    /// Its name.
    pub name: String,
}

/// A user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserDef {
    /// Login name.
    pub name: String,
    /// Password hash, opaque to the store.
    pub password_hash: String,
    /// Tags such as `administrator`.
    pub tags: Vec<String>,
}

/// A user's permissions in one vhost (regular expressions, opaque to the store).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PermissionDef {
    /// User name.
    pub user: String,
    /// Vhost name.
    pub vhost: String,
    /// Configure regex.
    pub configure: String,
    /// Write regex.
    pub write: String,
    /// Read regex.
    pub read: String,
}

/// A durable exchange.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExchangeDef {
    /// Vhost name.
    pub vhost: String,
    /// Exchange name.
    pub name: String,
    /// Type: direct, fanout, topic, headers, ...
    pub kind: String,
    /// Durable flag.
    pub durable: bool,
    /// Auto-delete flag.
    pub auto_delete: bool,
    /// Internal flag.
    pub internal: bool,
    /// Encoded AMQP field table, opaque.
    pub arguments: Vec<u8>,
}

/// A durable queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueDef {
    /// Vhost name.
    pub vhost: String,
    /// Queue name.
    pub name: String,
    /// Durable flag.
    pub durable: bool,
    /// Auto-delete flag.
    pub auto_delete: bool,
    /// Encoded AMQP field table, opaque.
    pub arguments: Vec<u8>,
}

/// A binding between durable entities.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BindingDef {
    /// Vhost name.
    pub vhost: String,
    /// Source exchange.
    pub source: String,
    /// Destination queue or exchange.
    pub destination: String,
    /// Whether `destination` is a queue (else an exchange).
    pub destination_is_queue: bool,
    /// Routing key.
    pub routing_key: String,
    /// Encoded AMQP field table, opaque.
    pub arguments: Vec<u8>,
}

/// Everything durable the broker defines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Definitions {
    /// Vhosts.
    pub vhosts: Vec<VhostDef>,
    /// Users.
    pub users: Vec<UserDef>,
    /// Permissions.
    pub permissions: Vec<PermissionDef>,
    /// Durable exchanges.
    pub exchanges: Vec<ExchangeDef>,
    /// Durable queues.
    pub queues: Vec<QueueDef>,
    /// Bindings between durable entities.
    pub bindings: Vec<BindingDef>,
}

/// The definitions file in a data directory.
///
/// ```
/// use rill_store::{Definitions, DefinitionsFile, VhostDef};
/// let dir = tempfile::tempdir()?;
/// let (mut file, loaded) = DefinitionsFile::open(dir.path())?;
/// assert!(loaded.is_none());
/// let defs = Definitions { vhosts: vec![VhostDef { name: "/".into() }], ..Default::default() };
/// file.save(&defs)?;
/// let (_, loaded) = DefinitionsFile::open(dir.path())?;
/// assert_eq!(loaded, Some(defs));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct DefinitionsFile {
    dir: PathBuf,
    backend: Arc<dyn StorageBackend>,
}

impl DefinitionsFile {
    /// Opens (creating `data_dir` if missing) and reads the definitions; `None` if never saved.
    /// A corrupt file is an error (it is only ever replaced atomically, so corruption means the
    /// disk or someone else damaged it); a newer format version is `UnsupportedVersion`.
    pub fn open(data_dir: &Path) -> Result<(DefinitionsFile, Option<Definitions>), StoreError> {
        DefinitionsFile::open_with(data_dir, Arc::new(FileBackend))
    }

    /// [`DefinitionsFile::open`] on a given storage backend.
    pub fn open_with(
        data_dir: &Path,
        backend: Arc<dyn StorageBackend>,
    ) -> Result<(DefinitionsFile, Option<Definitions>), StoreError> {
        backend.create_dir_all(data_dir).ctx(data_dir)?;
        let file = DefinitionsFile {
            dir: data_dir.to_path_buf(),
            backend,
        };
        let tmp = file.dir.join(TEMP_NAME);
        if file.backend.exists(&tmp).ctx(&tmp)? {
            tracing::info!(file = %tmp.display(), "ignoring the temp file of an interrupted definitions save");
            file.backend.remove_file(&tmp).ctx(&tmp)?;
        }
        let path = file.path();
        if !file.backend.exists(&path).ctx(&path)? {
            return Ok((file, None));
        }
        let f = file.backend.open(&path, OpenMode::Existing).ctx(&path)?;
        let len = f.len().ctx(&path)?;
        if len > u64::from(u32::MAX) {
            return Err(StoreError::corrupt(&path, "file larger than 4 GiB"));
        }
        let mut data = vec![0u8; len as usize];
        f.read_exact_at(&mut data, 0).ctx(&path)?;
        if format::check_header(&data, DEF_MAGIC, &path)? == Header::Torn {
            return Err(StoreError::corrupt(&path, "truncated header"));
        }
        let body = &data[HEADER_LEN as usize..];
        if body.len() < 8 {
            return Err(StoreError::corrupt(&path, "truncated"));
        }
        let plen = format::le_u32(body) as usize;
        let crc = format::le_u32(&body[4..]);
        let payload = &body[8..];
        if payload.len() != plen {
            return Err(StoreError::corrupt(
                &path,
                format!("payload is {} bytes, header says {plen}", payload.len()),
            ));
        }
        if crc32c::crc32c(payload) != crc {
            return Err(StoreError::corrupt(&path, "CRC mismatch"));
        }
        let defs = decode(payload).map_err(|e| StoreError::corrupt(&path, e))?;
        Ok((file, Some(defs)))
    }

    /// Path of the definitions file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    /// Replaces the stored definitions atomically and durably.
    pub fn save(&mut self, defs: &Definitions) -> Result<(), StoreError> {
        let mut payload = Vec::new();
        encode(defs, &mut payload);
        let plen = u32::try_from(payload.len()).map_err(|_| StoreError::RecordTooLarge {
            size: payload.len() as u64,
            max: u64::from(u32::MAX),
        })?;
        let mut buf = Vec::with_capacity(HEADER_LEN as usize + 8 + payload.len());
        buf.extend_from_slice(&format::header(DEF_MAGIC));
        buf.extend_from_slice(&plen.to_le_bytes());
        buf.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        buf.extend_from_slice(&payload);
        let tmp = self.dir.join(TEMP_NAME);
        let f = self
            .backend
            .open(&tmp, OpenMode::CreateTruncate)
            .ctx(&tmp)?;
        f.write_all_at(&buf, 0).ctx(&tmp)?;
        f.sync_data().ctx(&tmp)?;
        drop(f);
        let path = self.path();
        self.backend.rename(&tmp, &path).ctx(&path)?;
        self.backend.sync_dir(&self.dir).ctx(&self.dir)?;
        Ok(())
    }
}

struct Enc<'a>(&'a mut Vec<u8>);

impl Enc<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(&(b.len() as u32).to_le_bytes());
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn bool(&mut self, b: bool) {
        self.0.push(u8::from(b));
    }
    fn count(&mut self, n: usize) {
        self.0.extend_from_slice(&(n as u32).to_le_bytes());
    }
}

fn encode(d: &Definitions, out: &mut Vec<u8>) {
    let mut e = Enc(out);
    e.count(d.vhosts.len());
    for v in &d.vhosts {
        e.str(&v.name);
    }
    e.count(d.users.len());
    for u in &d.users {
        e.str(&u.name);
        e.str(&u.password_hash);
        e.count(u.tags.len());
        for t in &u.tags {
            e.str(t);
        }
    }
    e.count(d.permissions.len());
    for p in &d.permissions {
        for s in [&p.user, &p.vhost, &p.configure, &p.write, &p.read] {
            e.str(s);
        }
    }
    e.count(d.exchanges.len());
    for x in &d.exchanges {
        e.str(&x.vhost);
        e.str(&x.name);
        e.str(&x.kind);
        e.bool(x.durable);
        e.bool(x.auto_delete);
        e.bool(x.internal);
        e.bytes(&x.arguments);
    }
    e.count(d.queues.len());
    for q in &d.queues {
        e.str(&q.vhost);
        e.str(&q.name);
        e.bool(q.durable);
        e.bool(q.auto_delete);
        e.bytes(&q.arguments);
    }
    e.count(d.bindings.len());
    for b in &d.bindings {
        e.str(&b.vhost);
        e.str(&b.source);
        e.str(&b.destination);
        e.bool(b.destination_is_queue);
        e.str(&b.routing_key);
        e.bytes(&b.arguments);
    }
}

struct Dec<'a> {
    buf: &'a [u8],
    at: usize,
}

type DecResult<T> = Result<T, String>;

impl Dec<'_> {
    fn take(&mut self, n: usize) -> DecResult<&[u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or("truncated payload")?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u32(&mut self) -> DecResult<u32> {
        Ok(format::le_u32(self.take(4)?))
    }
    fn count(&mut self) -> DecResult<usize> {
        let n = self.u32()? as usize;
        // Every entry takes at least one byte: a count beyond the rest is corrupt, and checking
        // it keeps a damaged count from reserving gigabytes.
        if n > self.buf.len() - self.at {
            return Err(format!("count {n} exceeds the remaining payload"));
        }
        Ok(n)
    }
    fn bytes(&mut self) -> DecResult<Vec<u8>> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn str(&mut self) -> DecResult<String> {
        String::from_utf8(self.bytes()?).map_err(|_| "string is not UTF-8".to_string())
    }
    fn bool(&mut self) -> DecResult<bool> {
        match self.take(1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(format!("invalid boolean {b}")),
        }
    }
    fn list<T>(&mut self, mut item: impl FnMut(&mut Self) -> DecResult<T>) -> DecResult<Vec<T>> {
        let n = self.count()?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(item(self)?);
        }
        Ok(v)
    }
}

fn decode(buf: &[u8]) -> DecResult<Definitions> {
    let mut d = Dec { buf, at: 0 };
    let defs = Definitions {
        vhosts: d.list(|d| Ok(VhostDef { name: d.str()? }))?,
        users: d.list(|d| {
            Ok(UserDef {
                name: d.str()?,
                password_hash: d.str()?,
                tags: d.list(|d| d.str())?,
            })
        })?,
        permissions: d.list(|d| {
            Ok(PermissionDef {
                user: d.str()?,
                vhost: d.str()?,
                configure: d.str()?,
                write: d.str()?,
                read: d.str()?,
            })
        })?,
        exchanges: d.list(|d| {
            Ok(ExchangeDef {
                vhost: d.str()?,
                name: d.str()?,
                kind: d.str()?,
                durable: d.bool()?,
                auto_delete: d.bool()?,
                internal: d.bool()?,
                arguments: d.bytes()?,
            })
        })?,
        queues: d.list(|d| {
            Ok(QueueDef {
                vhost: d.str()?,
                name: d.str()?,
                durable: d.bool()?,
                auto_delete: d.bool()?,
                arguments: d.bytes()?,
            })
        })?,
        bindings: d.list(|d| {
            Ok(BindingDef {
                vhost: d.str()?,
                source: d.str()?,
                destination: d.str()?,
                destination_is_queue: d.bool()?,
                routing_key: d.str()?,
                arguments: d.bytes()?,
            })
        })?,
    };
    if d.at != buf.len() {
        return Err(format!("{} trailing bytes", buf.len() - d.at));
    }
    Ok(defs)
}
