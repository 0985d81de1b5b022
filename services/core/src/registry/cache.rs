//! The registry's read cache: serving engines call `resolve` (and read `versions/{v}`) on
//! every adapter load, so those answers are kept in memory, already serialized, and a hit
//! costs no database round trip.
//!
//! Correctness comes from the database, not from timeouts: triggers on `adapter_versions`
//! and `adapter_aliases` send `NOTIFY loraforge_registry, '<project>/<adapter>'` when a
//! transaction that changed an adapter's versions or aliases commits (migration 0009), and
//! every replica's [`listen`] loop evicts that adapter. A write through this replica (the
//! registry operations that change versions, aliases or tags) also evicts synchronously
//! before it returns, so a client reads its own writes at once; other replicas follow
//! within the notification's delivery time.
//!
//! Two rules keep a stale answer from outliving an eviction:
//! - an answer read from the database is stored only if no eviction happened since the read
//!   began (the generation counter), since the read may have seen the state before the write;
//! - the cache is off while the listener is not connected, and emptied when it reconnects,
//!   since notifications sent meanwhile are lost.

use crate::notify::{Signal, Subscription};
use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;
use tokio::sync::watch;

/// The Postgres notification channel the triggers send on.
pub const CHANNEL: &str = "loraforge_registry";

/// Bytes of answers kept at most; beyond it the cache starts over (a bound on memory, not an
/// LRU: a serving fleet's working set is far smaller). 128 MiB holds about 150,000 answers.
const MAX_BYTES: usize = 128 << 20;

/// What is cached for one adapter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Entry {
    /// `resolve?ref=<ref>`.
    Resolve(String),
    /// `versions/{v}`.
    Version(i32),
}

#[derive(Default)]
struct Entries {
    generation: u64,
    /// (project, adapter) -> its cached answers.
    adapters: HashMap<(String, String), HashMap<Entry, Bytes>>,
    bytes: usize,
}

pub struct ReadCache {
    entries: RwLock<Entries>,
    /// Whether the listener is connected: no caching without invalidation.
    listening: AtomicBool,
    /// Reads by whether the cache answered (`result="hit"|"miss"`); `/metrics` shows it.
    pub requests: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// The family's two series, held so a read on the hot path costs one atomic add.
    hits: Counter,
    misses: Counter,
}

impl Default for ReadCache {
    fn default() -> Self {
        let requests: Family<Vec<(&'static str, &'static str)>, Counter> = Family::default();
        let series = |result| requests.get_or_create(&vec![("result", result)]).clone();
        let (hits, misses) = (series("hit"), series("miss"));
        ReadCache {
            entries: RwLock::default(),
            listening: AtomicBool::default(),
            requests,
            hits,
            misses,
        }
    }
}

/// Taken before reading from the database; [`ReadCache::insert`] checks it.
#[derive(Clone, Copy)]
pub struct Ticket(Option<u64>);

impl ReadCache {
    pub fn get(&self, project: &str, adapter: &str, entry: &Entry) -> Option<Bytes> {
        if !self.listening.load(Ordering::Acquire) {
            return None;
        }
        let entries = self.entries.read().expect("cache lock");
        let found = entries
            .adapters
            .get(&(project.to_string(), adapter.to_string()))
            .and_then(|answers| answers.get(entry))
            .cloned();
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.inc();
        found
    }

    /// The state of the cache before a database read.
    pub fn ticket(&self) -> Ticket {
        match self.listening.load(Ordering::Acquire) {
            true => Ticket(Some(self.entries.read().expect("cache lock").generation)),
            false => Ticket(None),
        }
    }

    /// Stores an answer read under `ticket`, unless something was evicted since.
    pub fn insert(&self, ticket: Ticket, project: &str, adapter: &str, entry: Entry, body: Bytes) {
        let Ticket(Some(generation)) = ticket else {
            return;
        };
        let mut entries = self.entries.write().expect("cache lock");
        if entries.generation != generation || !self.listening.load(Ordering::Acquire) {
            return;
        }
        if entries.bytes + body.len() > MAX_BYTES {
            entries.adapters.clear();
            entries.bytes = 0;
        }
        let added = body.len();
        let answers = entries
            .adapters
            .entry((project.to_string(), adapter.to_string()))
            .or_default();
        let replaced = answers.insert(entry, body).map_or(0, |old| old.len());
        entries.bytes = entries.bytes + added - replaced;
    }

