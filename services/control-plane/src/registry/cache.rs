//! The registry's read cache: serving engines call `resolve` (and read `versions/{v}`) on
//! every adapter load, so those answers are kept in memory, already serialized, and a hit
//! costs no database round trip.
//!
//! Correctness comes from the database, not from timeouts: triggers on `adapter_versions`
//! and `adapter_aliases` send `NOTIFY loraforge_registry, '<project>/<adapter>'` when a
//! transaction that changed an adapter's versions or aliases commits (migration 0009), and
//! every replica's [`listen`] loop evicts that adapter. A write through this replica's API
//! also evicts synchronously before its response ([`evict_on_write`]), so a client reads its
//! own writes at once; other replicas follow within the notification's delivery time.
//!
//! Two rules keep a stale answer from outliving an eviction:
//! - an answer read from the database is stored only if no eviction happened since the read
//!   began (the generation counter), since the read may have seen the state before the write;
//! - the cache is off while the listener is not connected, and emptied when it reconnects,
//!   since notifications sent meanwhile are lost.

use crate::app::AppState;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use sqlx::postgres::PgListener;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::Duration;
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

#[derive(Default)]
pub struct ReadCache {
    entries: RwLock<Entries>,
    /// Whether the listener is connected: no caching without invalidation.
    listening: AtomicBool,
    hits: AtomicU64,
    misses: AtomicU64,
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
        counter.fetch_add(1, Ordering::Relaxed);
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

    fn clear(&self) {
        let mut entries = self.entries.write().expect("cache lock");
        entries.generation += 1;
        entries.adapters.clear();
        entries.bytes = 0;
    }

    fn set_listening(&self, on: bool) {
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
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

/// Evicts on every notification until `stop`; the cache is on only while connected.
pub async fn listen(state: AppState, mut stop: watch::Receiver<bool>) {
    let cache = state.read_cache.clone();
    loop {
        let mut listener = match connect(&state).await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(error = %e, "registry cache listener cannot connect; cache off");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        cache.set_listening(true);
        loop {
            let received = tokio::select! {
                r = listener.try_recv() => r,
                _ = stop.changed() => {
                    cache.set_listening(false);
                    return;
                }
            };
            match received {
                // Adapter names have no '/', so the last one separates the two.
                Ok(Some(notification)) => match notification.payload().rsplit_once('/') {
                    Some((project, adapter)) => cache.evict(Some(project), adapter),
                    None => cache.clear(),
                },
                // The connection dropped: what was sent meanwhile is lost.
                Ok(None) | Err(_) => {
                    cache.set_listening(false);
                    break;
                }
            }
        }
    }
}

async fn connect(state: &AppState) -> sqlx::Result<PgListener> {
    let mut listener = PgListener::connect_with(&state.pool).await?;
    listener.ignore_pool_close_event(true);
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

/// Middleware: after a write under `/v1/adapters/{name}`, evicts that adapter before the
/// response leaves, so the writer's next read sees the write on this replica too.
pub async fn evict_on_write(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let adapter = match *req.method() {
        Method::GET | Method::HEAD | Method::OPTIONS => None,
        _ => req
            .uri()
            .path()
            .strip_prefix("/v1/adapters/")
            .and_then(|rest| rest.split('/').next())
            .map(|name| {
                percent_encoding::percent_decode_str(name)
                    .decode_utf8_lossy()
                    .into_owned()
            }),
    };
    let response = next.run(req).await;
    if let Some(adapter) = adapter {
        state.read_cache.evict(None, &adapter);
    }
    response
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
