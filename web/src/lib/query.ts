// Server state: a small query cache keyed by string. Pages read through `useQuery`, which
// shares one request among every reader of a key, keeps the last answer while a newer one
// loads (no flashing back to a spinner), polls when asked to (paused while the tab is
// hidden), and refetches what a write `invalidate`s.
import { useEffect, useReducer, useRef } from "preact/hooks";

interface Entry {
  data?: unknown;
  error?: unknown;
  loading: boolean;
  updatedAt: number;
  inflight?: Promise<void>;
  fetcher?: () => Promise<unknown>;
  listeners: Set<() => void>;
}

const cache = new Map<string, Entry>();

function entry(key: string): Entry {
  let e = cache.get(key);
  if (!e) {
    e = { loading: false, updatedAt: 0, listeners: new Set() };
    cache.set(key, e);
  }
  return e;
}

function notify(e: Entry) {
  for (const l of [...e.listeners]) l();
}

function load(key: string): Promise<void> {
  const e = entry(key);
  if (e.inflight) return e.inflight;
  const fetcher = e.fetcher;
  if (!fetcher) return Promise.resolve();
  e.loading = true;
  notify(e);
  e.inflight = fetcher()
    .then(
      (data) => {
        e.data = data;
        e.error = undefined;
      },
      (error) => {
        e.error = error;
      },
    )
    .finally(() => {
      e.loading = false;
      e.updatedAt = Date.now();
      e.inflight = undefined;
      notify(e);
    });
  return e.inflight;
}

/** Refetches every watched key that starts with `prefix` (and forgets unwatched ones). */
export function invalidate(prefix: string): Promise<void> {
  const loads: Promise<void>[] = [];
  for (const [key, e] of cache) {
    if (!key.startsWith(prefix)) continue;
    if (e.listeners.size > 0) loads.push(load(key));
    else cache.delete(key);
  }
  return Promise.all(loads).then(() => undefined);
}

/** Puts an answer the client already has (a write's response) into the cache. */
export function setQueryData(key: string, data: unknown) {
  const e = entry(key);
  e.data = data;
  e.error = undefined;
  e.updatedAt = Date.now();
  notify(e);
}

/** Forgets everything (on sign-out: another key may see another project). */
export function clearQueries() {
  cache.clear();
}

export interface QueryResult<T> {
  data: T | undefined;
  error: unknown;
  /** A request is in flight (the first one, or a refresh). */
  loading: boolean;
  refresh: () => Promise<void>;
}

export interface QueryOptions {
  /** Poll every this many milliseconds while the page is visible. */
  refreshMs?: number;
  /** Answers younger than this are not refetched on mount. */
  staleMs?: number;
}

/** `key` null: nothing to load yet. */
export function useQuery<T>(
  key: string | null,
  fetcher: () => Promise<T>,
  options: QueryOptions = {},
): QueryResult<T> {
  const [, rerender] = useReducer((n: number) => n + 1, 0);
  const fetcherRef = useRef(fetcher);
  fetcherRef.current = fetcher;

  useEffect(() => {
    if (key === null) return;
    const e = entry(key);
    e.fetcher = () => fetcherRef.current();
    e.listeners.add(rerender as () => void);
    if (!e.inflight && Date.now() - e.updatedAt > (options.staleMs ?? 0)) void load(key);
    let timer: ReturnType<typeof setInterval> | undefined;
    if (options.refreshMs) {
      timer = setInterval(() => {
        if (document.visibilityState === "visible") void load(key);
      }, options.refreshMs);
    }
    return () => {
      e.listeners.delete(rerender as () => void);
      if (timer) clearInterval(timer);
    };
  }, [key, options.refreshMs]);

  if (key === null) return { data: undefined, error: undefined, loading: false, refresh: async () => {} };
  const e = entry(key);
  return {
    data: e.data as T | undefined,
    error: e.error,
    loading: e.loading || (e.updatedAt === 0 && e.data === undefined),
    refresh: () => load(key),
  };
}
