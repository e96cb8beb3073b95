//! droverd's durable records.
//!
//! Records are JSON values under a key in a named table. Every write commits durably (redb's
//! default durability fsyncs) before it returns, so droverd can acknowledge a change only once it
//! would survive a crash. The [`Store`] trait is the seam where the cluster's etcd engine plugs in.

use redb::ReadableTable;
use serde::{de::DeserializeOwned, Serialize};
use std::path::{Path, PathBuf};

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened (locked by another droverd, damaged, unreadable).
    #[error("cannot open store {path}: {message}")]
    Open {
        /// Database file.
        path: PathBuf,
        /// Cause.
        message: String,
    },
    /// A read or write failed.
    #[error("store {op} on {table}/{key}: {message}")]
    Op {
        /// What was being done.
        op: &'static str,
        /// Table.
        table: String,
        /// Key.
        key: String,
        /// Cause.
        message: String,
    },
    /// The database file is damaged (truncated, overwritten, bit-flipped).
    #[error("the store {path} is damaged ({message}); start droverd with --recover-store to go back to its last checkpoint ({path}.checkpoint), or move the file away to start with an empty store")]
    Damaged {
        /// Database file.
        path: PathBuf,
        /// What the engine found.
        message: String,
    },
    /// A stored value could not be decoded.
    #[error("stored record {table}/{key} is unreadable: {message}")]
    Decode {
        /// Table.
        table: String,
        /// Key.
        key: String,
        /// Cause.
        message: String,
    },
}

/// One write in a [`Store::apply`] batch.
#[derive(Debug, Clone)]
pub enum Write {
    /// Set `table/key` to the bytes.
    Put {
        /// Table.
        table: String,
        /// Key.
        key: String,
        /// Value bytes (JSON).
        value: Vec<u8>,
    },
    /// Remove `table/key`.
    Delete {
        /// Table.
        table: String,
        /// Key.
        key: String,
    },
}

/// A durable table/key/value store.
pub trait Store: Send + Sync {
    /// Read one value.
    fn get_raw(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// All keys and values of a table, in key order.
    fn list_raw(&self, table: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Apply writes atomically and durably.
    fn apply(&self, writes: Vec<Write>) -> Result<(), StoreError>;
}

impl<S: Store + ?Sized> Store for std::sync::Arc<S> {
    fn get_raw(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        (**self).get_raw(table, key)
    }
    fn list_raw(&self, table: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        (**self).list_raw(table)
    }
    fn apply(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        (**self).apply(writes)
    }
}

/// Typed helpers over any [`Store`].
pub trait StoreExt: Store {
    /// Read and decode one record.
    fn get<T: DeserializeOwned>(&self, table: &str, key: &str) -> Result<Option<T>, StoreError> {
        match self.get_raw(table, key)? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StoreError::Decode {
                        table: table.into(),
                        key: key.into(),
                        message: e.to_string(),
                    })
            }
        }
    }
    /// Read and decode a whole table.
    fn list<T: DeserializeOwned>(&self, table: &str) -> Result<Vec<(String, T)>, StoreError> {
        self.list_raw(table)?
            .into_iter()
            .map(|(k, v)| {
                serde_json::from_slice(&v)
                    .map(|t| (k.clone(), t))
                    .map_err(|e| StoreError::Decode {
                        table: table.into(),
                        key: k,
                        message: e.to_string(),
                    })
            })
            .collect()
    }
    /// Records whose key starts with `prefix` (e.g. `"web1/"`), with the rest of each key.
    fn list_prefix<T: DeserializeOwned>(
        &self,
        table: &str,
        prefix: &str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        Ok(self
            .list::<T>(table)?
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|rest| (rest.to_string(), v)))
            .collect())
    }
    /// Encode and write one record durably.
    fn put<T: Serialize>(&self, table: &str, key: &str, value: &T) -> Result<(), StoreError> {
        self.apply(vec![put(table, key, value)?])
    }
    /// Remove one record durably.
    fn delete(&self, table: &str, key: &str) -> Result<(), StoreError> {
        self.apply(vec![Write::Delete {
            table: table.into(),
            key: key.into(),
        }])
    }
}
impl<S: Store + ?Sized> StoreExt for S {}

