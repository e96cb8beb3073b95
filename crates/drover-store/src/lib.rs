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

/// The embedded engine: one redb file.
pub struct RedbStore {
    db: redb::Database,
    path: PathBuf,
}

impl RedbStore {
    /// Open or create the database. Fails if another process holds it (two droverd's on one
    /// state dir would corrupt each other's view).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = redb::Database::create(path).map_err(|e| StoreError::Open {
            path: path.to_path_buf(),
            message: match e {
                redb::DatabaseError::DatabaseAlreadyOpen => {
                    "it is in use by another process (is another droverd running on this state dir?)".into()
                }
                other => other.to_string(),
            },
        })?;
        Ok(RedbStore {
            db,
            path: path.to_path_buf(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn def(table: &str) -> redb::TableDefinition<'_, &'static str, &'static [u8]> {
    redb::TableDefinition::new(table)
}

impl Store for RedbStore {
    fn get_raw(&self, table: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let err = |message: String| StoreError::Op {
            op: "get",
            table: table.into(),
            key: key.into(),
            message,
        };
        let tx = self.db.begin_read().map_err(|e| err(e.to_string()))?;
        let t = match tx.open_table(def(table)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(err(e.to_string())),
        };
        let v = t.get(key).map_err(|e| err(e.to_string()))?;
        Ok(v.map(|v| v.value().to_vec()))
    }

    fn list_raw(&self, table: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let err = |message: String| StoreError::Op {
            op: "list",
            table: table.into(),
            key: "*".into(),
            message,
        };
        let tx = self.db.begin_read().map_err(|e| err(e.to_string()))?;
        let t = match tx.open_table(def(table)) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(err(e.to_string())),
        };
        let mut out = Vec::new();
        for item in t.iter().map_err(|e| err(e.to_string()))? {
            let (k, v) = item.map_err(|e| err(e.to_string()))?;
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn apply(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let err = |message: String| StoreError::Op {
            op: "write",
            table: writes_table(&writes),
            key: String::new(),
            message,
        };
        let tx = self.db.begin_write().map_err(|e| err(e.to_string()))?;
        for w in &writes {
            match w {
                Write::Put { table, key, value } => {
                    let mut t = tx.open_table(def(table)).map_err(|e| err(e.to_string()))?;
                    t.insert(key.as_str(), value.as_slice())
                        .map_err(|e| err(e.to_string()))?;
                }
                Write::Delete { table, key } => {
                    let mut t = tx.open_table(def(table)).map_err(|e| err(e.to_string()))?;
                    t.remove(key.as_str()).map_err(|e| err(e.to_string()))?;
                }
            }
        }
        tx.commit().map_err(|e| err(e.to_string()))
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
