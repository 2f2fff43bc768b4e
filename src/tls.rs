//! TLS for the gateway's call listeners (rustls with ring): the certificate
//! and key from PEM files, an optional client CA that makes a client
//! certificate mandatory (mTLS), and a poll loop that reloads the files when
//! they change. A reload only affects new handshakes: open connections keep
//! the session they made. Any listener takes its connections through
//! [`TlsAcceptor::accept`] and serves the [`Stream`] it gets.

use std::{
    io,
    path::Path,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use arc_swap::ArcSwap;
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::{config::TlsConfig, telemetry::metrics::Metrics};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("TLS setup: {0}")]
    Setup(#[from] rustls::Error),
    #[error("TLS handshake: {0}")]
    Handshake(io::Error),
    #[error("TLS handshake not done within server.handshake_timeout")]
    HandshakeTimeout,
}

/// What one version of the files gave: a server config without ALPN (each
/// acceptor adds its own).
struct Material {
    generation: u64,
    config: Arc<ServerConfig>,
}

struct Inner {
    files: TlsConfig,
    material: ArcSwap<Material>,
    /// The digest of the files the current material came from, and of the
    /// last version that failed to load (so a bad version is logged once).
    loaded: std::sync::Mutex<([u8; 32], Option<[u8; 32]>)>,
    generation: AtomicU64,
}

/// The certificate, key and client CA of the listeners, reloadable.
#[derive(Clone)]
pub struct Tls {
    inner: Arc<Inner>,
}

impl Tls {
    /// Reads and checks the files: a missing file, a key that does not match
    /// the certificate or an empty CA bundle is an error here, at start-up.
    pub fn load(files: &TlsConfig) -> Result<Self, TlsError> {
        let contents = Contents::read(files)?;
        let config = build(files, &contents)?;
        let digest = contents.digest();
        Ok(Self {
            inner: Arc::new(Inner {
                files: files.clone(),
                material: ArcSwap::from_pointee(Material { generation: 0, config }),
                loaded: std::sync::Mutex::new((digest, None)),
                generation: AtomicU64::new(0),
            }),
        })
    }

    /// An acceptor offering `alpn` (e.g. `h2` for gRPC; `h2` and
    /// `http/1.1` for an HTTP listener), always with the current files.
    pub fn acceptor(&self, alpn: &[&[u8]]) -> TlsAcceptor {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let material = self.inner.material.load();
        let built = Built { generation: material.generation, config: with_alpn(&material.config, &alpn) };
        TlsAcceptor { inner: self.inner.clone(), alpn, built: ArcSwap::from_pointee(built) }
    }

    /// Re-reads the files; when they changed and are valid, new handshakes
    /// use them. Ok(false): unchanged. An error keeps the current ones.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let contents = Contents::read(&self.inner.files)?;
        let digest = contents.digest();
        let mut loaded = self.inner.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded.0 == digest || loaded.1 == Some(digest) {
            return Ok(false);
        }
        match build(&self.inner.files, &contents) {
            Ok(config) => {
                let generation = self.inner.generation.fetch_add(1, Ordering::Relaxed) + 1;
                self.inner.material.store(Arc::new(Material { generation, config }));
                *loaded = (digest, None);
                Ok(true)
            }
            Err(e) => {
                loaded.1 = Some(digest);
                Err(e)
            }
        }
    }

    /// Checks the files every `interval` until `stop` fires, logging and
    /// counting (`llm_gateway_tls_reloads_total{outcome}`) each change.
    pub async fn watch(self, interval: Duration, metrics: Arc<Metrics>, stop: CancellationToken) {
        if interval.is_zero() {
            return;
        }
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            // Reading and parsing a few KiB of PEM: off the async threads.
            let tls = self.clone();
            let outcome = match tokio::task::spawn_blocking(move || tls.reload()).await {
                Ok(Ok(false)) => continue,
                Ok(Ok(true)) => {
                    tracing::info!(cert_file = %self.inner.files.cert_file.display(), "TLS certificate reloaded");
                    "ok"
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "TLS files changed but cannot be used; keeping the current ones");
                    "error"
                }
                Err(e) => {
                    tracing::warn!(error = %e, "TLS reload task failed");
                    "error"
                }
            };
            metrics.tls_reloaded(outcome);
        }
    }
}