    /// Forgets an adapter's answers in every project (`None`: in `project` only).
    pub fn evict(&self, project: Option<&str>, adapter: &str) {
        let mut entries = self.entries.write().expect("cache lock");
        entries.generation += 1;
        let mut removed = 0;
        entries.adapters.retain(|(p, a), answers| {
            let hit = a == adapter && project.is_none_or(|project| p == project);
            if hit {
                removed += answers.values().map(Bytes::len).sum::<usize>();
            }
            !hit
        });
        entries.bytes -= removed;
    }

    pub(crate) fn clear(&self) {
        let mut entries = self.entries.write().expect("cache lock");
        entries.generation += 1;
        entries.adapters.clear();
        entries.bytes = 0;
    }

    pub(crate) fn set_listening(&self, on: bool) {
        if !on {
            self.listening.store(false, Ordering::Release);
        }
        self.clear();
        if on {
            self.listening.store(true, Ordering::Release);
        }
    }

    /// (hits, misses) since start, for `/metrics`.
    pub fn counts(&self) -> (u64, u64) {
        (self.hits.get(), self.misses.get())
    }
}

/// Evicts on every notification until `stop`; the cache is on only while listening.
pub async fn listen(
    pool: PgPool,
    cache: std::sync::Arc<ReadCache>,
    mut stop: watch::Receiver<bool>,
) {
    let mut subscription = Subscription::new(pool, CHANNEL);
    loop {
        let signal = tokio::select! {
            signal = subscription.next() => signal,
            _ = stop.changed() => break,
        };
        match signal {
            // What was sent while we were not listening is lost: start over.
            Signal::Connected => cache.set_listening(true),
            Signal::Disconnected => cache.set_listening(false),
            // Adapter names have no '/', so the last one separates the two.
            Signal::Message(payload) => match payload.rsplit_once('/') {
                Some((project, adapter)) => cache.evict(Some(project), adapter),
                None => cache.clear(),
            },
        }
    }
    cache.set_listening(false);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on() -> ReadCache {
        let cache = ReadCache::default();
        cache.set_listening(true);
        cache
    }

    #[test]
    fn an_answer_read_before_an_eviction_is_not_stored() {
        let cache = on();
        let entry = Entry::Resolve("latest".into());
        let ticket = cache.ticket();
        cache.evict(Some("p"), "a");
        cache.insert(ticket, "p", "a", entry.clone(), Bytes::from_static(b"old"));
        assert_eq!(cache.get("p", "a", &entry), None);
        cache.insert(
            cache.ticket(),
            "p",
            "a",
            entry.clone(),
            Bytes::from_static(b"new"),
        );
        assert_eq!(
            cache.get("p", "a", &entry),
            Some(Bytes::from_static(b"new"))
        );
        assert_eq!(cache.counts(), (1, 1));
    }

    #[test]
    fn eviction_is_per_adapter_and_project() {
        let cache = on();
        let entry = Entry::Version(1);
        for (p, a) in [("p", "a"), ("q", "a"), ("p", "b")] {
            cache.insert(
                cache.ticket(),
                p,
                a,
                entry.clone(),
                Bytes::from_static(b"x"),
            );
        }
        cache.evict(Some("p"), "a");
        assert!(cache.get("p", "a", &entry).is_none());
        assert!(cache.get("q", "a", &entry).is_some());
        assert!(cache.get("p", "b", &entry).is_some());
        cache.evict(None, "a");
        assert!(cache.get("q", "a", &entry).is_none());
        assert!(cache.get("p", "b", &entry).is_some());
        assert_eq!(cache.entries.read().unwrap().bytes, 1);
    }

    #[test]
    fn nothing_is_cached_while_not_listening() {
        let cache = on();
        let entry = Entry::Version(1);
        let ticket = cache.ticket();
        cache.set_listening(false);
        cache.insert(ticket, "p", "a", entry.clone(), Bytes::from_static(b"x"));
        cache.insert(
            cache.ticket(),
            "p",
            "a",
            entry.clone(),
            Bytes::from_static(b"x"),
        );
        cache.set_listening(true);
        assert!(cache.get("p", "a", &entry).is_none());
    }
}
