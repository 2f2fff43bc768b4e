//! `--perf`: a `perf record` of the gateway during one throughput run, to
//! find where its CPU goes. Optional; the bench runs without perf installed.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::BoxError;

/// A running `perf record`; killed if dropped before [`Recorder::stop`].
pub struct Recorder {
    child: Child,
}

impl Recorder {
    pub fn start(pid: u32, out: &Path) -> Result<Self, BoxError> {
        let child = Command::new("perf")
            .args(["record", "-F", "999", "--call-graph", "dwarf,16384", "-p", &pid.to_string(), "-o"])
            .arg(out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start perf (is it installed?): {e}"))?;
        Ok(Self { child })
    }

    /// Stops the recording with SIGINT, which makes perf write its file, and
    /// waits (bounded) for it to finish.
    pub async fn stop(mut self) {
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