/// Build a [`Write::Put`] from a serializable value.
pub fn put<T: Serialize>(table: &str, key: &str, value: &T) -> Result<Write, StoreError> {
    let value = serde_json::to_vec(value).map_err(|e| StoreError::Op {
        op: "encode",
        table: table.into(),
        key: key.into(),
        message: e.to_string(),
    })?;
    Ok(Write::Put {
        table: table.into(),
        key: key.into(),
        value,
    })
}

/// Opens (or re-opens) the redb database behind a [`RedbStore`].
type Opener = Box<dyn Fn() -> Result<redb::Database, redb::DatabaseError> + Send + Sync>;

/// The embedded engine: one redb file.
///
/// redb refuses every later write once one write hit an I/O error (`Previous I/O error
/// occurred`, e.g. after `No space left on device`); this engine then re-opens the file, so the
/// store works again as soon as the cause is gone, without a droverd restart. Writes are
/// absolute puts and deletes, so re-applying a batch whose commit failed is harmless.
pub struct RedbStore {
    db: std::sync::RwLock<Option<redb::Database>>,
    path: PathBuf,
    opener: Opener,
}

impl RedbStore {
    /// Open or create the database. Fails if another process holds it (two droverd's on one
    /// state dir would corrupt each other's view), and with [`StoreError::Damaged`] (never a
    /// panic) when the file is truncated or corrupted.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let p = path.to_path_buf();
        Self::open_with(path, Box::new(move || redb::Database::builder().create(&p)))
    }

    /// Open through `opener` (tests use a backend that can fail like a full disk).
    pub fn open_with(path: &Path, opener: Opener) -> Result<Self, StoreError> {
        let db = open_checked(path, &opener, true)?;
        Ok(RedbStore {
            db: std::sync::RwLock::new(Some(db)),
            path: path.to_path_buf(),
            opener,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `path` holds no store at all (missing, or 0 bytes: redb would start it empty).
    pub fn is_absent(path: &Path) -> bool {
        std::fs::metadata(path)
            .map(|m| m.len() == 0)
            .unwrap_or(true)
    }

    /// Run `f` on the open database; on an I/O failure (which poisons redb) re-open the file
    /// once and run it again.
    fn with_db<T>(
        &self,
        err: impl Fn(String) -> StoreError,
        f: impl Fn(&redb::Database) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        {
            let guard = self.db.read().unwrap_or_else(|e| e.into_inner());
            if let Some(db) = guard.as_ref() {
                match f(db) {
                    Ok(v) => return Ok(v),
                    Err(e) if !is_io(&e) => return Err(err(e.to_string())),
                    Err(_) => {}
                }
            }
        }
        self.reopen().map_err(|e| err(e.to_string()))?;
        let guard = self.db.read().unwrap_or_else(|e| e.into_inner());
        match guard.as_ref() {
            Some(db) => f(db).map_err(|e| err(e.to_string())),
            None => Err(err("the store is closed".into())),
        }
    }

    /// Drop the (poisoned) database and open the file again.
    fn reopen(&self) -> Result<(), StoreError> {
        let mut guard = self.db.write().unwrap_or_else(|e| e.into_inner());
        // The old handle holds the file lock: it must go before the file can be opened again.
        guard.take();
        match open_checked(&self.path, &self.opener, false) {
            Ok(db) => {
                *guard = Some(db);
                Ok(())
            }
            Err(e) => Err(StoreError::Open {
                path: self.path.clone(),
                message: format!(
                    "{e}; the store is unusable until this is fixed (free space on its filesystem?), and is retried at every request"
                ),
            }),
        }
    }

    #[allow(clippy::result_large_err)]
    /// Write a consistent copy of every table to `dest` (through a temporary file, synced, then
    /// renamed): what `droverd --recover-store` goes back to. Returns how many rows it holds.
    pub fn checkpoint(&self, dest: &Path) -> Result<u64, StoreError> {
        let tmp = dest.with_extension("tmp");
        let err = |message: String| StoreError::Op {
            op: "checkpoint",
            table: "*".into(),
            key: dest.display().to_string(),
            message,
        };
        let rows = self.with_db(err, |db| {
            let _ = std::fs::remove_file(&tmp);
            let out = redb::Database::create(&tmp)?;
            let rtx = db.begin_read()?;
            let wtx = out.begin_write()?;
            let mut rows = 0u64;
            for handle in rtx.list_tables()? {
                use redb::TableHandle;
                let name = handle.name().to_string();
                let src = rtx.open_table(def(&name))?;
                let mut dst = wtx.open_table(def(&name))?;
                for item in src.iter()? {
                    let (k, v) = item?;
                    dst.insert(k.value(), v.value())?;
                    rows += 1;
                }
            }
            wtx.commit()?;
            Ok(rows)
        })?;
        let synced = (|| -> std::io::Result<()> {
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, dest)?;
            if let Some(dir) = dest.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        })();
        synced.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            err(e.to_string())
        })?;
        Ok(rows)
    }

    /// Put the checkpoint at `checkpoint` back as the store at `path`: the current file (if
    /// any) is kept beside it as `<path>.damaged-<unix ms>`, which is returned. The checkpoint
    /// is checked first; a damaged checkpoint changes nothing.
    pub fn recover(path: &Path, checkpoint: &Path) -> Result<Option<PathBuf>, StoreError> {
        let open_err = |message: String| StoreError::Open {
            path: checkpoint.to_path_buf(),
            message,
        };
        if !checkpoint.is_file() {
            return Err(open_err(
                "there is no checkpoint to recover from (droverd writes one after each successful start and every 10 minutes)".into(),
            ));
        }
        {
            let c = checkpoint.to_path_buf();
            let opener: Opener = Box::new(move || redb::Database::builder().create(&c));
            drop(open_checked(checkpoint, &opener, true)?);
        }
        let io = |e: std::io::Error| open_err(e.to_string());
        let aside = if path.exists() {
            let ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0);
            let mut name = path.as_os_str().to_owned();
            name.push(format!(".damaged-{ms}"));
            let aside = PathBuf::from(name);
            std::fs::rename(path, &aside).map_err(io)?;
            Some(aside)
        } else {
            None
        };
        let tmp = path.with_extension("recovering");
        std::fs::copy(checkpoint, &tmp).map_err(io)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(aside)
    }
}

