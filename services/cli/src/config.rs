//! Where the client connects and with which key: flags, then the environment
//! (`LORAFORGE_URL`, `LORAFORGE_API_KEY`), then a profile of the config file
//! (`~/.config/loraforge/config.toml`), then `http://127.0.0.1:8080` without a key.
//!
//! ```toml
//! default_profile = "dev"          # optional; otherwise [profiles.default], if any
//!
//! [profiles.dev]
//! url = "http://127.0.0.1:8080"
//!
//! [profiles.prod]
//! url = "https://loraforge.example.com"
//! api_key = "lf_…"
//! ```
//!
//! A profile named with `--profile` is a flag, so its values win over the environment. A
//! profile's key is only ever sent to that profile's URL: when the URL comes from somewhere
//! else, the profile's key is not used.

use crate::error::{CliError, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const DEFAULT_URL: &str = "http://127.0.0.1:8080";
pub const URL_ENV: &str = "LORAFORGE_URL";
pub const KEY_ENV: &str = "LORAFORGE_API_KEY";
pub const PROFILE_ENV: &str = "LORAFORGE_PROFILE";
pub const CONFIG_ENV: &str = "LORAFORGE_CONFIG";

/// The connection flags every client command takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConnectionArgs {
    /// The control plane's URL [env: LORAFORGE_URL; default: http://127.0.0.1:8080].
    #[arg(long, global = true, value_name = "URL")]
    pub url: Option<String>,
    /// The API key [env: LORAFORGE_API_KEY]. Prefer the variable or a profile: a flag's
    /// value shows in the shell's history and the process list.
    #[arg(long, global = true, value_name = "KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// A profile of the config file [env: LORAFORGE_PROFILE].
    #[arg(long, global = true, value_name = "NAME")]
    pub profile: Option<String>,
    /// The config file [env: LORAFORGE_CONFIG; default: ~/.config/loraforge/config.toml].
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub default_profile: Option<String>,
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub url: Option<String>,
    pub api_key: Option<String>,
}

impl ConfigFile {
    pub fn parse(text: &str, path: &Path) -> Result<ConfigFile> {
        toml::from_str(text).map_err(|e| {
            CliError::usage(format!("{}: {}", path.display(), e.to_string().trim_end()))
        })
    }
}

/// Where a setting came from, for `loraforge whoami`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env(&'static str),
    Profile(String),
    Default,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Flag => write!(f, "a flag"),
            Source::Env(var) => write!(f, "{var}"),
            Source::Profile(name) => write!(f, "profile {name}"),
            Source::Default => write!(f, "the default"),
        }
    }
}

/// What the client connects with.
#[derive(Clone, PartialEq, Eq)]
pub struct Config {
    pub url: String,
    pub url_source: Source,
    pub api_key: Option<String>,
    pub key_source: Option<Source>,
}

/// Never shows the key.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("url", &self.url)
            .field("url_source", &self.url_source)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("key_source", &self.key_source)
            .finish()
    }
}

