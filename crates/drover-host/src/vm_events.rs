//! The VM event bus: the lifecycle and the supervisor tell what happened to a VM, and the
//! features that keep state about VMs (saved states, the guest broker, migration, the event
//! feed, ...) react, each in its own module, instead of the lifecycle calling into each of them.
//!
//! Rules it keeps:
//! - Subscribers run one after the other, in the order they are listed, and [`Bus::publish`]
//!   returns only once every one has finished. So a hook that must be done before the next step
//!   (dropping the QEMU kept ready for a VM's next save before its stop is recorded and a new
//!   start may begin) is done when the publisher goes on. That is why this is a synchronous
//!   subscriber list and not a `tokio::sync::broadcast` channel: a channel would let the
//!   lifecycle run ahead of its subscribers, and drop events for one that lags.
//! - A subscriber that fails (or panics) is logged with its name and the event, and the others
//!   still run: one feature's trouble never keeps another from cleaning up after a VM.
//! - An event is published once the change it tells of is durable, so a subscriber never acts on
//!   a change the store could still forget (the exceptions say so: [`VmEvent::QemuGone`]).
//! - A subscriber that has long work to do (talking to a peer host) starts it in the background
//!   and returns: it must not hold up the others.

use drover_api::{ExitInfo, VmInfo};
use futures_util::future::BoxFuture;
use futures_util::FutureExt as _;
use std::panic::AssertUnwindSafe;

/// What happened to a VM, as the lifecycle tells the features.
#[derive(Debug, Clone)]
pub enum VmEvent {
    /// The VM was defined; its records are durable.
    Created {
        /// Its record.
        info: VmInfo,
    },
    /// QEMU runs it after a start or a restart; its record says so.
    Started {
        /// Its record.
        info: VmInfo,
    },
    /// Its QEMU has exited (or, after a shutdown, begun to: the kernel may still be freeing its
    /// memory and closing its files), but the stop is not recorded yet: drop
    /// whatever belonged to that QEMU, so none of it is left when the VM starts again.
    QemuGone {
        /// The VM.
        vm: String,
    },
    /// Its QEMU exited and the stop was recorded (`recorded`: durable; `false` when the store
    /// refused it and it is deferred, see the manager's `commit_or_defer`).
    Exited {
        /// The VM.
        vm: String,
        /// Why it ended.
        exit: ExitInfo,
        /// Whether the stop is in the store.
        recorded: bool,
    },
    /// droverd opened and reconciled the VM's record with its QEMU.
    Readopted {
        /// The VM.
        vm: String,
        /// What it found.
        outcome: Adoption,
    },
    /// The VM's records are gone (its files follow).
    Deleted {
        /// The VM.
        vm: String,
    },
}

/// What re-adoption found of a VM recorded as running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adoption {
    /// Its QEMU runs and is managed again.
    Running,
    /// A start the previous droverd left half done: its QEMU was stopped.
    StartCutOff,
    /// Its QEMU exited while droverd was not running.
    ExitedWhileDown,
}

impl VmEvent {
    /// The VM it is about.
    pub fn vm(&self) -> &str {
        match self {
            VmEvent::Created { info } | VmEvent::Started { info } => &info.name,
            VmEvent::QemuGone { vm }
            | VmEvent::Exited { vm, .. }
            | VmEvent::Readopted { vm, .. }
            | VmEvent::Deleted { vm } => vm,
        }
    }

    /// Its name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            VmEvent::Created { .. } => "created",
            VmEvent::Started { .. } => "started",
            VmEvent::QemuGone { .. } => "qemu-gone",
            VmEvent::Exited { .. } => "exited",
            VmEvent::Readopted { .. } => "readopted",
            VmEvent::Deleted { .. } => "deleted",
        }
    }
}

/// What a subscriber does about one event: done, or why it failed.
pub type Reaction<'a> = BoxFuture<'a, Result<(), String>>;

/// A subscriber's reaction to one event, given the context it runs in (the manager).
pub type Handler<C> = for<'a> fn(&'a C, &'a VmEvent) -> Reaction<'a>;

/// One feature's subscription.
pub struct Subscriber<C: 'static> {
    /// Who it is, for logs.
    pub name: &'static str,
    /// What it does with an event (most ignore most events).
    pub handle: Handler<C>,
}