/// Whether a redb error means an I/O failure (after which redb refuses all writes).
fn is_io(e: &redb::Error) -> bool {
    matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo)
}

/// Open the database and check it, turning redb's assertions on a damaged file into
/// [`StoreError::Damaged`]. `quiet` silences the panic message while opening (at startup,
/// where a panic from another thread cannot be hidden by it).
fn open_checked(path: &Path, opener: &Opener, quiet: bool) -> Result<redb::Database, StoreError> {
    let hook = quiet.then(std::panic::take_hook);
    if quiet {
        std::panic::set_hook(Box::new(|_| {}));
    }
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut db = opener()?;
        // Checksums every page: a bit flip or a cut-off file shows here, not in a later read.
        db.check_integrity()?;
        Ok::<_, redb::DatabaseError>(db)
    }));
    if let Some(h) = hook {
        std::panic::set_hook(h);
    }
    let damaged = |message: String| StoreError::Damaged {
        path: path.to_path_buf(),
        message,
    };
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => Err(StoreError::Open {
            path: path.to_path_buf(),
            message:
                "it is in use by another process (is another droverd running on this state dir?)"
                    .into(),
        }),
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(m)))) => Err(damaged(m)),
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(e))))
            if e.kind() != std::io::ErrorKind::StorageFull
                && e.raw_os_error() != Some(28)
                && e.kind() != std::io::ErrorKind::PermissionDenied =>
        {
            // redb reads a cut-off file as an I/O error (unexpected end of file).
            Err(damaged(e.to_string()))
        }
        Ok(Err(other)) => Err(StoreError::Open {
            path: path.to_path_buf(),
            message: other.to_string(),
        }),
        Err(panic) => Err(damaged(
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the database engine failed on it".into()),
        )),
    }
}

fn def(table: &str) -> redb::TableDefinition<'_, &'static str, &'static [u8]> {
    redb::TableDefinition::new(table)
}

