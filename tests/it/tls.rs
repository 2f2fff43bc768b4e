//! `server.tls`: gRPC over TLS, mutual TLS (a client without a valid
//! certificate is refused in the handshake), and certificate files that are
//! reloaded for new handshakes while open connections keep working. The
//! certificates are made here with rcgen.

use std::{net::SocketAddr, path::Path, sync::Arc};

use llm_gateway::api::pb;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};
use rustls::{
    AlertDescription, ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};

use crate::harness::{Gateway, RawH2, WAIT, config, eventually, get_status, http, stream_request, within};

/// A CA and what it signs.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM and DER.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA");
        Self { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    fn leaf(&self, name: &str, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign the leaf");
        Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().clone() }
    }

    fn server(&self, name: &str) -> Leaf {
        self.leaf(name, ExtendedKeyUsagePurpose::ServerAuth)
    }

    fn client(&self, name: &str) -> Leaf {
        self.leaf(name, ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// Writes `text` to `path` the way a Secret volume update does: a new file
/// renamed over the old one, so no reader sees half of it.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new(server: &Leaf, client_ca: Option<&Ca>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = Self { dir };
        files.install(server);
        if let Some(ca) = client_ca {
            replace(&files.path("ca.crt"), &ca.pem());
        }
        files
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    fn install(&self, server: &Leaf) {
        replace(&self.path("tls.key"), &server.key_pem);
        replace(&self.path("tls.crt"), &server.cert_pem);
    }

    fn yaml(&self, mtls: bool, reload: &str) -> String {
        let ca = if mtls {
            format!("\n    client_ca_file: {}", self.path("ca.crt").display())
        } else {
            String::new()
        };
        format!(
            "server:\n  tls:\n    cert_file: {}\n    key_file: {}{ca}\n    reload_interval: {reload}\n{}",
            self.path("tls.crt").display(),
            self.path("tls.key").display(),
            config("http://127.0.0.1:9/v1"),
        )
    }
}

fn client_config(roots: &[CertificateDer<'static>], identity: Option<&Leaf>) -> Arc<ClientConfig> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).expect("a root");
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(store);
    let mut config = match identity {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![leaf.der.clone()],
                PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("client key"),
            )
            .expect("client identity"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A TLS connection to the gateway, as `localhost`.
async fn tls_connect(addr: SocketAddr, config: Arc<ClientConfig>) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = within(WAIT, "TCP connect", TcpStream::connect(addr)).await?;
    let name = ServerName::try_from("localhost").expect("server name");
    within(WAIT, "the TLS handshake", TlsConnector::from(config).connect(name, tcp)).await
}

/// One StreamCompletion over `raw`, read to its end; returns (grpc-status, text).
async fn call(raw: &mut RawH2, model: &str) -> (i32, String) {
    let mut response =
        raw.call("/llmgateway.v1.LlmGateway/StreamCompletion", &[], &stream_request(model, "hi")).await;
    let mut text = String::new();
    while let Some(m) =
        within(WAIT, "the next message", response.message::<pb::StreamCompletionResponse>()).await
    {
        text.push_str(&m.content);
    }
    let (code, _, _) = within(WAIT, "the status", response.status()).await;
    (code, text)
}

/// The certificate the server showed on `tls`.
fn peer(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().and_then(|c| c.first()).expect("a server certificate").clone()
}

/// The TLS alert a refused client got: on connect (TLS 1.2) or, since a
/// TLS 1.3 client finishes its side first, on its first read.
async fn refusal(addr: SocketAddr, config: Arc<ClientConfig>) -> rustls::Error {
    let io_error = match tls_connect(addr, config).await {
        Err(e) => e,
        Ok(mut tls) => {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 64];
            match within(WAIT, "the server's answer", tls.read(&mut buf)).await {
                Err(e) => e,
                Ok(n) => panic!("the server accepted the client ({n} bytes read)"),
            }
        }
    };
    io_error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .cloned()
        .unwrap_or_else(|| panic!("not a TLS error: {io_error:?}"))
}

#[tokio::test]
async fn grpc_over_tls() {
    let ca = Ca::new("test CA");
    let files = Files::new(&ca.server("server"), None);
    let gw = Gateway::start(&files.yaml(false, "30s")).await;
    let tls = tls_connect(gw.grpc, client_config(&[ca.der()], None)).await.expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN settles on h2");
    let mut raw = RawH2::over(gw.grpc, tls).await;
    let (code, text) = call(&mut raw, "lorem").await;
    assert_eq!(code, 0);
    assert!(!text.is_empty());
    // Plain text is not served on a TLS listener: the h2c connection fails.
    let tcp = TcpStream::connect(gw.grpc).await.expect("TCP connect");
    let (_send, conn) = within(WAIT, "an h2c handshake", h2::client::handshake(tcp)).await.expect("h2c");
    let ended = within(WAIT, "the h2c connection to fail", conn).await;
    assert!(ended.is_err(), "an h2c client must not get through: {ended:?}");
}

#[tokio::test]
async fn mtls_refuses_a_client_without_a_valid_certificate_in_the_handshake() {
    let ca = Ca::new("test CA");
    let files = Files::new(&ca.server("server"), Some(&ca));
    let gw = Gateway::start(&files.yaml(true, "30s")).await;

    // No certificate at all.
    let e = refusal(gw.grpc, client_config(&[ca.der()], None)).await;
    assert_eq!(e, rustls::Error::AlertReceived(AlertDescription::CertificateRequired), "{e}");

    // A certificate some other CA signed.
    let stranger = Ca::new("another CA").client("stranger");
    let e = refusal(gw.grpc, client_config(&[ca.der()], Some(&stranger))).await;
    assert!(
        matches!(
            e,
            rustls::Error::AlertReceived(AlertDescription::UnknownCA | AlertDescription::BadCertificate)
        ),
        "{e}"
    );

    // A certificate of the client CA: served.
    let tls = tls_connect(gw.grpc, client_config(&[ca.der()], Some(&ca.client("team-a"))))
        .await
        .expect("the handshake with a client certificate");
    let mut raw = RawH2::over(gw.grpc, tls).await;
    let (code, text) = call(&mut raw, "echo").await;
    assert_eq!((code, text.as_str()), (0, "hi"));
}

#[tokio::test]
async fn a_renewed_certificate_is_used_for_new_handshakes_and_old_connections_keep_working() {
    let ca = Ca::new("test CA");
    let first = ca.server("first");
    let files = Files::new(&first, None);
    let gw = Gateway::start(&files.yaml(false, "50ms")).await;
    let roots = [ca.der()];

    let old = tls_connect(gw.grpc, client_config(&roots, None)).await.expect("TLS handshake");
    assert_eq!(peer(&old), first.der);
    let mut old = RawH2::over(gw.grpc, old).await;
    assert_eq!(call(&mut old, "lorem").await.0, 0);

    // A broken pair (the new key, the old certificate) is not taken up...
    let second = ca.server("second");
    replace(&files.path("tls.key"), &second.key_pem);
    let metrics = gw.admin_url("/metrics");
    eventually(WAIT, "the bad pair to be counted", async || {
        let body = within(WAIT, "/metrics", http().get(&metrics).send()).await.expect("metrics");
        body.text().await.unwrap_or_default().contains("llm_gateway_tls_reloads_total{outcome=\"error\"} 1")
    })
    .await;
    let tls = tls_connect(gw.grpc, client_config(&roots, None)).await.expect("still serving");
    assert_eq!(peer(&tls), first.der, "the running certificate stays while the files do not match");

    // ...the whole renewal is.
    replace(&files.path("tls.crt"), &second.cert_pem);
    let addr = gw.grpc;
    eventually(WAIT, "new handshakes to show the renewed certificate", async || {
        let tls = tls_connect(addr, client_config(&roots, None)).await.expect("TLS handshake");
        peer(&tls) == second.der
    })
    .await;
    let mut new =
        RawH2::over(gw.grpc, tls_connect(gw.grpc, client_config(&roots, None)).await.expect("TLS")).await;
    assert_eq!(call(&mut new, "lorem").await.0, 0);

    // The connection made before the renewal was not dropped.
    assert!(!old.is_closed(), "the old connection is still open");
    assert_eq!(call(&mut old, "lorem").await.0, 0, "and still serves calls");
    assert_eq!(get_status(&gw.admin_url("/readyz")).await, 200);
}

/// The HTTP front door over TLS: ALPN offers both versions, and a call
/// streams over each.
#[tokio::test]
async fn the_http_front_door_over_tls_speaks_http1_and_h2() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = Ca::new("test CA");
    let files = Files::new(&ca.server("server"), None);
    let gw = Gateway::start(&format!("http_listen: 127.0.0.1:0\n{}", files.yaml(false, "30s"))).await;
    let body = r#"{"model":"lorem","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

    let mut config = (*client_config(&[ca.der()], None)).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut tls = tls_connect(gw.http_addr(), Arc::new(config)).await.expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    within(WAIT, "the HTTP/1.1 answer", tls.read_to_end(&mut answer)).await.expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("data: [DONE]"), "{answer}");

    let tls = tls_connect(gw.http_addr(), client_config(&[ca.der()], None)).await.expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "h2 when the client offers it");
    let (send, conn) = within(WAIT, "the h2 handshake", h2::client::handshake(tls)).await.expect("h2");
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut send = within(WAIT, "an h2 stream", send.ready()).await.expect("ready");
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("https://localhost:{}/v1/chat/completions", gw.http_addr().port()))
        .header("content-type", "application/json")
        .body(())
        .expect("request");
    let (response, mut out) = send.send_request(request, false).expect("send");
    out.send_data(bytes::Bytes::from(body), true).expect("body");
    let response = within(WAIT, "the h2 response", response).await.expect("response");
    assert_eq!(response.status(), 200);
    let mut data = response.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = within(WAIT, "h2 data", data.data()).await {
        let chunk = chunk.expect("data");
        let _ = data.flow_control().release_capacity(chunk.len());
        text.extend_from_slice(&chunk);
    }
    assert!(String::from_utf8_lossy(&text).ends_with("data: [DONE]\n\n"));
    conn.abort();
}

