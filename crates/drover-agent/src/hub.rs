//! Routing of host events ([`GuestEvent`], from port B) to app connections.
//!
//! An event goes to every connection listening for its `app_id`, and to the connection that made
//! the request with its `ticket` if that one is still waiting. Nothing here blocks: each
//! subscriber has a bounded queue, and an event for a full queue is dropped for that subscriber
//! (logged) rather than stalling port B for every other app.
//!
//! The host acks a request on port A and reports its outcome on port B; the agent reads the two
//! ports on different threads, so the event may be read *before* the ack that carries its ticket
//! has reached the waiting app. While any waiting request has not yet learned its ticket
//! ([`Expectation`]), events nobody claimed are parked (a few, briefly) so the late waiter still
//! gets its event.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use drover_proto::GuestEvent;

/// Events queued per subscriber before further ones are dropped for it.
pub const SUBSCRIBER_QUEUE: usize = 64;
/// Unclaimed events parked while waiting requests learn their tickets.
const MAX_PARKED: usize = 32;
/// Recently delivered events remembered to drop redeliveries (the host resends an event whose
/// ack it did not get, e.g. across a reconnect).
const RECENT: usize = 32;

/// What a subscription is keyed on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    /// Every event for this app id.
    App(String),
    /// The one outcome of the request with this ticket.
    Ticket(String),
}

/// Where one event went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Delivery {
    /// Listeners of the event's app id that took it.
    pub listeners: usize,
    /// Whether the waiting requester (by ticket) took it.
    pub waiter: bool,
    /// Parked for a requester that has not learned its ticket yet.
    pub parked: bool,
    /// A repeat of an event already delivered; not delivered again.
    pub duplicate: bool,
}

#[derive(Default)]
struct Inner {
    subs: HashMap<Key, Vec<(u64, SyncSender<GuestEvent>)>>,
    next_sub: u64,
    /// Waiting requests whose ack (and so ticket) has not been seen yet.
    expecting: usize,
    /// Events no waiter took while `expecting > 0`, with how many listeners did take them.
    parked: VecDeque<(GuestEvent, usize)>,
    recent: VecDeque<GuestEvent>,
}

/// The event router, shared by port B (which delivers) and the app socket (which subscribes).
#[derive(Default)]
pub struct EventHub {
    inner: Mutex<Inner>,
}

impl EventHub {
    /// An empty hub.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Receive every event for `app_id` until the returned [`Subscription`] is dropped.
    pub fn listen(self: &Arc<Self>, app_id: &str) -> Subscription {
        self.subscribe(Key::App(app_id.to_string()))
    }

    /// Announce a waiting request before it is sent, so an event that overtakes its ack is kept.
    /// Turn it into a subscription with [`Expectation::claim`] once the ack gives the ticket.
    pub fn expect(self: &Arc<Self>) -> Expectation {
        crate::lock(&self.inner).expecting += 1;
        Expectation {
            hub: Arc::clone(self),
            done: false,
        }
    }

    /// Hand `event` to its subscribers. Never blocks.
    pub fn deliver(&self, event: GuestEvent) -> Delivery {
        let mut inner = crate::lock(&self.inner);
        let mut d = Delivery::default();
        if inner.recent.contains(&event) {
            crate::log!(
                "event {} ({}) already delivered; dropping the repeat",
                event.ticket,
                event.op
            );
            d.duplicate = true;
            return d;
        }
        if inner.recent.len() == RECENT {
            inner.recent.pop_front();
        }
        inner.recent.push_back(event.clone());

        if let Some(app) = &event.app_id {
            d.listeners = inner.send(&Key::App(app.clone()), &event);
        }
        d.waiter = inner.send(&Key::Ticket(event.ticket.clone()), &event) > 0;
        if !d.waiter && inner.expecting > 0 {
            if inner.parked.len() == MAX_PARKED {
                if let Some((old, listeners)) = inner.parked.pop_front() {
                    log_unclaimed(&old, listeners);
                }
            }
            inner.parked.push_back((event, d.listeners));
            d.parked = true;
        } else if !d.waiter && d.listeners == 0 {
            log_unclaimed(&event, 0);
        }
        d
    }

    /// Hand a notice of the agent's own (`restored`) to every app listening, whatever its app
    /// id. Never blocks; returns how many took it.
    pub fn broadcast(&self, event: GuestEvent) -> usize {
        let mut inner = crate::lock(&self.inner);
        let keys: Vec<Key> = inner
            .subs
            .keys()
            .filter(|k| matches!(k, Key::App(_)))
            .cloned()
            .collect();
        let n = keys.iter().map(|k| inner.send(k, &event)).sum();
        if n == 0 {
            log_unclaimed(&event, 0);
        }
        n
    }

    fn subscribe(self: &Arc<Self>, key: Key) -> Subscription {
        let (tx, rx) = mpsc::sync_channel(SUBSCRIBER_QUEUE);
        let mut inner = crate::lock(&self.inner);
        inner.next_sub += 1;
        let id = inner.next_sub;
        inner.subs.entry(key.clone()).or_default().push((id, tx));
        Subscription {
            hub: Arc::clone(self),
            key,
            id,
            rx,
        }
    }

    fn unsubscribe(&self, key: &Key, id: u64) {
        let mut inner = crate::lock(&self.inner);
        if let Some(list) = inner.subs.get_mut(key) {
            list.retain(|(i, _)| *i != id);
            if list.is_empty() {
                inner.subs.remove(key);
            }
        }
    }

    /// How many subscriptions are live (for tests and diagnostics).
    pub fn subscriptions(&self) -> usize {
        crate::lock(&self.inner).subs.values().map(Vec::len).sum()
    }
}

