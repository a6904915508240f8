//! The server side of one TLS handshake, with the listener's ALPN policy applied.

use super::TlsServer;
use crate::config::OnNoAlpn;
use crate::conn::TlsSummary;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::server::TlsStream;

/// Why a handshake did not complete; `result` is the `gatehouse_tls_handshakes_total` label.
#[derive(Debug)]
pub struct HandshakeError {
    pub result: &'static str,
    pub detail: String,
    pub offered_alpn: Vec<String>,
    pub sni: Option<String>,
}

/// What a completed handshake settled on.
#[derive(Debug)]
pub struct Negotiated {
    pub summary: TlsSummary,
    /// The client sent no ALPN extension at all.
    pub client_offered_no_alpn: bool,
    pub offered_alpn: Vec<String>,
    /// The cipher suites the client offered, in its order (for the `tls` debug switch).
    pub offered_ciphers: Vec<String>,
    pub resumed: bool,
}

/// TLS alert record: fatal `no_application_protocol` (RFC 7301 §3.2), sent before any
/// ServerHello, so it is a plaintext record.
const NO_APPLICATION_PROTOCOL_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x78];

/// Runs the handshake within `timeout`.
pub async fn handshake<IO>(
    mut io: IO,
    tls: &TlsServer,
    timeout: Duration,
) -> Result<(TlsStream<IO>, Negotiated), HandshakeError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let timed_out = |offered_alpn: Vec<String>, sni: Option<String>| HandshakeError {
        result: "timeout",
        detail: format!("handshake not finished within {timeout:?}"),
        offered_alpn,
        sni,
    };
    // Drive rustls' Acceptor by hand (rather than tokio-rustls' LazyConfigAcceptor) so that we keep
    // the socket and can answer a client that offered no ALPN with the alert ourselves.
    let mut acceptor = rustls::server::Acceptor::default();
    let mut buf = vec![0u8; 4096];
    let accepted = loop {
        let n = match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
            Err(_) => return Err(timed_out(Vec::new(), None)),
            Ok(Ok(0)) => return Err(failed("client closed before sending a ClientHello".into())),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(failed(format!("reading ClientHello: {e}"))),
        };
        let mut slice = &buf[..n];
        while !slice.is_empty() {
            if let Err(e) = acceptor.read_tls(&mut slice) {
                return Err(failed(format!("reading ClientHello: {e}")));
            }
        }
        match acceptor.accept() {
            Ok(Some(a)) => break a,
            Ok(None) => continue,
            Err((e, mut alert)) => {
                let mut out = Vec::new();
                let _ = alert.write_all(&mut out);
                let _ = io.write_all(&out).await;
                return Err(failed(format!("bad ClientHello: {e}")));
            }
        }
    };
    let hello = accepted.client_hello();
    let sni = hello.server_name().map(str::to_string);
    let offered_ciphers: Vec<String> = hello
        .cipher_suites()
        .iter()
        .map(|c| c.as_str().map_or_else(|| format!("{c:?}"), str::to_string))
        .collect();
    let offered: Option<Vec<Vec<u8>>> = hello.alpn().map(|it| it.map(<[u8]>::to_vec).collect());
    let offered_alpn: Vec<String> = offered
        .iter()
        .flatten()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    match &offered {
        None if tls.on_no_alpn == OnNoAlpn::Reject => {
            let _ = io.write_all(&NO_APPLICATION_PROTOCOL_ALERT).await;
            let _ = io.shutdown().await;
            return Err(HandshakeError {
                result: "no_alpn_rejected",
                detail: "client offered no ALPN and on_no_alpn = \"reject\"".into(),
                offered_alpn,
                sni,
            });
        }
        Some(list) if !list.iter().any(|p| tls.alpn.contains(p)) => {
            // rustls itself answers with the no_application_protocol alert below.
            let stream = tokio_rustls::StartHandshake::from_parts(accepted, io).into_stream(tls.config.clone());
            let _ = tokio::time::timeout_at(deadline, stream).await;
            let ours: Vec<_> = tls
                .alpn
                .iter()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect();
            return Err(HandshakeError {
                result: "no_common_protocol",
                detail: format!("client offered ALPN {offered_alpn:?}, this listener speaks {ours:?}"),
                offered_alpn,
                sni,
            });
        }
        _ => {}
    }
    let stream = tokio_rustls::StartHandshake::from_parts(accepted, io).into_stream(tls.config.clone());
    let stream = match tokio::time::timeout_at(deadline, stream).await {
        Err(_) => return Err(timed_out(offered_alpn, sni)),
        Ok(Err(e)) => {
            return Err(HandshakeError {
                result: "failed",
                detail: e.to_string(),
                offered_alpn,
                sni,
            })
        }
        Ok(Ok(s)) => s,
    };
    let conn = stream.get_ref().1;
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "1.2",
        _ => "other",
    };
    let summary = TlsSummary {
        version,
        alpn: conn.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned()),
        sni: sni.clone(),
        cipher: conn
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .unwrap_or("unknown")
            .to_string(),
    };
    let resumed = matches!(conn.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
    Ok((
        stream,
        Negotiated {
            summary,
            client_offered_no_alpn: offered.is_none(),
            offered_alpn,
            offered_ciphers,
            resumed,
        },
    ))
}

fn failed(detail: String) -> HandshakeError {
    HandshakeError {
        result: "failed",
        detail,
        offered_alpn: Vec::new(),
        sni: None,
    }
}