impl<C: 'static> Subscriber<C> {
    /// Subscriber `name`, reacting with `handle`.
    pub const fn new(name: &'static str, handle: Handler<C>) -> Self {
        Subscriber { name, handle }
    }
}

/// The bus: a fixed list of subscribers, called in order.
pub struct Bus<C: 'static> {
    subscribers: &'static [Subscriber<C>],
}

impl<C: 'static> Bus<C> {
    /// A bus that calls `subscribers` in this order.
    pub const fn new(subscribers: &'static [Subscriber<C>]) -> Self {
        Bus { subscribers }
    }

    /// Hand `event` to every subscriber in order, each finished before the next starts.
    /// Returns the names of those that failed (each already logged).
    pub async fn publish(&self, ctx: &C, event: &VmEvent) -> Vec<&'static str> {
        let mut failed = Vec::new();
        for s in self.subscribers {
            let outcome = AssertUnwindSafe((s.handle)(ctx, event))
                .catch_unwind()
                .await;
            let why = match outcome {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(_) => "it panicked".to_string(),
            };
            tracing::warn!(
                vm = event.vm(),
                event = event.name(),
                subscriber = s.name,
                "reacting to the VM's event failed: {why}"
            );
            failed.push(s.name);
        }
        failed
    }
}

/// A subscriber's answer when it has nothing to wait for.
pub fn done<'a>() -> Reaction<'a> {
    futures_util::future::ready(Ok(())).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    type Seen = Mutex<Vec<String>>;

    fn note(seen: &Seen, who: &str, ev: &VmEvent) {
        seen.lock()
            .unwrap()
            .push(format!("{who}:{}:{}", ev.name(), ev.vm()));
    }

    fn first<'a>(seen: &'a Seen, ev: &'a VmEvent) -> Reaction<'a> {
        async move {
            // Yields before noting: the next subscriber must still wait for it.
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            note(seen, "first", ev);
            Ok(())
        }
        .boxed()
    }

    fn failing<'a>(seen: &'a Seen, ev: &'a VmEvent) -> Reaction<'a> {
        note(seen, "failing", ev);
        futures_util::future::ready(Err("the disk is full".to_string())).boxed()
    }

    fn panicking<'a>(seen: &'a Seen, ev: &'a VmEvent) -> Reaction<'a> {
        note(seen, "panicking", ev);
        async move { panic!("a bug in a subscriber") }.boxed()
    }

    fn last<'a>(seen: &'a Seen, ev: &'a VmEvent) -> Reaction<'a> {
        note(seen, "last", ev);
        done()
    }

    static SUBSCRIBERS: [Subscriber<Seen>; 4] = [
        Subscriber::new("first", first),
        Subscriber::new("failing", failing),
        Subscriber::new("panicking", panicking),
        Subscriber::new("last", last),
    ];

    /// What the subscriber's log lines say.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn every_subscriber_runs_in_order_and_a_failing_one_is_logged_not_fatal() {
        let log = Capture::default();
        let writer = log.clone();
        let _guard = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish(),
        );
        let bus = Bus::new(&SUBSCRIBERS);
        let seen = Seen::default();
        let stopped = VmEvent::Exited {
            vm: "web1".into(),
            exit: ExitInfo {
                reason: "guest-poweroff".into(),
                detail: None,
                at_ms: 0,
            },
            recorded: true,
        };
        let failed = bus.publish(&seen, &stopped).await;
        let deleted = VmEvent::Deleted { vm: "web1".into() };
        bus.publish(&seen, &deleted).await;
        assert_eq!(failed, ["failing", "panicking"]);
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "first:exited:web1",
                "failing:exited:web1",
                "panicking:exited:web1",
                "last:exited:web1",
                "first:deleted:web1",
                "failing:deleted:web1",
                "panicking:deleted:web1",
                "last:deleted:web1",
            ]
        );
        let log = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
        assert_eq!(lines.len(), 4, "{log}");
        assert!(
            lines[0].contains("subscriber=\"failing\"")
                && lines[0].contains("the disk is full")
                && lines[0].contains("event=\"exited\"")
                && lines[0].contains("vm=\"web1\""),
            "{log}"
        );
        assert!(lines[1].contains("subscriber=\"panicking\"") && lines[1].contains("it panicked"));
    }
}