impl Config {
    /// From the flags, the process environment and the config file.
    pub fn load(args: &ConnectionArgs) -> Result<Config> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let path = args
            .config
            .clone()
            .or_else(|| env(CONFIG_ENV).map(PathBuf::from))
            .or_else(default_config_path);
        let file = match &path {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => {
                    warn_if_readable_by_others(path, &text);
                    Some(ConfigFile::parse(&text, path)?)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && args.config.is_none() => None,
                Err(e) => return Err(CliError::io(path.display(), e)),
            },
            None => None,
        };
        Config::resolve(args, env, file.as_ref())
    }

    /// The precedence rules, apart from where the environment and the file come from.
    pub fn resolve(
        args: &ConnectionArgs,
        env: impl Fn(&str) -> Option<String>,
        file: Option<&ConfigFile>,
    ) -> Result<Config> {
        let empty = ConfigFile::default();
        let file = file.unwrap_or(&empty);
        // A profile named by flag or environment must exist; the implicit one may not.
        let (profile_name, named_by_flag, must_exist) = match (&args.profile, env(PROFILE_ENV)) {
            (Some(p), _) => (p.clone(), true, true),
            (None, Some(p)) => (p, false, true),
            (None, None) => match &file.default_profile {
                Some(p) => (p.clone(), false, true),
                None => ("default".to_string(), false, false),
            },
        };
        let profile = match file.profiles.get(&profile_name) {
            Some(p) => p.clone(),
            None if must_exist => {
                let known: Vec<&str> = file.profiles.keys().map(String::as_str).collect();
                return Err(CliError::usage(format!(
                    "no profile {profile_name:?} in the config file (profiles: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                )));
            }
            None => Profile::default(),
        };
        let from_profile = || Source::Profile(profile_name.clone());

        let (url, url_source) = if let Some(url) = &args.url {
            (url.clone(), Source::Flag)
        } else if let (true, Some(url)) = (named_by_flag, &profile.url) {
            (url.clone(), from_profile())
        } else if let Some(url) = env(URL_ENV) {
            (url, Source::Env(URL_ENV))
        } else if let Some(url) = &profile.url {
            (url.clone(), from_profile())
        } else {
            (DEFAULT_URL.to_string(), Source::Default)
        };
        // The profile's key goes to the profile's URL only (or wherever, if it names none).
        let profile_key = profile
            .api_key
            .clone()
            .filter(|_| profile.url.as_deref().is_none_or(|u| same_url(u, &url)));
        let (api_key, key_source) = if let Some(key) = &args.api_key {
            (Some(key.clone()), Some(Source::Flag))
        } else if let (true, Some(key)) = (named_by_flag, &profile_key) {
            (Some(key.clone()), Some(from_profile()))
        } else if let Some(key) = env(KEY_ENV) {
            (Some(key), Some(Source::Env(KEY_ENV)))
        } else if let Some(key) = profile_key {
            (Some(key), Some(from_profile()))
        } else {
            (None, None)
        };
        let url = url.trim_end_matches('/').to_string();
        url::Url::parse(&url)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| {
                CliError::usage(format!(
                    "{url:?} (from {url_source}) is not an http(s) URL, such as {DEFAULT_URL}"
                ))
            })?;
        Ok(Config {
            url,
            url_source,
            api_key,
            key_source,
        })
    }
}

fn same_url(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// `$XDG_CONFIG_HOME/loraforge/config.toml`, else `~/.config/loraforge/config.toml`.
pub fn default_config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("loraforge").join("config.toml"))
}

