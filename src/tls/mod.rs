//! TLS for listeners: rustls configuration, SNI certificate selection, ALPN policy and handshakes.

mod accept;
pub mod certs;
pub mod selfsigned;

pub use accept::{handshake, HandshakeError, Negotiated};
pub use certs::LoadedCert;

use crate::config::{Findings, ListenerConfig, OnNoAlpn, Protocol, TlsVersion};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// A listener's TLS setup: built in full before it is used, swapped whole on reload.
#[derive(Debug)]
pub struct TlsServer {
    pub config: Arc<rustls::ServerConfig>,
    pub certs: Vec<LoadedCert>,
    /// ALPN ids we offer, in preference order.
    pub alpn: Vec<Vec<u8>>,
    pub on_no_alpn: OnNoAlpn,
}

/// Picks a certificate by SNI: exact names first, then `*.domain` wildcards, then the default.
#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return Some(self.default.clone());
        };
        let name = name.to_ascii_lowercase();
        if let Some(k) = self.exact.get(&name) {
            return Some(k.clone());
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(k) = self.wildcard.get(parent) {
                return Some(k.clone());
            }
        }
        Some(self.default.clone())
    }
}

impl TlsServer {
    /// Loads certificates and builds the rustls configuration for listener `index`.
    /// Every problem is added to `f`; `None` when any of them is an error.
    pub fn build(index: usize, listener: &ListenerConfig, state_dir: &Path, f: &mut Findings) -> Option<TlsServer> {
        let tls = listener.tls.as_ref()?;
        let key = format!("listeners[{index}].tls");
        let mut certs = Vec::new();
        let primary = match (&tls.self_signed, &tls.cert, &tls.key) {
            (Some(names), _, _) => {
                selfsigned::ensure(state_dir, &listener.name, names, &format!("{key}.self_signed"), f)
            }
            (None, Some(c), Some(k)) => Some((c.clone(), k.clone())),
            _ => None, // reported by Config::validate
        };
        let mut ok = true;
        match primary.and_then(|(c, k)| certs::load_pair(&c, &k, &key, f)) {
            Some(c) => certs.push(c),
            None => ok = false,
        }
        for (i, pair) in tls.certificates.iter().enumerate() {
            match certs::load_pair(&pair.cert, &pair.key, &format!("{key}.certificates[{i}]"), f) {
                Some(c) => certs.push(c),
                None => ok = false,
            }
        }
        if !ok {
            return None;
        }
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        // Later certificates do not override names claimed by earlier ones: first listed wins.
        for c in &certs {
            for n in &c.names {
                match n.strip_prefix("*.") {
                    Some(parent) => {
                        wildcard.entry(parent.to_string()).or_insert_with(|| c.key.clone());
                    }
                    None => {
                        exact.entry(n.clone()).or_insert_with(|| c.key.clone());
                    }
                }
            }
        }
        let resolver = SniResolver {
            exact,
            wildcard,
            default: certs[0].key.clone(),
        };
        let versions: &[&'static rustls::SupportedProtocolVersion] = match tls.min_version {
            TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::V1_3 => &[&rustls::version::TLS13],
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = match rustls::ServerConfig::builder_with_provider(provider).with_protocol_versions(versions) {
            Ok(b) => b,
            Err(e) => {
                f.error(
                    format!("{key}.min_version"),
                    format!("cannot build TLS configuration: {e}"),
                    "",
                );
                return None;
            }
        };
        let mut config = builder.with_no_client_auth().with_cert_resolver(Arc::new(resolver));
        let alpn: Vec<Vec<u8>> = listener
            .effective_protocols()
            .iter()
            .filter(|p| matches!(p, Protocol::H2 | Protocol::Http11))
            .map(|p| p.as_str().as_bytes().to_vec())
            .collect();
        config.alpn_protocols = alpn.clone();
        if tls.session_tickets {
            match rustls::crypto::aws_lc_rs::Ticketer::new() {
                Ok(t) => config.ticketer = t,
                Err(e) => f.warning(
                    format!("{key}.session_tickets"),
                    format!("session tickets unavailable: {e}"),
                    "",
                ),
            }
        } else {
            config.send_tls13_tickets = 0;
        }
        config.session_storage = if tls.session_cache > 0 {
            rustls::server::ServerSessionMemoryCache::new(tls.session_cache)
        } else {
            Arc::new(rustls::server::NoServerSessionStorage {})
        };
        // Record nothing the client cannot already see; keep rustls from buffering unbounded early data.
        config.max_early_data_size = 0;
        // A listener that does not speak HTTP/1.1 has nothing to offer a client without ALPN
        // (RFC 9113 §3.2 requires ALPN for h2 over TLS): such clients get the alert.
        let on_no_alpn = if alpn.iter().any(|p| p == b"http/1.1") {
            listener.on_no_alpn
        } else {
            OnNoAlpn::Reject
        };
        Some(TlsServer {
            config: Arc::new(config),
            certs,
            alpn,
            on_no_alpn,
        })
    }
}
