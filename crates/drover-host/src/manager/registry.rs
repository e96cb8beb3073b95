//! What each feature hands the lifecycle: its subscriber to VM events and the store tables in
//! which it keeps rows of a VM. A new feature adds its entry here, next to the others, and
//! declares both in its own module; the lifecycle itself names no feature.
//!
//! - [`SUBSCRIBERS`]: called in this order for every [`VmEvent`] (see [`crate::vm_events`]).
//! - [`VM_TABLES`]: every table with rows that belong to one VM. A delete removes all of them
//!   in one transaction, a migration carries them to the other host (all but [`super::VMS`],
//!   which it rewrites), and an arriving migration accepts rows in these tables only.

use super::Manager;
use crate::vm_events::{Subscriber, VmEvent};

/// Every feature's subscription, in the order they run. The saved states' comes first: a VM's
/// standby receiver is gone before anything else hears of its exit.
pub(super) static SUBSCRIBERS: [Subscriber<Manager>; 4] = [
    super::state::SUBSCRIBER,
    crate::events::SUBSCRIBER,
    super::guest::SUBSCRIBER,
    super::migrate::SUBSCRIBER,
];

/// How a table's rows of VM `n` are keyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Keyed {
    /// One row, keyed `n`.
    ByName,
    /// Any number of rows, keyed `n/...`.
    ByPrefix,
}

/// A table that holds rows of single VMs.
#[derive(Debug, Clone, Copy)]
pub(super) struct VmTable {
    /// The table's name in the store.
    pub name: &'static str,
    /// How its rows name their VM.
    pub keyed: Keyed,
}

impl VmTable {
    /// A table with one row per VM, keyed by its name.
    pub const fn by_name(name: &'static str) -> Self {
        VmTable {
            name,
            keyed: Keyed::ByName,
        }
    }

    /// A table whose rows of VM `n` are keyed `n/...`.
    pub const fn by_prefix(name: &'static str) -> Self {
        VmTable {
            name,
            keyed: Keyed::ByPrefix,
        }
    }

    /// Whether row `key` of this table belongs to VM `vm`.
    pub fn owns(&self, key: &str, vm: &str) -> bool {
        match self.keyed {
            Keyed::ByName => key == vm,
            Keyed::ByPrefix => key.strip_prefix(vm).is_some_and(|r| r.starts_with('/')),
        }
    }
}

/// Each feature's per-VM tables (each declared in the feature's own module).
pub(super) static VM_TABLES: &[&[VmTable]] = &[
    super::TABLES,
    super::identity::TABLES,
    super::guest::TABLES,
    super::state::TABLES,
    super::layers::TABLES,
];

/// Every per-VM table: the record first, then those keyed by name, then those keyed by prefix.
pub(super) fn vm_tables() -> impl Iterator<Item = &'static VmTable> {
    let all = || VM_TABLES.iter().flat_map(|t| t.iter());
    all()
        .filter(|t| t.keyed == Keyed::ByName)
        .chain(all().filter(|t| t.keyed == Keyed::ByPrefix))
}

/// Whether `table`/`key` is a row of VM `vm` (what an arriving migration may write).
pub(super) fn owns(table: &str, key: &str, vm: &str) -> bool {
    vm_tables().any(|t| t.name == table && t.owns(key, vm))
}

impl Manager {
    /// Tell every feature what happened to a VM; returns once each has reacted.
    pub(super) async fn publish(&self, event: VmEvent) {
        self.s.bus.publish(self, &event).await;
    }
}

#[cfg(test)]
mod tests {
    use super::super::{exit, helpers, lock, migrate, DELETING};
    use super::*;
    use crate::auth::Caller;
    use drover_store::{Store, StoreError, StoreExt, Write};
    use std::sync::{Arc, Mutex};

    /// Tables keyed by VM that are not its records, each for a reason: a helper process's
    /// record (`helpers`, dropped when the delete kills the helpers), a migration's destination
    /// (`migrations`, dropped with its mark), a delete in progress (`deleting`).
    const NOT_RECORDS: &[&str] = &[helpers::HELPERS, migrate::MIGRATIONS, DELETING];

    /// A store that notes every row written.
    struct Noting {
        inner: drover_store::RedbStore,
        written: Arc<Mutex<Vec<(String, String)>>>,
    }

    impl Store for Noting {
        fn get_raw(&self, t: &str, k: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get_raw(t, k)
        }
        fn list_raw(&self, t: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            self.inner.list_raw(t)
        }
        fn apply(&self, w: Vec<Write>) -> Result<(), StoreError> {
            for w in &w {
                if let Write::Put { table, key, .. } = w {
                    lock(&self.written).push((table.clone(), key.clone()));
                }
            }
            self.inner.apply(w)
        }
    }

    async fn manager(dir: &std::path::Path) -> (Manager, Arc<Mutex<Vec<(String, String)>>>) {
        let written = Arc::default();
        let store = Noting {
            inner: drover_store::RedbStore::open(&dir.join("d.redb")).unwrap(),
            written: Arc::clone(&written),
        };
        let cfg = crate::manager::DaemonConfig::for_tests(dir);
        let m = Manager::open(cfg, Box::new(store)).await.unwrap();
        (m, written)
    }

    fn spec(name: &str) -> drover_model::VmSpec {
        drover_model::VmSpec::from_toml(&format!(
            "name = \"{name}\"\nmemory = \"64M\"\n[[disk]]\nid = \"d\"\nsize = \"8M\""
        ))
        .unwrap()
    }