impl Inner {
    /// Offer `event` to every subscriber of `key`; returns how many took it.
    fn send(&mut self, key: &Key, event: &GuestEvent) -> usize {
        let Some(list) = self.subs.get(key) else {
            return 0;
        };
        let mut taken = 0;
        for (id, tx) in list {
            match tx.try_send(event.clone()) {
                Ok(()) => taken += 1,
                Err(TrySendError::Full(_)) => crate::log!(
                    "app connection {id} is not reading; event {} dropped for it",
                    event.ticket
                ),
                // The connection is closing; its Subscription is about to unregister.
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
        taken
    }

    /// One waiting request fewer; with none left, parked events can no longer be claimed.
    fn expectation_done(&mut self) {
        self.expecting = self.expecting.saturating_sub(1);
        if self.expecting == 0 {
            for (event, listeners) in std::mem::take(&mut self.parked) {
                log_unclaimed(&event, listeners);
            }
        }
    }
}

/// One log line for an event that reached no waiter (and maybe no listener either).
fn log_unclaimed(event: &GuestEvent, listeners: usize) {
    if listeners == 0 {
        crate::log!(
            "event {} ({}, app {}) dropped: nobody is listening",
            event.ticket,
            event.op,
            event.app_id.as_deref().unwrap_or("-")
        );
    }
}

/// A live subscription; dropping it unsubscribes.
pub struct Subscription {
    hub: Arc<EventHub>,
    key: Key,
    id: u64,
    rx: Receiver<GuestEvent>,
}

impl Subscription {
    /// Where the events arrive.
    pub fn events(&self) -> &Receiver<GuestEvent> {
        &self.rx
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unsubscribe(&self.key, self.id);
    }
}

/// A waiting request that has not learned its ticket yet (see [`EventHub::expect`]).
pub struct Expectation {
    hub: Arc<EventHub>,
    done: bool,
}

impl Expectation {
    /// Subscribe to the outcome of the request with `ticket`, including an event that arrived
    /// before the ack did.
    pub fn claim(mut self, ticket: &str) -> Subscription {
        let sub = self.hub.subscribe(Key::Ticket(ticket.to_string()));
        let mut inner = crate::lock(&self.hub.inner);
        // Queues start empty and hold SUBSCRIBER_QUEUE events, so these sends cannot fail.
        let mut i = 0;
        while i < inner.parked.len() {
            if inner.parked[i].0.ticket == ticket {
                if let Some((event, _)) = inner.parked.remove(i) {
                    inner.send(&Key::Ticket(ticket.to_string()), &event);
                }
            } else {
                i += 1;
            }
        }
        inner.expectation_done();
        self.done = true;
        sub
    }
}

impl Drop for Expectation {
    fn drop(&mut self) {
        if !self.done {
            crate::lock(&self.hub.inner).expectation_done();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::event;

    #[test]
    fn a_broadcast_reaches_every_listening_app_and_no_waiter() {
        let hub = EventHub::new();
        let a = hub.listen("a");
        let b = hub.listen("b");
        let waiter = hub.expect().claim("t1");
        let ev = GuestEvent::restored(
            "restored-x".into(),
            serde_json::json!({"changed": ["hostname"]}),
        );
        assert_eq!(hub.broadcast(ev.clone()), 2);
        assert_eq!(a.events().try_recv().unwrap(), ev);
        assert_eq!(b.events().try_recv().unwrap(), ev);
        assert!(waiter.events().try_recv().is_err());
    }

    #[test]
    fn listeners_and_waiter_each_get_the_event() {
        let hub = EventHub::new();
        let l1 = hub.listen("app");
        let l2 = hub.listen("app");
        let other = hub.listen("other");
        let waiter = hub.expect().claim("t1");
        let d = hub.deliver(event("t1", Some("app")));
        assert_eq!(
            d,
            Delivery {
                listeners: 2,
                waiter: true,
                ..Default::default()
            }
        );
        for s in [&l1, &l2, &waiter] {
            assert_eq!(s.events().try_recv().unwrap().ticket, "t1");
        }
        assert!(other.events().try_recv().is_err());
    }

    #[test]
    fn unheard_events_are_dropped_and_dropped_subscriptions_unregister() {
        let hub = EventHub::new();
        let l = hub.listen("app");
        drop(l);
        assert_eq!(hub.subscriptions(), 0);
        assert_eq!(hub.deliver(event("t2", Some("app"))), Delivery::default());
        assert_eq!(hub.deliver(event("t3", None)), Delivery::default());
    }

    #[test]
    fn event_before_ack_reaches_the_late_waiter() {
        let hub = EventHub::new();
        let exp = hub.expect();
        let other = hub.expect();
        assert!(hub.deliver(event("t4", None)).parked);
        let sub = exp.claim("t4");
        assert_eq!(sub.events().try_recv().unwrap().ticket, "t4");
        // The other expectation gives up: nothing stays parked.
        hub.deliver(event("t5", None));
        drop(other);
        assert!(crate::lock(&hub.inner).parked.is_empty());
        assert_eq!(crate::lock(&hub.inner).expecting, 0);
    }

    #[test]
    fn repeats_are_not_delivered_twice_and_full_queues_drop() {
        let hub = EventHub::new();
        let l = hub.listen("app");
        assert_eq!(hub.deliver(event("t6", Some("app"))).listeners, 1);
        assert!(hub.deliver(event("t6", Some("app"))).duplicate);
        for i in 0..SUBSCRIBER_QUEUE + 5 {
            hub.deliver(event(&format!("x{i}"), Some("app")));
        }
        assert_eq!(l.events().try_iter().count(), SUBSCRIBER_QUEUE);
    }
}
