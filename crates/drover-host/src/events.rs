//! The event feed behind `GET /v1/events` and `drover events`: what happened to VMs, their
//! states and migrations, in the order droverd recorded it.
//!
//! - An event is emitted after the change it tells of is durable (the manager emits once the
//!   store took the record), so a follower never sees an event the store could forget.
//! - The feed keeps the last [`RECENT`] events in memory for `drover events` without
//!   `--follow` and for a follower that reconnects (`?since=SEQ`); they do not survive a
//!   restart of droverd (the store keeps the journal and the audit trail, not this feed).
//! - Followers are bounded: each reads from a [`tokio::sync::broadcast`] channel of
//!   [`CAPACITY`] events. One that falls further behind (a slow reader, a stalled connection)
//!   gets one last `lagged` line saying how many it missed and the stream ends: droverd never
//!   buffers without limit for a client.
//! - What the lifecycle tells (created, started, stopped or exited, deleted) reaches the feed as
//!   a subscriber of the VM event bus ([`crate::vm_events`]); features' own news (a save, a
//!   restore, a migration, a hibernation) is emitted by the feature once it is durable.

use crate::manager::Manager;
use crate::vm_events::{Reaction, Subscriber, VmEvent};
use drover_api::{Event, EventKind};
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::sync::broadcast;

/// Events kept for `drover events` without `--follow`.
pub const RECENT: usize = 1000;
/// Events a follower may be behind before it is dropped.
pub const CAPACITY: usize = 256;

/// The feed: a ring of recent events and the channel followers read.
pub struct Events {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Event>,
    /// Set when droverd stops: follow streams end rather than hold shutdown for its grace time.
    closed: tokio::sync::watch::Sender<bool>,
}

struct Inner {
    seq: u64,
    recent: VecDeque<Event>,
}

/// What a new follower gets: the recent events it asked for, then the live channel, with no
/// gap and no duplicate between the two.
pub struct Subscription {
    /// Recent events after `since`, oldest first.
    pub backlog: Vec<Event>,
    /// Live events from then on.
    pub live: broadcast::Receiver<Event>,
    /// Becomes true when droverd stops.
    pub closed: tokio::sync::watch::Receiver<bool>,
}

impl Default for Events {
    fn default() -> Self {
        Events::new(CAPACITY)
    }
}

impl Events {
    /// A feed whose followers may lag `capacity` events.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity);
        Events {
            inner: Mutex::new(Inner {
                // Sequence numbers start at the clock so they keep increasing across restarts
                // (a follower's `since` from before a restart then skips nothing new).
                seq: crate::hostfacts::now_ms().saturating_mul(1000),
                recent: VecDeque::with_capacity(RECENT),
            }),
            tx,
            closed: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Record an event and hand it to every follower.
    pub fn emit(&self, vm: &str, kind: EventKind, details: serde_json::Value) -> Event {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.seq += 1;
        let at_ms = crate::hostfacts::now_ms();
        let event = Event {
            seq: inner.seq,
            at_ms,
            time: humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(at_ms),
            )
            .to_string(),
            vm: Some(vm.to_string()),
            kind,
            details,
        };
        if inner.recent.len() == RECENT {
            inner.recent.pop_front();
        }
        inner.recent.push_back(event.clone());
        // Sent under the lock, so a subscriber's backlog and live channel neither overlap nor
        // leave a gap. No follower is no error.
        let _ = self.tx.send(event.clone());
        tracing::debug!(vm, kind = kind.as_str(), "event");
        event
    }

    /// Recent events after `since` (all kept ones without it), oldest first.
    pub fn recent(&self, since: Option<u64>) -> Vec<Event> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .recent
            .iter()
            .filter(|e| since.is_none_or(|s| e.seq > s))
            .cloned()
            .collect()
    }

    /// Follow the feed from after `since` (from now on without it).
    pub fn subscribe(&self, since: Option<u64>) -> Subscription {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let backlog = match since {
            Some(s) => inner.recent.iter().filter(|e| e.seq > s).cloned().collect(),
            None => Vec::new(),
        };
        Subscription {
            backlog,
            live: self.tx.subscribe(),
            closed: self.closed.subscribe(),
        }
    }

    /// End every follow stream (droverd is stopping).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }
}

/// The feed's part in the VM events: what the lifecycle tells becomes a line of the feed
/// (a stop only once it is recorded, so the feed never tells one the store could forget).
pub(crate) const SUBSCRIBER: Subscriber<Manager> = Subscriber::new("event feed", on_vm_event);

fn on_vm_event<'a>(m: &'a Manager, ev: &'a VmEvent) -> Reaction<'a> {
    let feed = m.events();
    match ev {
        VmEvent::Created { info } => {
            feed.emit(&info.name, EventKind::Created, serde_json::json!({}));
        }
        VmEvent::Started { info } => {
            feed.emit(
                &info.name,
                EventKind::Started,
                serde_json::json!({ "from": info.started_from, "pid": info.pid }),
            );
        }
        VmEvent::Exited {
            vm,
            exit,
            recorded: true,
        } => {
            let kind = match exit.reason.as_str() {
                "operator-stop" => EventKind::Stopped,
                _ => EventKind::Exited,
            };
            feed.emit(
                vm,
                kind,
                serde_json::json!({ "reason": exit.reason, "detail": exit.detail }),
            );
        }
        VmEvent::Deleted { vm } => {
            feed.emit(vm, EventKind::Deleted, serde_json::json!({}));
        }
        VmEvent::QemuGone { .. } | VmEvent::Exited { .. } | VmEvent::Readopted { .. } => {}
    }
    crate::vm_events::done()
}

/// The line a follower gets when it fell `missed` events behind, before its stream ends.
pub fn lagged(missed: u64) -> Event {
    let at_ms = crate::hostfacts::now_ms();
    Event {
        seq: 0,
        at_ms,
        time: humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(at_ms),
        )
        .to_string(),
        vm: None,
        kind: EventKind::Lagged,
        details: serde_json::json!({
            "missed": missed,
            "hint": "this client read too slowly and was dropped; reconnect with ?since=SEQ (the last seq it got) to catch up from the recent events",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn recent_events_are_bounded_and_ordered() {
        let f = Events::default();
        for i in 0..RECENT + 5 {
            f.emit("web1", EventKind::Started, json!({ "i": i }));
        }
        let all = f.recent(None);
        assert_eq!(all.len(), RECENT);
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
        assert_eq!(all[0].details["i"], 5);
        let last = all[RECENT - 2].seq;
        assert_eq!(f.recent(Some(last)).len(), 1);
    }

    #[tokio::test]
    async fn a_follower_gets_its_backlog_then_live_events_without_gap_or_duplicate() {
        let f = Events::default();
        let first = f.emit("a", EventKind::Created, json!({}));
        f.emit("a", EventKind::Started, json!({}));
        let mut sub = f.subscribe(Some(first.seq));
        f.emit("a", EventKind::Stopped, json!({}));
        let kinds: Vec<_> = sub.backlog.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EventKind::Started]);
        assert_eq!(sub.live.recv().await.unwrap().kind, EventKind::Stopped);
    }

    #[tokio::test]
    async fn a_follower_that_falls_behind_is_told_how_far_and_dropped() {
        let f = Events::new(4);
        let mut sub = f.subscribe(None);
        for _ in 0..10 {
            f.emit("a", EventKind::Started, json!({}));
        }
        match sub.live.recv().await {
            Err(broadcast::error::RecvError::Lagged(n)) => assert_eq!(n, 6),
            other => panic!("expected a lag, got {other:?}"),
        }
    }
}
