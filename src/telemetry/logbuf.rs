//! The log lines' way to stdout: each line is appended to one buffer under
//! a short lock, and a thread of its own writes the buffer out. A line
//! never waits for stdout, and a slow stdout never blocks a runtime
//! thread: past `MAX_BYTES` waiting, lines are dropped and counted
//! (`llm_gateway_dropped_log_lines_total`, and a warning once stdout
//! catches up). The writer thread is woken only by the first line after
//! it went idle; it then writes what arrived every `BATCH_FOR` until a
//! batch finds nothing. A queue of lines with a wake-up per line
//! (tracing-appender's) cost every call a futex wake, two context switches
//! and a `write` of its own, on cores the calls need.

use std::{
    io::{self, Write},
    sync::{
        Arc, LazyLock, Mutex,
        mpsc::{self, RecvTimeoutError},
    },
    thread::{self, Thread},
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use tracing_subscriber::fmt::MakeWriter;

/// Lines dropped because the buffer was full; registered by `metrics`.
pub(crate) static DROPPED_LINES: LazyLock<Counter> = LazyLock::new(Counter::default);

/// Most bytes of lines waiting before new ones are dropped: seconds of one
/// line per call at this gateway's saturation.
const MAX_BYTES: usize = 8 << 20;
/// How long the writer lets lines gather between two writes while they
/// keep coming. A line waits at most this long (plus the write) for stdout.
const BATCH_FOR: Duration = Duration::from_millis(20);
/// A buffer that grew past this is given back after its write, rather than
/// kept for the next burst.
const KEEP_CAPACITY: usize = 1 << 20;
/// How long [`Guard`]'s drop waits for the last lines to be written.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(1);

#[derive(Default)]
struct State {
    lines: Vec<u8>,
    /// The writer is awake (writing, or gathering the next batch): a new
    /// line need not wake it.
    busy: bool,
    closed: bool,
    dropped: u64,
}

struct Shared {
    state: Mutex<State>,
    writer: Thread,
}

impl Shared {
    fn append(&self, line: &[u8]) {
        let wake = {
            // A poisoned lock (a panic while appending) loses the line, not
            // the process.
            let Ok(mut s) = self.state.lock() else { return };
            if s.lines.len() + line.len() > MAX_BYTES {
                s.dropped += 1;
                DROPPED_LINES.inc();
                return;
            }
            let wake = s.lines.is_empty() && !s.busy;
            s.lines.extend_from_slice(line);
            wake
        };
        if wake {
            self.writer.unpark();
        }
    }
}

/// The writer the log layer formats into (one `write` per line).
#[derive(Clone)]
pub struct LogBuffer(Arc<Shared>);

/// One line's writer.
pub struct Line<'a>(&'a Shared);

impl Write for Line<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.append(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogBuffer {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Line(&self.0)
    }
}

/// Writes the lines still waiting when dropped (for at most a second).
pub struct Guard {
    shared: Arc<Shared>,
    done: mpsc::Receiver<()>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(mut s) = self.shared.state.lock() {
            s.closed = true;
        }
        self.shared.writer.unpark();
        if let Err(RecvTimeoutError::Timeout) = self.done.recv_timeout(SHUTDOWN_WAIT) {
            eprintln!("log lines still unwritten after {SHUTDOWN_WAIT:?}: stdout is not being read");
        }
    }
}

/// Starts the writer thread on `out`.
pub fn start<W: Write + Send + 'static>(out: W) -> io::Result<(LogBuffer, Guard)> {
    let (ready, shared) = mpsc::sync_channel::<Arc<Shared>>(1);
    let (done_tx, done) = mpsc::channel();
    let handle = thread::Builder::new().name("log-writer".into()).spawn(move || {
        if let Ok(shared) = shared.recv() {
            write_out(&shared, out);
        }
        let _ = done_tx.send(());
    })?;
    let shared = Arc::new(Shared { state: Mutex::default(), writer: handle.thread().clone() });
    // The thread waits for this before it looks at the buffer.
    let _ = ready.send(shared.clone());
    Ok((LogBuffer(shared.clone()), Guard { shared, done }))
}