// redb's error type is large; it only travels one call up, on a failure.
#[allow(clippy::result_large_err)]
impl Store for RedbStore {
    fn get_raw(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let err = |message: String| StoreError::Op {
            op: "get",
            table: table.into(),
            key: key.into(),
            message,
        };
        self.with_db(err, |db| {
            let tx = db.begin_read()?;
            let t = match tx.open_table(def(table)) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let v = t.get(key)?;
            Ok(v.map(|v| v.value().to_vec()))
        })
    }

    fn list_raw(&self, table: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let err = |message: String| StoreError::Op {
            op: "list",
            table: table.into(),
            key: "*".into(),
            message,
        };
        self.with_db(err, |db| {
            let tx = db.begin_read()?;
            let t = match tx.open_table(def(table)) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            let mut out = Vec::new();
            for item in t.iter()? {
                let (k, v) = item?;
                out.push((k.value().to_string(), v.value().to_vec()));
            }
            Ok(out)
        })
    }

    fn apply(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let err = |message: String| StoreError::Op {
            op: "write",
            table: writes_table(&writes),
            key: String::new(),
            message,
        };
        self.with_db(err, |db| {
            let tx = db.begin_write()?;
            for w in &writes {
                match w {
                    Write::Put { table, key, value } => {
                        let mut t = tx.open_table(def(table))?;
                        t.insert(key.as_str(), value.as_slice())?;
                    }
                    Write::Delete { table, key } => {
                        let mut t = tx.open_table(def(table))?;
                        t.remove(key.as_str())?;
                    }
                }
            }
            tx.commit()?;
            Ok(())
        })
    }
}

