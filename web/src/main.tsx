// The app shell: finds out who the caller is (`GET /v1/me`), shows sign-in when the server
// wants a key, and renders the page the URL's fragment names. Pages load on demand, so the
// first page downloads only what it shows.
import { render, type ComponentType } from "preact";
import { useEffect, useState } from "preact/hooks";
import { api, onAuthFailure, unwrap, ApiError, type Identity } from "./api/client";
import { ErrorState, Loading } from "./components/ui";
import { IdentityContext } from "./identity";
import type { Problem } from "./lib/problem";
import { clearQueries } from "./lib/query";
import { href, match, navigate, useLocation, type Location } from "./lib/router";
import { storeKey } from "./lib/session";
import { SignIn } from "./pages/SignIn";
import "./styles.css";

export interface PageProps {
  params: Record<string, string>;
  location: Location;
}

type Loader = () => Promise<{ default: ComponentType<PageProps> }>;

/** A page whose code is fetched the first time it is shown. */
function lazyPage(load: Loader): ComponentType<PageProps> {
  let page: ComponentType<PageProps> | null = null;
  let loading: Promise<void> | null = null;
  return function LazyPage(props: PageProps) {
    const [failed, setFailed] = useState<unknown>(null);
    const [, setLoaded] = useState(false);
    if (page) {
      const Page = page;
      return <Page {...props} />;
    }
    loading ??= load().then((m) => {
      page = m.default;
    });
    loading.then(
      () => setLoaded(true),
      (e) => {
        loading = null;
        setFailed(e);
      },
    );
    return failed ? <ErrorState error={failed} retry={() => location.reload()} /> : <Loading label="Loading page" />;
  };
}

const ROUTES: Array<[string, ComponentType<PageProps>]> = [
  ["/jobs", lazyPage(() => import("./pages/Jobs"))],
  ["/jobs/new", lazyPage(() => import("./pages/NewJob"))],
  ["/jobs/:id", lazyPage(() => import("./pages/JobDetail"))],
  ["/adapters", lazyPage(() => import("./pages/Adapters"))],
  ["/adapters/:name", lazyPage(() => import("./pages/Adapter"))],
  ["/adapters/:name/compare", lazyPage(() => import("./pages/Compare"))],
  ["/adapters/:name/versions/:version", lazyPage(() => import("./pages/Version"))],
  ["/adapters/:name/versions/:version/lineage", lazyPage(() => import("./pages/Lineage"))],
];

const NAV: Array<[string, string, (path: string) => boolean]> = [
  ["Jobs", "/jobs", (p) => p === "/jobs" || (p.startsWith("/jobs/") && p !== "/jobs/new")],
  ["New job", "/jobs/new", (p) => p === "/jobs/new"],
  ["Adapters", "/adapters", (p) => p.startsWith("/adapters")],
];

type Session =
  | { state: "checking" }
  | { state: "signed-in"; identity: Identity }
  | { state: "signed-out"; problem: Problem | null }
  | { state: "unreachable"; error: unknown };

function App() {
  const location = useLocation();
  const [session, setSession] = useState<Session>({ state: "checking" });

  const check = () => {
    setSession({ state: "checking" });
    unwrap(api.GET("/v1/me"), { authRedirect: false }).then(
      (identity) => setSession({ state: "signed-in", identity }),
      (e) =>
        setSession(
          e instanceof ApiError && (e.status === 401 || e.status === 403)
            ? { state: "signed-out", problem: null }
            : { state: "unreachable", error: e },
        ),
    );
  };

  useEffect(() => {
    check();
    // Any refused request ends the session: back to sign-in with the server's words.
    onAuthFailure((problem) => {
      storeKey(null);
      clearQueries();
      setSession({ state: "signed-out", problem });
    });
  }, []);

  useEffect(() => {
    if (location.path === "/") navigate("/jobs", { replace: true });
  }, [location.path]);

  const signOut = () => {
    storeKey(null);
    clearQueries();
    setSession({ state: "signed-out", problem: null });
  };

  let content;
  if (session.state === "checking") content = <Loading label="Connecting" />;
  else if (session.state === "unreachable") content = <ErrorState error={session.error} retry={check} />;
  else if (session.state === "signed-out")
    content = <SignIn problem={session.problem} onSignedIn={(identity) => setSession({ state: "signed-in", identity })} />;
  else content = <Route location={location} />;

  const identity = session.state === "signed-in" ? session.identity : null;
  return (
    <IdentityContext.Provider value={identity}>
      <a class="skip-link" href="#main" onClick={(e) => {
        e.preventDefault();
        document.getElementById("main")?.focus();
      }}>
        Skip to content
      </a>
      <header class="topbar">
        <div class="topbar-inner">
          <a class="brand" href={href("/jobs")}>
            loraforge
          </a>
          {identity && (
            <nav aria-label="Main">
              <ul>
                {NAV.map(([label, path, active]) => (
                  <li key={path}>
                    <a href={href(path)} aria-current={active(location.path) ? "page" : undefined}>
                      {label}
                    </a>
                  </li>
                ))}
              </ul>
            </nav>
          )}
          {identity && (
            <div class="whoami">
              <span data-testid="whoami">
                project <strong>{identity.project}</strong> · {identity.scope}
                {!identity.auth_enabled && " · dev mode (no auth)"}
              </span>
              {identity.auth_enabled && (
                <button type="button" class="small" onClick={signOut}>
                  Sign out
                </button>
              )}
            </div>
          )}
        </div>
      </header>
      <main id="main" tabIndex={-1}>
        {content}
      </main>
    </IdentityContext.Provider>
  );
}

function Route({ location }: { location: Location }) {
  for (const [pattern, Page] of ROUTES) {
    const params = match(pattern, location.path);
    if (params) return <Page key={`${pattern} ${JSON.stringify(params)}`} params={params} location={location} />;
  }
  if (location.path === "/") return <Loading />;
  return (
    <div class="state">
      <h1>Page not found</h1>
      <p>
        Nothing lives at <code>{location.path}</code>. Go to the <a href={href("/jobs")}>jobs</a>.
      </p>
    </div>
  );
}

render(<App />, document.getElementById("app")!);
