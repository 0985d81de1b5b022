// The API key lives in session storage: it survives reloads of the tab, not the tab itself.
const KEY = "loraforge.api-key";

export function storedKey(): string | null {
  try {
    return sessionStorage.getItem(KEY);
  } catch {
    return null;
  }
}

export function storeKey(key: string | null) {
  try {
    if (key) sessionStorage.setItem(KEY, key);
    else sessionStorage.removeItem(KEY);
  } catch {
    // Storage disabled: the key lasts until the page is left.
  }
}