#[tokio::test]
async fn the_handshake_timeout_covers_the_tls_handshake() {
    use tokio::io::AsyncReadExt;
    let ca = Ca::new("test CA");
    let files = Files::new(&ca.server("server"), None);
    let yaml = files.yaml(false, "30s").replacen("server:\n", "server:\n  handshake_timeout: 300ms\n", 1);
    let gw = Gateway::start(&yaml).await;
    let opened = std::time::Instant::now();
    // No ClientHello at all; and a TLS handshake done, but no HTTP/2 after it.
    let mut silent = within(WAIT, "TCP connect", TcpStream::connect(gw.grpc)).await.expect("connect");
    let mut quiet_tls = tls_connect(gw.grpc, client_config(&[ca.der()], None)).await.expect("TLS handshake");
    let mut buf = [0u8; 64];
    let n = within(WAIT, "the silent connection to close", silent.read(&mut buf)).await;
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let closed = opened.elapsed();
    assert!(closed >= std::time::Duration::from_millis(280), "not before the timeout: {closed:?}");
    // The TLS connection had the same budget, counted from its accept.
    loop {
        match within(WAIT, "the quiet TLS connection to close", quiet_tls.read(&mut buf)).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    let closed = opened.elapsed();
    assert!(closed < std::time::Duration::from_millis(1300), "{closed:?}");
}
