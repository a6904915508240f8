//! Loading certificate chains and private keys from PEM files, with errors that say what to fix.

use crate::config::Findings;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Certificates expiring sooner than this are reported as a warning.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// A loaded certificate with what the startup table and SNI selection need.
#[derive(Clone, Debug)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    pub subject: String,
    /// DNS names and IP addresses from the subjectAltName extension (lower-case).
    pub names: Vec<String>,
    pub not_after: SystemTime,
    pub source: String,
}

fn who_am_i() -> String {
    // Without libc we cannot call geteuid; /proc/self/status has it on Linux.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2).unwrap_or("?").to_string())
        })
        .map(|uid| format!("uid {uid}"))
        .unwrap_or_else(|| "the current user".to_string())
}

fn read_file(path: &Path, what: &str, key: &str, f: &mut Findings) -> Option<Vec<u8>> {
    match std::fs::read(path) {
        Ok(b) => Some(b),
        Err(e) => {
            let (problem, fix) = match e.kind() {
                std::io::ErrorKind::NotFound => (
                    format!("{what} file {} does not exist", path.display()),
                    "check the path (relative paths are from the working directory)".to_string(),
                ),
                std::io::ErrorKind::PermissionDenied => (
                    format!(
                        "cannot read {what} file {}: permission denied (running as {})",
                        path.display(),
                        who_am_i()
                    ),
                    "make it readable by this user".to_string(),
                ),
                _ => (
                    format!("cannot read {what} file {}: {e}", path.display()),
                    String::new(),
                ),
            };
            f.error(key, problem, fix);
            None
        }
    }
}

/// Loads and checks one certificate chain and key. Problems go to `f` under `key_path`.
pub fn load_pair(cert_path: &Path, key_path_file: &Path, key_path: &str, f: &mut Findings) -> Option<LoadedCert> {
    let cert_key = format!("{key_path}.cert");
    let key_key = format!("{key_path}.key");
    let cert_pem = read_file(cert_path, "certificate", &cert_key, f);
    let key_pem = read_file(key_path_file, "key", &key_key, f);
    let chain: Option<Vec<CertificateDer<'static>>> =
        cert_pem.and_then(
            |pem| match CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>() {
                Ok(c) if !c.is_empty() => Some(c),
                Ok(_) => {
                    f.error(
                        &cert_key,
                        format!(
                            "{} holds no PEM certificate (no -----BEGIN CERTIFICATE----- block)",
                            cert_path.display()
                        ),
                        "point cert at the PEM certificate chain, leaf first",
                    );
                    None
                }
                Err(e) => {
                    f.error(
                        &cert_key,
                        format!("{} is not valid PEM: {e}", cert_path.display()),
                        "point cert at the PEM certificate chain, leaf first",
                    );
                    None
                }
            },
        );
    let key: Option<PrivateKeyDer<'static>> = key_pem.and_then(|pem| match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(k) => Some(k),
        Err(e) => {
            f.error(
                &key_key,
                format!("{} holds no usable PEM private key ({e})", key_path_file.display()),
                "point key at a PEM private key (PKCS#8, RSA or SEC1 EC)",
            );
            None
        }
    });
    if let Ok(meta) = std::fs::metadata(key_path_file) {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            f.warning(
                &key_key,
                format!(
                    "{} is readable by group or others (mode {:o})",
                    key_path_file.display(),
                    mode & 0o777
                ),
                format!("chmod 600 {}", key_path_file.display()),
            );
        }
    }
    let (chain, key) = (chain?, key?);
    let signer = match rustls::crypto::aws_lc_rs::sign::any_supported_type(&key) {
        Ok(s) => s,
        Err(e) => {
            f.error(
                &key_key,
                format!("{} is not a supported key: {e}", key_path_file.display()),
                "use an RSA (2048+), ECDSA P-256/P-384 or Ed25519 key",
            );
            return None;
        }
    };
    let certified = CertifiedKey::new(chain.clone(), signer);
    if let Err(e) = certified.keys_match() {
        f.error(
            &key_key,
            format!(
                "the key in {} does not belong to the certificate in {} ({e})",
                key_path_file.display(),
                cert_path.display()
            ),
            "use the key the certificate was issued for",
        );
        return None;
    }
    let (subject, names, not_before, not_after) = match describe_leaf(&chain[0]) {
        Ok(d) => d,
        Err(e) => {
            f.error(
                &cert_key,
                format!("cannot parse the first certificate in {}: {e}", cert_path.display()),
                "the file must start with the leaf certificate",
            );
            return None;
        }
    };
    let now = SystemTime::now();
    if not_after <= now {
        f.error(
            &cert_key,
            format!(
                "certificate {subject} in {} expired on {}",
                cert_path.display(),
                httpdate::fmt_http_date(not_after)
            ),
            "renew it",
        );
    } else if not_before > now {
        f.error(
            &cert_key,
            format!(
                "certificate {subject} in {} is not valid before {}",
                cert_path.display(),
                httpdate::fmt_http_date(not_before)
            ),
            "check the system clock, or use a certificate that is valid now",
        );
    } else if not_after.duration_since(now).unwrap_or_default() < EXPIRY_WARNING {
        f.warning(
            &cert_key,
            format!(
                "certificate {subject} in {} expires on {}",
                cert_path.display(),
                httpdate::fmt_http_date(not_after)
            ),
            "renew it soon",
        );
    }
    check_chain(&chain, cert_path, &cert_key, f);
    Some(LoadedCert {
        key: Arc::new(certified),
        subject,
        names,
        not_after,
        source: cert_path.display().to_string(),
    })
}