    /// What the features write about one VM, without a QEMU, lands in tables the registry
    /// lists (or in the few that are deliberately not the VM's records).
    #[tokio::test]
    async fn every_table_written_per_vm_is_in_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let (m, written) = manager(dir.path()).await;
        let daemon = Caller::daemon();
        m.create(spec("v"), &daemon).await.unwrap();
        m.guest_grant("v", "app", &["list".to_string()], &daemon)
            .unwrap();
        m.set_persist(
            "v",
            drover_api::PersistRequest {
                enabled: Some(true),
                mode: Some(drover_model::PersistMode::Snapshot),
            },
            &daemon,
        )
        .await
        .unwrap();
        m.regenerate_generation_id("v", "test").unwrap();
        // A stop of a VM that ran a changed config seals it: history and journal rows.
        let slot = m.slot("v").unwrap();
        m.persist(&slot, |i| {
            let mut ran = i.config.clone();
            ran.cpus += 1;
            i.running_config = Some(ran);
        })
        .unwrap();
        m.record_stopped(&slot, exit("guest-poweroff", None))
            .unwrap();
        let written = lock(&written).clone();
        let mut tables: Vec<&str> = written
            .iter()
            .filter(|(_, k)| k == "v" || k.starts_with("v/"))
            .map(|(t, _)| t.as_str())
            .collect();
        tables.sort();
        tables.dedup();
        for t in [
            super::super::VMS,
            super::super::HISTORY,
            super::super::JOURNAL,
        ] {
            assert!(tables.contains(&t), "{t} written: {tables:?}");
        }
        for t in &tables {
            assert!(
                vm_tables().any(|r| r.name == *t) || NOT_RECORDS.contains(t),
                "table {t} holds rows of VM v but no feature declares it (add it to its TABLES)"
            );
        }
    }

    /// A delete leaves no row of the VM in any table of the registry, and every other VM's rows
    /// where they were.
    #[tokio::test]
    async fn deleting_a_vm_leaves_no_row_in_any_of_its_tables() {
        let dir = tempfile::tempdir().unwrap();
        let (m, _) = manager(dir.path()).await;
        let daemon = Caller::daemon();
        // `go` is a prefix of `gone`: a row of `gone` must not be taken for one of `go`.
        for vm in ["gone", "go"] {
            m.create(spec(vm), &daemon).await.unwrap();
        }
        let key = |t: &VmTable, vm: &str| match t.keyed {
            Keyed::ByName => vm.to_string(),
            Keyed::ByPrefix => format!("{vm}/x"),
        };
        let mut planted = 0;
        for t in vm_tables() {
            for vm in ["gone", "go"] {
                // Rows create wrote stay as they are (the VM's record is read back).
                if m.s.store.get_raw(t.name, &key(t, vm)).unwrap().is_none() {
                    m.s.store
                        .apply(vec![Write::Put {
                            table: t.name.into(),
                            key: key(t, vm),
                            value: b"{}".to_vec(),
                        }])
                        .unwrap();
                    planted += 1;
                }
            }
        }
        assert!(planted >= 2 * 7, "rows planted in the feature tables");
        let mut found: Vec<String> = m
            .vm_rows("gone")
            .unwrap()
            .into_iter()
            .map(|r| r.0)
            .collect();
        found.dedup();
        let all: Vec<&str> = vm_tables().map(|t| t.name).collect();
        assert_eq!(found, all, "a row of VM gone in every table");
        m.delete("gone", false, true, &daemon).await.unwrap();
        for t in vm_tables() {
            for (k, _) in m.s.store.list_raw(t.name).unwrap() {
                assert!(!t.owns(&k, "gone"), "{}/{k} left after the delete", t.name);
            }
            assert!(
                m.s.store.get_raw(t.name, &key(t, "go")).unwrap().is_some(),
                "{} lost a row of another VM",
                t.name
            );
        }
        assert!(m.vm_rows("gone").unwrap().is_empty());
        assert!(m
            .s
            .store
            .list::<serde_json::Value>(DELETING)
            .unwrap()
            .is_empty());
    }

    /// The event feed hears of what the lifecycle publishes: a stop as `stopped` or `exited`
    /// by its reason, and only once it is recorded.
    #[tokio::test]
    async fn the_feed_tells_what_the_lifecycle_publishes() {
        let dir = tempfile::tempdir().unwrap();
        let (m, _) = manager(dir.path()).await;
        let daemon = Caller::daemon();
        m.create(spec("f"), &daemon).await.unwrap();
        let stop = |reason: &str, recorded| VmEvent::Exited {
            vm: "f".into(),
            exit: exit(reason, Some("why".into())),
            recorded,
        };
        m.publish(stop("operator-stop", true)).await;
        m.publish(stop("crashed", false)).await;
        m.publish(stop("guest-poweroff", true)).await;
        m.publish(VmEvent::QemuGone { vm: "f".into() }).await;
        m.delete("f", false, true, &daemon).await.unwrap();
        let feed: Vec<(String, String)> = m
            .events()
            .recent(None)
            .into_iter()
            .map(|e| {
                let reason = e.details["reason"].as_str().unwrap_or("").to_string();
                (e.kind.as_str().to_string(), reason)
            })
            .collect();
        let want = [
            ("created", ""),
            ("stopped", "operator-stop"),
            ("exited", "guest-poweroff"),
            ("deleted", ""),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(k, r)| (k.to_string(), r.to_string()))
            .collect();
        assert_eq!(feed, want);
    }

    #[test]
    fn a_prefix_row_belongs_to_its_vm_only() {
        let t = VmTable::by_prefix("journal");
        assert!(t.owns("web/1", "web"));
        assert!(!t.owns("web1/1", "web") && !t.owns("web", "web") && !t.owns("we/1", "web"));
        let n = VmTable::by_name("history");
        assert!(n.owns("web", "web") && !n.owns("web/1", "web"));
        assert!(owns("states", "web/s1", "web") && !owns("images", "web", "web"));
    }
}