struct Built {
    generation: u64,
    config: Arc<ServerConfig>,
}

/// Accepts TLS connections for one listener (one ALPN list).
pub struct TlsAcceptor {
    inner: Arc<Inner>,
    alpn: Vec<Vec<u8>>,
    built: ArcSwap<Built>,
}

impl TlsAcceptor {
    /// The handshake, done by `deadline` (the listener's handshake timeout)
    /// or dropped, so that half-open handshakes cannot pile up. A client the
    /// config refuses (no client certificate under mTLS, one the CA did not
    /// sign, no common protocol) fails here, before any HTTP is read.
    pub async fn accept(&self, tcp: TcpStream, deadline: tokio::time::Instant) -> Result<Stream, TlsError> {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.config());
        match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => Ok(Stream::Tls(Box::new(tls))),
            Ok(Err(e)) => Err(TlsError::Handshake(e)),
            Err(_) => Err(TlsError::HandshakeTimeout),
        }
    }

    /// The current config with this listener's ALPN, rebuilt once per reload.
    fn config(&self) -> Arc<ServerConfig> {
        let material = self.inner.material.load();
        let built = self.built.load();
        if built.generation == material.generation {
            return built.config.clone();
        }
        let config = with_alpn(&material.config, &self.alpn);
        self.built.store(Arc::new(Built { generation: material.generation, config: config.clone() }));
        config
    }
}

fn with_alpn(base: &ServerConfig, alpn: &[Vec<u8>]) -> Arc<ServerConfig> {
    let mut config = base.clone();
    config.alpn_protocols = alpn.to_vec();
    Arc::new(config)
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| file_error(path, format!("cannot read: {e}")))
}

fn file_error(path: &Path, message: String) -> TlsError {
    TlsError::File { path: path.display().to_string(), message }
}

/// The files' contents, read once so that the digest and the config come
/// from the same version.
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Contents {
    fn read(files: &TlsConfig) -> Result<Self, TlsError> {
        Ok(Self {
            cert: read(&files.cert_file)?,
            key: read(&files.key_file)?,
            client_ca: files.client_ca_file.as_deref().map(read).transpose()?,
        })
    }

    fn digest(&self) -> [u8; 32] {
        let mut hash = Sha256::new();
        for bytes in [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()].into_iter().flatten() {
            hash.update((bytes.len() as u64).to_le_bytes());
            hash.update(bytes);
        }
        hash.finalize().into()
    }
}

/// Builds a server config from the files' contents.
fn build(files: &TlsConfig, contents: &Contents) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = certificates(&files.cert_file, &contents.cert)?;
    let key = PrivateKeyDer::from_pem_slice(&contents.key)
        .map_err(|e| file_error(&files.key_file, format!("no PEM private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder =
        ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let builder = match (&files.client_ca_file, &contents.client_ca) {
        (Some(ca_file), Some(ca)) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca_file, ca)? {
                roots.add(cert).map_err(|e| file_error(ca_file, format!("not a CA certificate: {e}")))?;
            }
            // Mandatory: a client without a valid certificate fails the handshake.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| file_error(ca_file, format!("cannot verify clients with it: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    // Checks that the key is the certificate's.
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| file_error(&files.key_file, format!("does not go with the certificate: {e}")))?;
    Ok(Arc::new(config))
}

fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(path, "holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// A connection as a listener serves it: plain TCP, or TLS over TCP.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// The protocol ALPN settled on, when TLS negotiated one.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            Self::Plain(_) => None,
            Self::Tls(tls) => tls.get_ref().1.alpn_protocol(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
