//! What a store that refuses writes, and a delete cut off, leave behind.

use super::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// A store that refuses every write while `full` is set, like one on a full disk.
struct Fillable {
    inner: drover_store::RedbStore,
    full: Arc<AtomicBool>,
}

impl Store for Fillable {
    fn get_raw(
        &self,
        t: &str,
        k: &str,
    ) -> std::result::Result<Option<Vec<u8>>, drover_store::StoreError> {
        self.inner.get_raw(t, k)
    }
    fn list_raw(
        &self,
        t: &str,
    ) -> std::result::Result<Vec<(String, Vec<u8>)>, drover_store::StoreError> {
        self.inner.list_raw(t)
    }
    fn apply(&self, w: Vec<Write>) -> std::result::Result<(), drover_store::StoreError> {
        if self.full.load(Ordering::SeqCst) {
            return Err(drover_store::StoreError::Op {
                op: "write",
                table: "vms".into(),
                key: String::new(),
                message: "No space left on device (os error 28)".into(),
            });
        }
        self.inner.apply(w)
    }
}

async fn manager(dir: &Path, full: Arc<AtomicBool>) -> Manager {
    let inner = drover_store::RedbStore::open(&dir.join("d.redb")).unwrap();
    Manager::open(
        DaemonConfig::for_tests(dir),
        Box::new(Fillable { inner, full }),
    )
    .await
    .unwrap()
}

fn spec(name: &str) -> VmSpec {
    VmSpec::from_toml(&format!(
        "name = \"{name}\"\nmemory = \"64M\"\n[[disk]]\nid = \"d\"\nsize = \"8M\""
    ))
    .unwrap()
}

/// A change that already happened is shown at once when the store refuses it, and written
/// by itself once the store takes writes again; a change meanwhile fails cleanly.
#[tokio::test]
async fn refused_records_are_kept_and_written_once_the_store_works() {
    let dir = tempfile::tempdir().unwrap();
    let full = Arc::new(AtomicBool::new(false));
    let m = manager(dir.path(), full.clone()).await;
    m.create(spec("v"), &Caller::daemon()).await.unwrap();
    let slot = m.slot("v").unwrap();
    m.persist(&slot, |i| i.state = VmState::Stopping).unwrap();
    full.store(true, Ordering::SeqCst);
    m.record_stopped(&slot, exit("operator-stop", None))
        .unwrap();
    assert_eq!(m.get("v").unwrap().state, VmState::Stopped, "shown at once");
    let stored: VmRecord = m.s.store.get(VMS, "v").unwrap().unwrap();
    assert_eq!(stored.state, VmState::Stopping, "not on disk yet");
    assert!(m.persist(&slot, |i| i.persist = false).is_err());
    full.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stored: VmRecord = m.s.store.get(VMS, "v").unwrap().unwrap();
        if stored.state == VmState::Stopped {
            assert_eq!(stored.last_exit.unwrap().reason, "operator-stop");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the refused record was never written"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A delete recorded but cut off before its files went is finished at the next open.
#[tokio::test]
async fn an_interrupted_delete_is_finished_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let full = Arc::new(AtomicBool::new(false));
    let m = manager(dir.path(), full.clone()).await;
    let info = m.create(spec("gone"), &Caller::daemon()).await.unwrap();
    let disk = info.config.disks[0].path.clone();
    assert!(disk.exists());
    // What delete's one transaction leaves when droverd dies right after it.
    let mut writes: Vec<Write> = m
        .vm_rows("gone")
        .unwrap()
        .into_iter()
        .map(|(table, key, _)| Write::Delete { table, key })
        .collect();
    writes.push(
        drover_store::put(
            DELETING,
            "gone",
            &DeleteIntent {
                owned_disks: vec![disk.clone()],
            },
        )
        .unwrap(),
    );
    m.s.store.apply(writes).unwrap();
    std::fs::create_dir_all(m.run_paths("gone").dir).unwrap();
    std::fs::create_dir_all(m.ram_dir()).unwrap();
    std::fs::write(m.ram_dir().join("gone@s1"), b"ram").unwrap();
    drop(m);
    let m = manager(dir.path(), full).await;
    assert!(m.list().is_empty());
    assert!(!disk.exists(), "owned disk removed");
    assert!(!m.vm_dir("gone").exists() && !m.run_paths("gone").dir.exists());
    assert!(!m.ram_dir().join("gone@s1").exists());
    assert!(m.s.store.list_raw(DELETING).unwrap().is_empty());
    let _ = std::fs::remove_dir_all(m.ram_dir());
}
