//! A real `redis-server` (or `valkey-server`) per test: on a free loopback
//! port (never 6379), with a data directory of its own, no persistence,
//! killed on drop. It can be stopped, paused (SIGSTOP: it accepts and never
//! answers) and started again on the same port.

use std::{
    net::{SocketAddr, TcpListener},
    process::{Child, Command, Stdio},
    time::Duration,
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::eventually;

/// Long enough for a cold redis-server to start on a loaded 2-core machine.
const START_BOUND: Duration = Duration::from_secs(10);

pub(crate) struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// `requirepass`, when set.
    password: Option<String>,
    /// `redis-server` or `valkey-server`.
    program: &'static str,
    /// More of its options.
    extra: Vec<String>,
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local address").port()
}

impl RedisServer {
    pub(crate) async fn start() -> Self {
        Self::start_with(None, "redis-server", Vec::new()).await
    }

    /// Valkey, the fork the contract names beside Redis 7.
    pub(crate) async fn valkey() -> Self {
        Self::start_with(None, "valkey-server", Vec::new()).await
    }

    /// A server that refuses every command until a client sends `password`.
    pub(crate) async fn with_password(password: &str) -> Self {
        Self::start_with(Some(password.to_owned()), "redis-server", Vec::new()).await
    }

    async fn start_with(password: Option<String>, program: &'static str, extra: Vec<String>) -> Self {
        let dir = tempfile::tempdir().expect("a data directory");
        let mut port = free_port();
        while port == 6379 {
            port = free_port();
        }
        let mut server = Self { port, dir, child: None, password, program, extra };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        let mut command = Command::new(self.program);
        if let Some(password) = &self.password {
            command.args(["--requirepass", password]);
        }
        let child = command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}): install it (Debian: apt-get install {0}, from bookworm-backports for \
                     valkey-server on bookworm; .ci/run does)",
                    self.program
                )
            });
        self.child = Some(child);
        let addr = self.addr();
        let auth = self.password.as_deref().map(|p| format!("AUTH {p}\r\n")).unwrap_or_default();
        eventually(START_BOUND, "the server to answer PING", async || ping(addr, &auth).await).await;
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server and waits for it to be gone.
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub(crate) async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("a running server").id();
        let ok = Command::new("kill").args([sig, &pid.to_string()]).status().is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    }

    /// Freezes the server: connections stay open, nothing is answered.
    pub(crate) fn pause(&self) {
        self.signal("-STOP");
    }

    pub(crate) fn resume(&self) {
        self.signal("-CONT");
    }

    /// A command run by a client of its own, for assertions.
    pub(crate) async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        let url = match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}/0", self.port),
            None => self.url(),
        };
        let client = redis::Client::open(url).expect("client");
        let mut conn = client.get_multiplexed_async_connection().await.expect("connect to the test redis");
        cmd.query_async(&mut conn).await.expect("query the test redis")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // SIGKILL ends a paused server too.
        self.stop();
    }
}

/// `auth`: an AUTH command sent first, or empty.
async fn ping(addr: SocketAddr, auth: &str) -> bool {
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_millis(200), tokio::net::TcpStream::connect(addr)).await
    else {
        return false;
    };
    if s.write_all(format!("{auth}PING\r\n").as_bytes()).await.is_err() {
        return false;
    }
    // +OK to the AUTH, then +PONG.
    let want: &[u8] = if auth.is_empty() { b"+PONG\r\n" } else { b"+OK\r\n+PONG\r\n" };
    let mut buf = vec![0u8; want.len()];
    matches!(tokio::time::timeout(Duration::from_millis(200), s.read_exact(&mut buf)).await, Ok(Ok(_)))
        && buf == want
}

/// The 16384 slots, split between the three masters of a [`RedisCluster`].
pub(crate) const CLUSTER_SLOTS: [(i64, i64); 3] = [(0, 5460), (5461, 10922), (10923, 16383)];

/// A real Redis Cluster: three masters, no replicas, each on free loopback
/// ports (its client port and its cluster bus port).
pub(crate) struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub(crate) async fn start() -> Self {
        let (mut nodes, mut buses) = (Vec::new(), Vec::new());
        for _ in CLUSTER_SLOTS {
            // Not port + 10000, the default, which may be taken or out of range.
            let bus = free_port().to_string();
            let extra =
                ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-port", &bus];
            nodes.push(RedisServer::start_with(None, "redis-server", extra.map(String::from).to_vec()).await);
            buses.push(bus);
        }
        for (node, (first, last)) in nodes.iter().zip(CLUSTER_SLOTS) {
            let _: () = node.query(redis::cmd("CLUSTER").arg("ADDSLOTSRANGE").arg(first).arg(last)).await;
        }
        for (node, bus) in nodes.iter().zip(&buses).skip(1) {
            let meet = redis::cmd("CLUSTER").arg("MEET").arg("127.0.0.1").arg(node.port).arg(bus).clone();
            let _: () = nodes[0].query(&meet).await;
        }
        for node in &nodes {
            eventually(START_BOUND, "every node to see the cluster whole", async || {
                let info: String = node.query(redis::cmd("CLUSTER").arg("INFO")).await;
                info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3")
            })
            .await;
        }
        Self { nodes }
    }

    /// The node that owns the slot of `key`.
    pub(crate) async fn owner(&self, key: &str) -> usize {
        let slot: i64 = self.nodes[0].query(redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)).await;
        CLUSTER_SLOTS
            .iter()
            .position(|&(first, last)| (first..=last).contains(&slot))
            .expect("a slot in range")
    }
}
