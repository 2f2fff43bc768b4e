//! Live config reload: on a request (SIGHUP) or when the file's contents
//! change, the file is read and checked, then handed to the composition
//! root, which swaps what can change at once. An invalid file keeps the
//! running config: the error is logged with its key and line and counted
//! (`llm_gateway_config_reloads_total{outcome}`). Settings that only take
//! effect at start-up are named in the log when they change. Knows the
//! config and telemetry only; what a reload replaces is the caller's.

use std::{path::PathBuf, time::Duration};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    config::{self, Config},
    telemetry::metrics::Metrics,
};

/// The top-level keys read only at start-up (listeners, server limits,
/// telemetry): a change is logged, not applied. Everything else (providers,
/// models, api_keys, and the limits and prices beside them) is swapped.
pub const RESTART_KEYS: &[&str] = &["listen", "admin_listen", "http_listen", "server", "telemetry"];

/// Where a running gateway's config comes from.
pub struct Source {
    /// The config file.
    pub path: PathBuf,
    /// Its text when the running config was read from it.
    pub text: String,
    /// One message per reload asked for (the binary sends one per SIGHUP).
    pub requests: Option<mpsc::Receiver<()>>,
}

impl Source {
    /// Reads the file the gateway starts on.
    pub fn read(path: PathBuf) -> Result<(Self, Config), config::ConfigError> {
        let text = std::fs::read_to_string(&path).map_err(|e| config::ConfigError {
            file: Some(path.display().to_string()),
            key: None,
            line: None,
            message: format!("cannot read: {e}"),
        })?;
        let config = config::parse(&text, Some(&path.display().to_string()))?;
        Ok((Self { path, text, requests: None }, config))
    }
}

/// Why a reload was tried.
#[derive(Clone, Copy)]
enum Cause {
    Requested,
    Changed,
}

impl Cause {
    fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Changed => "file changed",
        }
    }
}

/// Watches `source` until `stop` fires: checks the file every `interval`
/// (0: only on request) and reloads on each request. `apply` installs a
/// checked config, or says why it cannot (a provider that cannot be built).
pub async fn watch(
    mut source: Source,
    interval: Duration,
    metrics: &Metrics,
    stop: CancellationToken,
    apply: impl Fn(&Config) -> Result<(), String>,
) {
    let mut tick =
        tokio::time::interval(if interval.is_zero() { Duration::from_secs(3600) } else { interval });
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    // The text last looked at, applied or refused: a refused file is
    // reported once, not at every tick.
    let mut seen = source.text.clone();
    // None: the first tick reads (the file may have changed since start-up).
    // A stamp is taken before its read, so a change in between is read again.
    let mut stamp = None;
    loop {
        let requested = async {
            match source.requests.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        let cause = tokio::select! {
            _ = stop.cancelled() => return,
            r = requested => match r {
                Some(()) => Cause::Requested,
                // The sender is gone: no more requests, polling goes on.
                None => { source.requests = None; continue; }
            },
            _ = tick.tick(), if !interval.is_zero() => Cause::Changed,
        };
        if matches!(cause, Cause::Changed) {
            // A stat, not a read on the blocking pool, at every tick: work
            // handed to that pool every few seconds keeps its idle threads
            // alive for good (each is woken in turn before its keep-alive
            // runs out), so a burst's extra threads would never leave.
            let now = Stamp::of(&source.path);
            if now.is_some() && now == stamp && now.is_some_and(Stamp::settled) {
                continue;
            }
            stamp = now;
        }
        let path = source.path.clone();
        let text = match tokio::task::spawn_blocking(move || std::fs::read_to_string(path)).await {
            Ok(Ok(text)) => text,
            Ok(Err(e)) => {
                // A ConfigMap update swaps a symlink: a read in between may
                // miss the file. The next tick looks again.
                tracing::warn!(file = %source.path.display(), error = %e, "config reload: cannot read the file");
                if matches!(cause, Cause::Requested) {
                    metrics.config_reloaded("invalid");
                }
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "config reload: the read task failed");
                continue;
            }
        };
        if matches!(cause, Cause::Changed) && text == seen {
            continue;
        }
        seen = text.clone();
        let file = source.path.display().to_string();
        match reload(&source.text, &text, &file, &apply) {
            Ok(restart) => {
                metrics.config_reloaded("ok");
                tracing::info!(file, cause = cause.as_str(), "config reloaded");
                if !restart.is_empty() {
                    tracing::warn!(
                        file,
                        keys = %restart.join(", "),
                        "config reload: these settings changed but only take effect at a restart"
                    );
                }
                source.text = text;
            }
            Err(e) => {
                metrics.config_reloaded("invalid");
                tracing::error!(
                    file,
                    key = e.key.as_deref().unwrap_or(""),
                    line = e.line.unwrap_or(0),
                    error = %e,
                    cause = cause.as_str(),
                    "config reload refused: the running config is kept"
                );
            }
        }
    }
}