fn writes_table(writes: &[Write]) -> String {
    match writes.first() {
        Some(Write::Put { table, .. }) | Some(Write::Delete { table, .. }) => table.clone(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn survives_reopen_and_refuses_second_opener() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        {
            let s = RedbStore::open(&path).unwrap();
            s.put("vms", "a", &serde_json::json!({"x": 1})).unwrap();
            assert!(RedbStore::open(&path).is_err());
        }
        let s = RedbStore::open(&path).unwrap();
        let v: Option<serde_json::Value> = s.get("vms", "a").unwrap();
        assert_eq!(v, Some(serde_json::json!({"x": 1})));
        assert_eq!(s.get::<serde_json::Value>("none", "a").unwrap(), None);
        assert!(s.list::<serde_json::Value>("none").unwrap().is_empty());
    }

    fn filled(path: &Path, n: u32) {
        let s = RedbStore::open(path).unwrap();
        for i in 0..n {
            s.put(
                "vms",
                &format!("vm{i}"),
                &serde_json::json!({"i": i, "pad": "x".repeat(300)}),
            )
            .unwrap();
        }
    }

    #[test]
    fn a_truncated_store_is_refused_as_damaged_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        filled(&path, 50);
        let len = std::fs::metadata(&path).unwrap().len();
        for cut in [len / 2, len / 3, 4096, 600, 100] {
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.set_len(cut).unwrap();
            drop(f);
            match RedbStore::open(&path) {
                Err(StoreError::Damaged { message, .. }) => assert!(!message.is_empty()),
                Err(other) => panic!("cut at {cut}: expected Damaged, got {other}"),
                Ok(_) => panic!("cut at {cut}: a truncated store opened"),
            }
        }
    }

    #[test]
    fn bit_flips_never_panic_and_never_read_wrong_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        filled(&path, 50);
        let good = std::fs::read(&path).unwrap();
        let mut refused = 0;
        // Flip one bit at many offsets, header and pages alike.
        for off in (0..good.len()).step_by(good.len() / 41 + 1) {
            let mut bad = good.clone();
            bad[off] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            match RedbStore::open(&path) {
                Err(StoreError::Damaged { .. }) | Err(StoreError::Open { .. }) => refused += 1,
                Err(other) => panic!("flip at {off}: {other}"),
                // A flip in unused space is harmless; what is read must still be right.
                Ok(s) => {
                    if let Ok(rows) = s.list::<serde_json::Value>("vms") {
                        for (k, v) in rows {
                            assert_eq!(format!("vm{}", v["i"]), k, "flip at {off} changed a value");
                        }
                    }
                }
            }
        }
        assert!(refused > 0, "no bit flip was detected at all");
    }

    #[test]
    fn checkpoint_and_recover_bring_back_the_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let cp = dir.path().join("db.redb.checkpoint");
        filled(&path, 10);
        {
            let s = RedbStore::open(&path).unwrap();
            s.put("roles", "1000", &"viewer").unwrap();
            assert_eq!(s.checkpoint(&cp).unwrap(), 11);
        }
        std::fs::write(&path, b"garbage, not a database at all").unwrap();
        assert!(matches!(
            RedbStore::open(&path),
            Err(StoreError::Damaged { .. })
        ));
        let aside = RedbStore::recover(&path, &cp)
            .unwrap()
            .expect("damaged file kept");
        assert_eq!(
            std::fs::read(&aside).unwrap(),
            b"garbage, not a database at all"
        );
        let s = RedbStore::open(&path).unwrap();
        assert_eq!(s.list::<serde_json::Value>("vms").unwrap().len(), 10);
        assert_eq!(
            s.get::<String>("roles", "1000").unwrap().as_deref(),
            Some("viewer")
        );
        drop(s);
        // A damaged checkpoint changes nothing.
        std::fs::write(&cp, b"junk").unwrap();
        assert!(RedbStore::recover(&path, &cp).is_err());
        assert!(RedbStore::open(&path).is_ok());
        assert!(RedbStore::is_absent(&dir.path().join("none")));
    }

    /// A file backend that fails writes with ENOSPC while `full` is set, like a full disk.
    #[derive(Debug)]
    struct Fillable {
        inner: redb::backends::FileBackend,
        full: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl Fillable {
        fn check(&self) -> std::io::Result<()> {
            if self.full.load(std::sync::atomic::Ordering::SeqCst) {
                Err(std::io::Error::from_raw_os_error(28))
            } else {
                Ok(())
            }
        }
    }

    impl redb::StorageBackend for Fillable {
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
            self.inner.read(offset, len)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.check()?;
            self.inner.set_len(len)
        }
        fn sync_data(&self, eventual: bool) -> std::io::Result<()> {
            self.check()?;
            self.inner.sync_data(eventual)
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.inner.write(offset, data)
        }
    }

    #[test]
    fn works_again_after_a_full_disk_without_reopening_by_hand() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let full = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, f) = (path.clone(), full.clone());
        let s = RedbStore::open_with(
            &path,
            Box::new(move || {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&p)?;
                redb::Database::builder().create_with_backend(Fillable {
                    inner: redb::backends::FileBackend::new(file)?,
                    full: f.clone(),
                })
            }),
        )
        .unwrap();
        s.put("vms", "a", &1u32).unwrap();
        full.store(true, std::sync::atomic::Ordering::SeqCst);
        let e = s.put("vms", "b", &2u32).unwrap_err().to_string();
        assert!(e.contains("No space left") || e.contains("28"), "{e}");
        // Reads still answer (from what was committed) or fail cleanly; a write keeps failing.
        assert!(s.put("vms", "c", &3u32).is_err());
        full.store(false, std::sync::atomic::Ordering::SeqCst);
        // Space is back: the same store object works, with what was committed before.
        s.put("vms", "d", &4u32).unwrap();
        let keys: Vec<String> = s
            .list::<u32>("vms")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert!(
            keys.contains(&"a".to_string()) && keys.contains(&"d".to_string()),
            "{keys:?}"
        );
        assert!(!keys.contains(&"c".to_string()), "{keys:?}");
        drop(s);
        let s = RedbStore::open(&path).unwrap();
        assert_eq!(s.get::<u32>("vms", "d").unwrap(), Some(4));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        /// The store behaves like a map under any sequence of puts and deletes.
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec((0u8..8, proptest::option::of(any::<u32>())), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let s = RedbStore::open(&dir.path().join("db")).unwrap();
            let mut model = BTreeMap::new();
            for (k, v) in ops {
                let key = format!("k{k}");
                match v {
                    Some(v) => { s.put("t", &key, &v).unwrap(); model.insert(key, v); }
                    None => { s.delete("t", &key).unwrap(); model.remove(&key); }
                }
            }
            let got: BTreeMap<String, u32> = s.list("t").unwrap().into_iter().collect();
            prop_assert_eq!(got, model);
        }
    }
}