/// A file with keys in it should be private to its owner.
fn warn_if_readable_by_others(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    if !text.contains("api_key") {
        return;
    }
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            eprintln!(
                "warning: {} holds API keys and is readable by others: chmod 600 it",
                path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> ConfigFile {
        ConfigFile::parse(text, Path::new("config.toml")).unwrap()
    }

    const FILE: &str = r#"
        [profiles.default]
        url = "http://dev:8080"
        api_key = "lf_dev"

        [profiles.prod]
        url = "https://prod.example.com/"
        api_key = "lf_prod"
    "#;

    fn resolve(args: ConnectionArgs, env: &[(&str, &str)], file: Option<&ConfigFile>) -> Config {
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::resolve(&args, |k| env.get(k).cloned(), file).unwrap()
    }

    fn flags(url: Option<&str>, key: Option<&str>, profile: Option<&str>) -> ConnectionArgs {
        ConnectionArgs {
            url: url.map(Into::into),
            api_key: key.map(Into::into),
            profile: profile.map(Into::into),
            config: None,
        }
    }

    #[test]
    fn nothing_configured_is_the_local_default_without_a_key() {
        let c = resolve(ConnectionArgs::default(), &[], None);
        assert_eq!(c.url, DEFAULT_URL);
        assert_eq!(c.url_source, Source::Default);
        assert_eq!(c.api_key, None);
    }

    #[test]
    fn the_default_profile_is_used_when_nothing_else_says() {
        let f = file(FILE);
        let c = resolve(ConnectionArgs::default(), &[], Some(&f));
        assert_eq!(c.url, "http://dev:8080");
        assert_eq!(c.api_key.as_deref(), Some("lf_dev"));
        assert_eq!(c.key_source, Some(Source::Profile("default".into())));
    }

    #[test]
    fn environment_beats_the_implicit_profile() {
        let f = file(FILE);
        let env = [(URL_ENV, "http://env:1"), (KEY_ENV, "lf_env")];
        let c = resolve(ConnectionArgs::default(), &env, Some(&f));
        assert_eq!(c.url, "http://env:1");
        assert_eq!(c.api_key.as_deref(), Some("lf_env"));
        assert_eq!(c.url_source, Source::Env(URL_ENV));
    }

    #[test]
    fn flags_beat_the_environment() {
        let f = file(FILE);
        let env = [(URL_ENV, "http://env:1"), (KEY_ENV, "lf_env")];
        let c = resolve(
            flags(Some("http://flag:2/"), Some("lf_flag"), None),
            &env,
            Some(&f),
        );
        assert_eq!(c.url, "http://flag:2");
        assert_eq!(c.api_key.as_deref(), Some("lf_flag"));
        assert_eq!(c.key_source, Some(Source::Flag));
    }

    #[test]
    fn a_profile_named_by_flag_beats_the_environment() {
        let f = file(FILE);
        let env = [(URL_ENV, "http://env:1"), (KEY_ENV, "lf_env")];
        let c = resolve(flags(None, None, Some("prod")), &env, Some(&f));
        assert_eq!(c.url, "https://prod.example.com");
        assert_eq!(c.api_key.as_deref(), Some("lf_prod"));
        // ... but a --url flag still wins, and then prod's key is not sent elsewhere: the
        // environment's key is.
        let c = resolve(
            flags(Some("http://other:3"), None, Some("prod")),
            &env,
            Some(&f),
        );
        assert_eq!(c.url, "http://other:3");
        assert_eq!(c.api_key.as_deref(), Some("lf_env"));
    }

    #[test]
    fn a_profile_key_is_never_sent_to_another_url() {
        let f = file(FILE);
        let c = resolve(
            ConnectionArgs::default(),
            &[(URL_ENV, "http://env:1")],
            Some(&f),
        );
        assert_eq!(c.url, "http://env:1");
        assert_eq!(c.api_key, None);
        let c = resolve(flags(Some("http://dev:8080/"), None, None), &[], Some(&f));
        assert_eq!(
            c.api_key.as_deref(),
            Some("lf_dev"),
            "the same URL keeps its key"
        );
    }

    #[test]
    fn profiles_from_the_environment_and_default_profile() {
        let f = file(&format!("default_profile = \"prod\"\n{FILE}"));
        let c = resolve(ConnectionArgs::default(), &[], Some(&f));
        assert_eq!(c.url, "https://prod.example.com");
        let c = resolve(
            ConnectionArgs::default(),
            &[(PROFILE_ENV, "default")],
            Some(&f),
        );
        assert_eq!(c.url, "http://dev:8080");
    }

    #[test]
    fn a_named_profile_must_exist_and_the_url_must_be_http() {
        let f = file(FILE);
        let err = Config::resolve(&flags(None, None, Some("staging")), |_| None, Some(&f))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no profile \"staging\"") && err.contains("default, prod"),
            "{err}"
        );
        let err = Config::resolve(&flags(Some("localhost:8080"), None, None), |_| None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not an http(s) URL"), "{err}");
        let bad = ConfigFile::parse("[profiles.x]\nurl = 3\n", Path::new("c.toml"));
        assert!(bad.unwrap_err().to_string().starts_with("c.toml:"));
    }

    #[test]
    fn debug_output_hides_the_key() {
        let c = resolve(flags(None, Some("lf_secret_value"), None), &[], None);
        let shown = format!("{c:?}");
        assert!(!shown.contains("lf_secret_value") && shown.contains("<redacted>"));
    }
}