/// Checks `new` and applies it; returns the start-up settings that changed.
fn reload(
    old: &str,
    new: &str,
    file: &str,
    apply: &impl Fn(&Config) -> Result<(), String>,
) -> Result<Vec<String>, config::ConfigError> {
    let config = config::parse(new, Some(file))?;
    apply(&config).map_err(|message| config::ConfigError {
        file: Some(file.to_owned()),
        key: None,
        line: None,
        message,
    })?;
    Ok(restart_changes(old, new))
}

/// The key paths under [`RESTART_KEYS`] whose written values differ.
pub fn restart_changes(old: &str, new: &str) -> Vec<String> {
    let parse = |t: &str| serde_saphyr::from_str::<serde_json::Value>(t).unwrap_or_default();
    let (old, new) = (parse(old), parse(new));
    let mut changed = Vec::new();
    for key in RESTART_KEYS {
        diff(key, old.get(key), new.get(key), &mut changed);
    }
    changed
}

fn diff(path: &str, old: Option<&serde_json::Value>, new: Option<&serde_json::Value>, out: &mut Vec<String>) {
    use serde_json::Value;
    match (old, new) {
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                diff(&format!("{path}.{k}"), a.get(k), b.get(k), out);
            }
        }
        (a, b) if a != b => out.push(path.to_owned()),
        _ => {}
    }
}

/// What a stat says of the file: a change of any of these is a change to
/// look at (an edit, a rename over it, a ConfigMap's symlink swap).
#[derive(PartialEq, Eq, Clone, Copy)]
struct Stamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    inode: u64,
}

impl Stamp {
    /// None when the file cannot be stat'ed (it is then read, and the read
    /// says why).
    fn of(path: &std::path::Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Self { len: m.len(), modified: m.modified().ok(), inode: m.ino() })
    }

    /// Modified long enough ago to be trusted: file times tick in jiffies,
    /// so two writes of one length within a few milliseconds share a stamp;
    /// until the file has been still for a while it is read at every tick.
    fn settled(self) -> bool {
        self.modified.and_then(|m| m.elapsed().ok()).is_some_and(|age| age > Duration::from_secs(2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_start_up_settings_that_changed() {
        let old =
            "listen: 0.0.0.0:1\nserver:\n  shutdown_grace: 30s\n  default_timeout: 1m\nmodels: {a: 1}\n";
        let new =
            "listen: 0.0.0.0:2\nserver:\n  shutdown_grace: 30s\n  max_connection_age: 5m\nmodels: {b: 1}\n";
        assert_eq!(
            restart_changes(old, new),
            vec!["listen", "server.default_timeout", "server.max_connection_age"]
        );
        assert!(restart_changes(old, old).is_empty());
    }

    #[test]
    fn a_stamp_sees_a_rename_over_the_file_and_distrusts_a_fresh_one() {
        let dir = tempfile::tempdir().unwrap();
        let (path, other) = (dir.path().join("c.yaml"), dir.path().join("new.yaml"));
        std::fs::write(&path, "a: 1\n").unwrap();
        let first = Stamp::of(&path).unwrap();
        // Just written: read at every tick until it has been still a while.
        assert!(!first.settled());
        // The same length, renamed over it (an editor, a ConfigMap swap).
        std::fs::write(&other, "a: 2\n").unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert!(Stamp::of(&path).unwrap() != first);
        assert!(Stamp::of(&dir.path().join("gone.yaml")).is_none());
    }
}
