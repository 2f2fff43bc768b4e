//! A minimal SOCKS5 proxy on 127.0.0.1:0 (RFC 1928, CONNECT only, with no
//! auth or username/password, RFC 1929), which records each CONNECT it
//! relays, for the proxy tests.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::{JoinHandle, JoinSet},
};

pub(crate) struct Socks {
    addr: SocketAddr,
    /// "host:port" of each CONNECT, and the user it authenticated as.
    seen: Arc<Mutex<Vec<(String, String)>>>,
    server: JoinHandle<()>,
}

impl Drop for Socks {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Socks {
    pub(crate) async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the SOCKS proxy");
        let addr = listener.local_addr().expect("proxy address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = seen.clone();
        let server = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let seen = recorded.clone();
                conns.spawn(async move {
                    let _ = relay(stream, seen).await;
                });
            }
        });
        Self { addr, seen, server }
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) fn connects(&self) -> Vec<(String, String)> {
        self.seen.lock().expect("not poisoned").clone()
    }
}

async fn relay(mut client: TcpStream, seen: Arc<Mutex<Vec<(String, String)>>>) -> std::io::Result<()> {
    let mut head = [0u8; 2];
    client.read_exact(&mut head).await?;
    let mut methods = vec![0u8; usize::from(head[1])];
    client.read_exact(&mut methods).await?;
    let mut user = String::new();
    if methods.contains(&2) {
        client.write_all(&[5, 2]).await?;
        let mut ver = [0u8; 2];
        client.read_exact(&mut ver).await?;
        let mut name = vec![0u8; usize::from(ver[1])];
        client.read_exact(&mut name).await?;
        let mut plen = [0u8; 1];
        client.read_exact(&mut plen).await?;
        let mut pass = vec![0u8; usize::from(plen[0])];
        client.read_exact(&mut pass).await?;
        user = String::from_utf8_lossy(&name).into_owned();
        client.write_all(&[1, 0]).await?;
    } else {
        client.write_all(&[5, 0]).await?;
    }
    let mut req = [0u8; 4];
    client.read_exact(&mut req).await?;
    let host = match req[3] {
        1 => {
            let mut ip = [0u8; 4];
            client.read_exact(&mut ip).await?;
            std::net::Ipv4Addr::from(ip).to_string()
        }
        3 => {
            let mut len = [0u8; 1];
            client.read_exact(&mut len).await?;
            let mut name = vec![0u8; usize::from(len[0])];
            client.read_exact(&mut name).await?;
            String::from_utf8_lossy(&name).into_owned()
        }
        _ => return Ok(()),
    };
    let mut port = [0u8; 2];
    client.read_exact(&mut port).await?;
    let target = format!("{host}:{}", u16::from_be_bytes(port));
    seen.lock().expect("not poisoned").push((target.clone(), user));
    let Ok(mut upstream) = TcpStream::connect(&target).await else {
        // Connection refused.
        client.write_all(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0]).await?;
        return Ok(());
    };
    client.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0, 0]).await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}
