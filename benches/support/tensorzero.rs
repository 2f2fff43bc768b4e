//! TensorZero's gateway beside ours (issue #17): its PyPI package
//! `tensorzero` embeds its Rust gateway, which `benches/tensorzero_host.py`
//! starts on loopback from a Python process, pointed at the bench's fake
//! upstream through one OpenAI-compatible provider, with no ClickHouse,
//! Postgres or Valkey. The package lives in a venv under `~/.cache`,
//! installed from PyPI when missing; `BENCH_TENSORZERO_PYTHON` names another
//! interpreter that has it. The guard kills the host when dropped.

use std::{
    collections::VecDeque,
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::mpsc;

use super::{BoxError, process::ProcUsage};

/// The host script, in the source tree.
const HOST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/tensorzero_host.py");
/// Longest the host may take to print its base URL (the gateway parses its
/// config and binds; the first start after an install also compiles .pyc).
const START_WAIT: Duration = Duration::from_secs(60);
/// Lines of the host's output kept for error messages.
const TAIL: usize = 40;
/// The model as TensorZero's OpenAI-compatible endpoint names it.
pub const MODEL: &str = "tensorzero::model_name::fast";
/// The same with 10 ms between tokens.
pub const MODEL_PACED: &str = "tensorzero::model_name::paced";

/// A running TensorZero gateway.
pub struct TensorZero {
    child: Child,
    /// Held open: the host exits when it closes.
    _stdin: Option<ChildStdin>,
    pub pid: u32,
    /// Its OpenAI-compatible API (`…/openai/v1`).
    pub base_url: String,
    /// The `tensorzero` package's version.
    pub version: String,
    /// The host's RSS with `tensorzero` imported, before the gateway started:
    /// the Python interpreter's share of [`TensorZero::usage`].
    pub rss_before_start_kib: u64,
    tail: Arc<Mutex<VecDeque<String>>>,
    _dir: tempfile::TempDir,
}

impl Drop for TensorZero {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The minimal TensorZero config: the upstream's `fast` and `paced` models
/// behind one OpenAI-compatible provider each, observability off.
fn config_toml(upstream: SocketAddr) -> String {
    let mut toml = String::from("[gateway]\nobservability.enabled = false\n");
    for model in ["fast", "paced"] {
        toml.push_str(&format!(
            "\n[models.{model}]\nrouting = [\"up\"]\n\n\
             [models.{model}.providers.up]\ntype = \"openai\"\nmodel_name = \"{model}\"\n\
             api_base = \"http://{upstream}/v1/\"\napi_key_location = \"none\"\n"
        ));
    }
    toml
}

impl TensorZero {
    /// Starts the host on a config pointing at `upstream` and waits
    /// (bounded) for its base URL.
    /// `install`: make the venv and install the package when missing.
    pub async fn spawn(upstream: SocketAddr, install: bool) -> Result<Self, BoxError> {
        let python = tokio::task::spawn_blocking(move || python(install)).await??;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("tensorzero.toml");
        std::fs::write(&path, config_toml(upstream))?;
        let mut child = Command::new(&python)
            .arg(HOST)
            .arg(&path)
            .env_remove("OPENAI_API_KEY")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", python.display()))?;
        let pid = child.id();
        let stdin = child.stdin.take();
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let (lines_tx, mut lines) = mpsc::channel(8);
        if let Some(out) = child.stdout.take() {
            read_lines(out, Some(lines_tx), tail.clone());
        }
        if let Some(err) = child.stderr.take() {
            read_lines(err, None, tail.clone());
        }
        let mut tz = TensorZero {
            child,
            _stdin: stdin,
            pid,
            base_url: String::new(),
            version: String::new(),
            rss_before_start_kib: 0,
            tail,
            _dir: dir,
        };
        let started = tokio::time::timeout(START_WAIT, async {
            while let Some(line) = lines.recv().await {
                let (key, value) = line.split_once(' ').unwrap_or((&line, ""));
                match key {
                    "version" => tz.version = value.to_owned(),
                    "rss_before_start_kib" => tz.rss_before_start_kib = value.parse().unwrap_or(0),
                    "base_url" => {
                        tz.base_url = value.to_owned();
                        return true;
                    }
                    _ => {}
                }
            }
            false
        })
        .await;
        match started {
            Ok(true) => Ok(tz),
            Ok(false) => Err(format!("the TensorZero host exited before serving:\n{}", tz.tail()).into()),
            Err(_) => {
                Err(format!("no base URL from the TensorZero host within {START_WAIT:?}:\n{}", tz.tail())
                    .into())
            }
        }
    }

    /// Whether the host is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines the host wrote.
    pub fn tail(&self) -> String {
        self.tail.lock().map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n")).unwrap_or_default()
    }

    pub fn usage(&self) -> Result<ProcUsage, BoxError> {
        ProcUsage::of(&self.pid.to_string())
    }
}

/// An interpreter that can `import tensorzero`: `BENCH_TENSORZERO_PYTHON`,
/// or the venv `~/.cache/llmgw-tz`, made and filled from PyPI if need be
/// (and allowed).
fn python(install: bool) -> Result<PathBuf, BoxError> {
    let imports = |python: &PathBuf| {
        Command::new(python)
            .args(["-c", "import tensorzero"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if let Some(p) = std::env::var_os("BENCH_TENSORZERO_PYTHON") {
        let p = PathBuf::from(p);
        return if imports(&p) {
            Ok(p)
        } else {
            Err(format!("BENCH_TENSORZERO_PYTHON={}: cannot import tensorzero", p.display()).into())
        };
    }
    let home = std::env::var_os("HOME").ok_or("HOME is unset: no ~/.cache for the TensorZero venv")?;
    let venv = PathBuf::from(home).join(".cache/llmgw-tz");
    let python = venv.join("bin/python");
    if imports(&python) {
        return Ok(python);
    }
    if !install {
        return Err(format!(
            "{} cannot import tensorzero, and this run may not install it (run under `cargo bench`)",
            python.display()
        )
        .into());
    }
    let run = |cmd: &mut Command, what: &str| -> Result<(), BoxError> {
        eprintln!("gateway bench: {what} …");
        let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim()).into())
        }
    };
    if !python.exists() {
        run(
            Command::new("python3").arg("-m").arg("venv").arg(&venv),
            &format!("making a venv at {}", venv.display()),
        )?;
    }
    run(
        Command::new(&python).args(["-m", "pip", "install", "--quiet", "tensorzero"]),
        "installing tensorzero from PyPI",
    )?;
    if imports(&python) {
        Ok(python)
    } else {
        Err(format!("{}: tensorzero installed but does not import", python.display()).into())
    }
}

/// Reads the host's output on a thread of its own (a full pipe would stall
/// it), sends stdout's lines to `lines` while anyone listens, and keeps the
/// last few for error messages.
fn read_lines(
    out: impl Read + Send + 'static,
    lines: Option<mpsc::Sender<String>>,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(out);
        let mut line = String::new();
        let mut lines = lines;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let text = line.trim_end().to_owned();
            if let Some(tx) = &lines
                && tx.blocking_send(text.clone()).is_err()
            {
                lines = None;
            }
            if let Ok(mut t) = tail.lock() {
                if t.len() == TAIL {
                    t.pop_front();
                }
                t.push_back(text);
            }
        }
    });
}
