//! A VM's records: written to the store before any answer reports a change, deferred (and
//! retried) when the store cannot take a write of something that already happened, and the
//! journal of who changed what.

use super::*;

impl Manager {
    /// Write the record durably, then make it the in-memory truth.
    pub(super) fn persist(
        &self,
        slot: &VmSlot,
        change: impl FnOnce(&mut VmInfo),
    ) -> Result<VmInfo> {
        self.commit(slot, |i| {
            change(i);
            Ok(Vec::new())
        })
    }

    /// Change the record and write it, with the other writes `change` returns, in one durable
    /// transaction; only then does the in-memory record change. An error changes nothing.
    pub(super) fn commit(
        &self,
        slot: &VmSlot,
        change: impl FnOnce(&mut VmInfo) -> Result<Vec<Write>>,
    ) -> Result<VmInfo> {
        let mut info = lock(&slot.info);
        Self::flush_pending(&*self.s.store, slot, &info)?;
        let mut next = info.clone();
        let mut writes = change(&mut next)?;
        next.agent = None;
        writes.insert(
            0,
            drover_store::put(VMS, &next.name, &VmRecord::from(&next))?,
        );
        let t = Instant::now();
        self.s.store.apply(writes)?;
        tracing::debug!(
            vm = next.name,
            us = t.elapsed().as_micros() as u64,
            "record committed"
        );
        *info = next.clone();
        Ok(next)
    }

    /// Write what an earlier [`Manager::commit_or_defer`] could not, with the current record.
    pub(super) fn flush_pending(store: &dyn Store, slot: &VmSlot, info: &VmInfo) -> Result<()> {
        let mut pending = lock(&slot.pending);
        if pending.is_empty() {
            return Ok(());
        }
        let mut writes = pending.clone();
        let mut current = info.clone();
        current.agent = None;
        writes.push(drover_store::put(
            VMS,
            &current.name,
            &VmRecord::from(&current),
        )?);
        store.apply(writes)?;
        pending.clear();
        tracing::info!(
            vm = info.name,
            "the store took the writes it had refused earlier"
        );
        Ok(())
    }

    /// Like [`Manager::commit`], for a change that has already happened whether or not the
    /// store takes it (QEMU exited, QEMU re-adopted): when the store fails (a full disk), the
    /// in-memory record changes anyway, so the VM is not shown `stopping` forever, and the
    /// writes are retried every 2 s until the store takes them (or a later change of this VM
    /// writes them first). A droverd killed meanwhile finds the truth again at re-adoption.
    pub(super) fn commit_or_defer(
        &self,
        slot: &Arc<VmSlot>,
        change: impl FnOnce(&mut VmInfo) -> Result<Vec<Write>>,
    ) -> Result<VmInfo> {
        let mut info = lock(&slot.info);
        let mut next = info.clone();
        let writes = change(&mut next)?;
        next.agent = None;
        let mut all = lock(&slot.pending).clone();
        all.extend(writes.iter().cloned());
        let record = drover_store::put(VMS, &next.name, &VmRecord::from(&next))?;
        all.push(record.clone());
        match self.s.store.apply(all) {
            Ok(()) => lock(&slot.pending).clear(),
            Err(e) => {
                tracing::warn!(
                    vm = next.name,
                    "the store refused a record ({e}); keeping it in memory and retrying"
                );
                let first = {
                    let mut pending = lock(&slot.pending);
                    let first = pending.is_empty();
                    // The record itself too, so something is pending even without other writes
                    // (a flush writes the record as it is then, after these).
                    pending.extend(writes);
                    pending.push(record);
                    first
                };
                if first {
                    let (store_of, slot) = (self.clone(), slot.clone());
                    tokio::spawn(async move {
                        loop {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                            // Each lock in its own statement: `flush_pending` takes them again.
                            let info = lock(&slot.info).clone();
                            let empty = lock(&slot.pending).is_empty();
                            if empty
                                || Self::flush_pending(&*store_of.s.store, &slot, &info).is_ok()
                            {
                                break;
                            }
                        }
                    });
                }
            }
        }
        *info = next.clone();
        Ok(next)
    }

    /// A VM's configuration history (a VM created before histories existed has an empty one).
    pub(super) fn history(&self, info: &VmInfo) -> Result<ConfigHistory> {
        Ok(self
            .s
            .store
            .get::<ConfigHistory>(HISTORY, &info.name)?
            .unwrap_or_else(|| ConfigHistory::new(info.config.clone())))
    }

    /// A sequence number for journal and audit keys and guest tickets: increasing, and (seeded
    /// from the clock at start) still increasing across droverd restarts.
    pub(super) fn next_seq(&self) -> u64 {
        self.s
            .journal_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// A journal record of a change, as a store write.
    pub(super) fn journal(
        &self,
        vm: &str,
        who: &str,
        kind: &str,
        changes: Vec<String>,
    ) -> Result<Write> {
        let seq = self.next_seq();
        let entry = JournalEntry {
            seq,
            at_ms: hostfacts::now_ms(),
            who: who.to_string(),
            changes,
            kind: kind.to_string(),
        };
        Ok(drover_store::put(
            JOURNAL,
            &format!("{vm}/{seq:020}"),
            &entry,
        )?)
    }

    /// The journal of one VM, oldest first.
    pub fn journal_of(&self, name: &str) -> Result<Vec<JournalEntry>> {
        self.slot(name)?;
        self.vm_records(JOURNAL, name)
    }

    /// The records of one VM in a table keyed `<vm>/<key>`, in key order.
    pub(super) fn vm_records<T: serde::de::DeserializeOwned>(
        &self,
        table: &str,
        vm: &str,
    ) -> Result<Vec<T>> {
        Ok(self
            .s
            .store
            .list_prefix::<T>(table, &format!("{vm}/"))?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }
}