fn write_out<W: Write>(shared: &Shared, mut out: W) {
    let mut batch = Vec::new();
    loop {
        let (closed, dropped) = {
            let Ok(mut s) = shared.state.lock() else { return };
            if s.lines.is_empty() {
                if s.closed {
                    return;
                }
                // Idle: the next line wakes the thread. Set under the lock a
                // line is appended under, so that no line can miss it.
                s.busy = false;
                drop(s);
                thread::park();
                if let Ok(mut s) = shared.state.lock() {
                    s.busy = true;
                }
                continue;
            }
            std::mem::swap(&mut s.lines, &mut batch);
            (s.closed, std::mem::take(&mut s.dropped))
        };
        // stdout gone (a closed pipe): nothing else can be done with the
        // lines, and the gateway keeps serving.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if batch.capacity() > KEEP_CAPACITY {
            batch = Vec::new();
        }
        if dropped > 0 {
            tracing::warn!(dropped, "log lines dropped: stdout did not keep up");
        }
        if !closed {
            thread::sleep(BATCH_FOR);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// stdout for the tests: what was written, and in how many writes.
    #[derive(Clone, Default)]
    struct Out(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Out {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let mut o = self.0.lock().unwrap();
            o.0.extend_from_slice(bytes);
            o.1 += 1;
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Out {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().0.clone()).unwrap()
        }
        fn writes(&self) -> usize {
            self.0.lock().unwrap().1
        }
    }

    fn line(buf: &LogBuffer, text: &str) {
        buf.make_writer().write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn a_line_after_a_quiet_spell_goes_out_at_once_and_a_burst_in_few_writes() {
        let out = Out::default();
        let (buf, guard) = start(out.clone()).unwrap();
        line(&buf, "first\n");
        let start = Instant::now();
        while out.text() != "first\n" {
            assert!(start.elapsed() < Duration::from_secs(5), "the first line was not written");
            thread::yield_now();
        }
        let before = out.writes();
        let burst: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        for l in burst.lines() {
            line(&buf, &format!("{l}\n"));
        }
        drop(guard);
        assert_eq!(out.text(), format!("first\n{burst}"), "every line, in order, whole");
        assert!(out.writes() - before < 100, "1,000 lines in {} writes", out.writes() - before);
    }

    #[test]
    fn lines_from_many_threads_are_never_split() {
        let out = Out::default();
        let (buf, guard) = start(out.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let buf = buf.clone();
                thread::spawn(move || {
                    for i in 0..500 {
                        line(&buf, &format!("thread {t} line {i} {}\n", "x".repeat(100)));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let text = out.text();
        assert_eq!(text.lines().count(), 2000);
        for l in text.lines() {
            assert!(l.starts_with("thread ") && l.ends_with(&"x".repeat(100)), "a split line: {l:?}");
        }
    }

    #[test]
    fn past_the_cap_lines_are_dropped_and_counted() {
        // stdout not being read: the writer blocks in its first write until
        // the gate opens.
        #[derive(Default)]
        struct Gate {
            entered: std::sync::atomic::AtomicBool,
            open: Mutex<bool>,
            cv: std::sync::Condvar,
        }
        struct Stuck(Arc<Gate>, Out);
        impl Write for Stuck {
            fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
                self.0.entered.store(true, std::sync::atomic::Ordering::Release);
                let mut open = self.0.open.lock().unwrap();
                while !*open {
                    open = self.0.cv.wait(open).unwrap();
                }
                self.1.write(bytes)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let gate = Arc::new(Gate::default());
        let out = Out::default();
        let (buf, guard) = start(Stuck(gate.clone(), out.clone())).unwrap();
        line(&buf, "start\n");
        let start = Instant::now();
        while !gate.entered.load(std::sync::atomic::Ordering::Acquire) {
            assert!(start.elapsed() < Duration::from_secs(5), "the writer never wrote");
            thread::yield_now();
        }
        let before = DROPPED_LINES.get();
        let big = format!("{}\n", "y".repeat(1 << 16));
        let fit = MAX_BYTES / big.len();
        let n = fit + 10;
        for _ in 0..n {
            line(&buf, &big);
        }
        assert_eq!(DROPPED_LINES.get() - before, 10, "the lines past the cap are counted");
        *gate.open.lock().unwrap() = true;
        gate.cv.notify_all();
        drop(guard);
        assert_eq!(out.text().lines().count(), 1 + fit, "the first line and those that fitted");
    }
}