/// Warns when the chain's last certificate is not self-issued and its issuer is not in the file:
/// clients without that intermediate cached will fail to validate.
fn check_chain(chain: &[CertificateDer<'_>], cert_path: &Path, key: &str, f: &mut Findings) {
    use x509_parser::prelude::*;
    let parsed: Vec<_> = chain
        .iter()
        .filter_map(|c| X509Certificate::from_der(c).ok().map(|(_, x)| x))
        .collect();
    for pair in parsed.windows(2) {
        if pair[0].issuer() != pair[1].subject() {
            f.warning(
                key,
                format!(
                    "in {}, certificate {} is followed by {}, which is not its issuer {}",
                    cert_path.display(),
                    pair[0].subject(),
                    pair[1].subject(),
                    pair[0].issuer()
                ),
                "order the file leaf first, then each issuer",
            );
        }
    }
    if let Some(last) = parsed.last() {
        // A leaf signed directly by a root needs nothing more, but that is rare in public PKI;
        // a missing intermediate is the most common cause of "works in Chrome, fails in curl".
        if last.issuer() != last.subject() && parsed.len() == 1 {
            f.warning(
                key,
                format!("{} holds only the leaf, issued by {}", cert_path.display(), last.issuer()),
                "if that issuer is an intermediate CA, append it to the file, or clients that do not cache it will fail to validate the chain",
            );
        }
    }
}

/// Subject, SAN names and validity of a DER certificate.
pub fn describe_leaf(der: &CertificateDer<'_>) -> Result<(String, Vec<String>, SystemTime, SystemTime), String> {
    use x509_parser::prelude::*;
    let (_, x) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.to_ascii_lowercase()),
                GeneralName::IPAddress(ip) => {
                    let ip = match ip.len() {
                        4 => <[u8; 4]>::try_from(*ip)
                            .ok()
                            .map(|b| std::net::IpAddr::from(b).to_string()),
                        16 => <[u8; 16]>::try_from(*ip)
                            .ok()
                            .map(|b| std::net::IpAddr::from(b).to_string()),
                        _ => None,
                    };
                    names.extend(ip);
                }
                _ => {}
            }
        }
    }
    let to_system = |t: ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    let subject = x.subject().to_string();
    let subject = if subject.is_empty() {
        names.first().cloned().unwrap_or_default()
    } else {
        subject
    };
    Ok((
        subject,
        names,
        to_system(x.validity().not_before),
        to_system(x.validity().not_after),
    ))
}
