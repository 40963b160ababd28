//! DefinitionsFile: save/reopen, atomic replacement, corruption and versions.

use std::sync::Arc;

use rill_store::backend::{FaultyBackend, FileBackend};
use rill_store::{
    BindingDef, Definitions, DefinitionsFile, ExchangeDef, PermissionDef, QueueDef, StoreError,
    UserDef, VhostDef,
};

fn sample(n: usize) -> Definitions {
    Definitions {
        vhosts: vec![
            VhostDef { name: "/".into() },
            VhostDef {
                name: "prod\u{e9}".into(),
            },
        ],
        users: vec![UserDef {
            name: "guest".into(),
            password_hash: "hash".into(),
            tags: vec!["administrator".into(), "monitoring".into()],
        }],
        permissions: vec![PermissionDef {
            user: "guest".into(),
            vhost: "/".into(),
            configure: ".*".into(),
            write: ".*".into(),
            read: "".into(),
        }],
        exchanges: (0..n)
            .map(|i| ExchangeDef {
                vhost: "/".into(),
                name: format!("ex{i}"),
                kind: "topic".into(),
                durable: true,
                auto_delete: i % 2 == 0,
                internal: i % 3 == 0,
                arguments: vec![i as u8; i % 5],
            })
            .collect(),
        queues: (0..n)
            .map(|i| QueueDef {
                vhost: "/".into(),
                name: format!("q{i}"),
                durable: true,
                auto_delete: false,
                arguments: vec![1, 2, 3],
            })
            .collect(),
        bindings: (0..n)
            .map(|i| BindingDef {
                vhost: "/".into(),
                source: format!("ex{i}"),
                destination: format!("q{i}"),
                destination_is_queue: i % 4 != 0,
                routing_key: format!("a.{i}.#"),
                arguments: vec![],
            })
            .collect(),
    }
}

#[test]
fn save_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (mut f, loaded) = DefinitionsFile::open(dir.path()).unwrap();
    assert_eq!(loaded, None);
    f.save(&sample(3)).unwrap();
    f.save(&sample(10)).unwrap();
    let (_, loaded) = DefinitionsFile::open(dir.path()).unwrap();
    assert_eq!(loaded, Some(sample(10)));
    f.save(&Definitions::default()).unwrap();
    let (_, loaded) = DefinitionsFile::open(dir.path()).unwrap();
    assert_eq!(loaded, Some(Definitions::default()));
}

#[test]
fn leftover_temp_file_from_a_crash_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (mut f, _) = DefinitionsFile::open(dir.path()).unwrap();
    f.save(&sample(2)).unwrap();
    // A crash mid-save leaves a partial temp file; the real file is the old version.
    std::fs::write(
        dir.path().join("definitions.rill.tmp"),
        b"RILLDEF\0\x01\0\0\0garbage",
    )
    .unwrap();
    let (_, loaded) = DefinitionsFile::open(dir.path()).unwrap();
    assert_eq!(loaded, Some(sample(2)));
    assert!(!dir.path().join("definitions.rill.tmp").exists());
    // Same with no real file at all (crash during the very first save).
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("definitions.rill.tmp"), b"partial").unwrap();
    assert_eq!(DefinitionsFile::open(dir.path()).unwrap().1, None);
}

#[test]
fn failed_save_leaves_the_old_definitions() {
    let dir = tempfile::tempdir().unwrap();
    let fb = FaultyBackend::new(Arc::new(FileBackend));
    let (mut f, _) = DefinitionsFile::open_with(dir.path(), Arc::new(fb.clone())).unwrap();
    f.save(&sample(1)).unwrap();
    fb.fail_syncs(true);
    assert!(matches!(f.save(&sample(5)), Err(StoreError::Io { .. })));
    fb.fail_syncs(false);
    let (_, loaded) = DefinitionsFile::open(dir.path()).unwrap();
    assert_eq!(loaded, Some(sample(1)));
}

#[test]
fn every_truncation_or_bit_flip_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (mut f, _) = DefinitionsFile::open(dir.path()).unwrap();
    f.save(&sample(2)).unwrap();
    let path = f.path();
    let good = std::fs::read(&path).unwrap();
    for cut in 0..good.len() {
        std::fs::write(&path, &good[..cut]).unwrap();
        assert!(DefinitionsFile::open(dir.path()).is_err(), "cut at {cut}");
    }
    for at in 0..good.len() {
        let mut bad = good.clone();
        bad[at] ^= 0x01;
        std::fs::write(&path, &bad).unwrap();
        match DefinitionsFile::open(dir.path()) {
            Err(StoreError::Corrupt { .. }) | Err(StoreError::UnsupportedVersion { .. }) => {}
            other => panic!("flip at {at}: {other:?}"),
        }
    }
}

#[test]
fn newer_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut f, _) = DefinitionsFile::open(dir.path()).unwrap();
    f.save(&sample(1)).unwrap();
    let mut data = std::fs::read(f.path()).unwrap();
    data[8..12].copy_from_slice(&7u32.to_le_bytes());
    std::fs::write(f.path(), &data).unwrap();
    assert!(matches!(
        DefinitionsFile::open(dir.path()),
        Err(StoreError::UnsupportedVersion { found: 7, .. })
    ));
}
