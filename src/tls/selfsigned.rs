//! Self-signed certificates for development, kept in the state directory and reused across runs.

use crate::config::Findings;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How long a generated certificate is valid. Short enough that a leaked development key ages out.
const VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Regenerate when less than this remains, so a long-running dev box never serves an expired cert.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// Paths of a listener's self-signed certificate and key.
pub fn paths(state_dir: &Path, listener: &str) -> (PathBuf, PathBuf) {
    let safe: String = listener
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let dir = state_dir.join("self-signed");
    (dir.join(format!("{safe}.crt")), dir.join(format!("{safe}.key")))
}

/// Returns the certificate and key paths for `names`, creating them if missing, for other names,
/// or close to expiry. Problems go to `f` under `key`.
pub fn ensure(
    state_dir: &Path,
    listener: &str,
    names: &[String],
    key: &str,
    f: &mut Findings,
) -> Option<(PathBuf, PathBuf)> {
    let (cert_path, key_path) = paths(state_dir, listener);
    if reusable(&cert_path, &key_path, names) {
        return Some((cert_path, key_path));
    }
    match generate(&cert_path, &key_path, names) {
        Ok(()) => Some((cert_path, key_path)),
        Err(e) => {
            f.error(
                key,
                format!("cannot write a self-signed certificate to {}: {e}", cert_path.display()),
                "make server.state_dir writable, or set GATEHOUSE_STATE_DIR to a writable directory",
            );
            None
        }
    }
}

fn reusable(cert_path: &Path, key_path: &Path, names: &[String]) -> bool {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    if !key_path.exists() {
        return false;
    }
    let Ok(der) = CertificateDer::from_pem_file(cert_path) else {
        return false;
    };
    let Ok((_, mut have, _, not_after)) = super::certs::describe_leaf(&der) else {
        return false;
    };
    let mut want: Vec<String> = names.iter().map(|n| normalise(n)).collect();
    have.sort();
    want.sort();
    let fresh = not_after
        .duration_since(SystemTime::now())
        .map(|d| d > RENEW_BEFORE)
        .unwrap_or(false);
    have == want && fresh
}

fn normalise(name: &str) -> String {
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => name.to_ascii_lowercase(),
    }
}

fn generate(cert_path: &Path, key_path: &Path, names: &[String]) -> Result<(), String> {
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(|e| e.to_string())?;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + VALIDITY;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(
        rcgen::DnType::CommonName,
        names.first().cloned().unwrap_or_else(|| "gatehouse".into()),
    );
    dn.push(rcgen::DnType::OrganizationName, "gatehouse self-signed (development)");
    params.distinguished_name = dn;
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let dir = cert_path.parent().ok_or("no parent directory")?;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    write_private(key_path, key.serialize_pem().as_bytes()).map_err(|e| e.to_string())?;
    std::fs::write(cert_path, cert.pem()).map_err(|e| e.to_string())?;
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("key.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}
