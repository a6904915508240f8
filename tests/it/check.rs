//! `gatehouse check` on broken configurations and certificates: every problem at once, each with
//! its key path and a fix; errors exit 78, warnings alone exit 0; nothing is bound.

use crate::common::{write_key, Pki};
use std::path::{Path, PathBuf};
use std::process::Command;

fn check(cfg: &Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["check", "-c"])
        .arg(cfg)
        .output()
        .unwrap();
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    assert!(!text.contains("panicked"), "check panicked:\n{text}");
    (out.status.code(), text)
}

/// A leaf whose validity window and key the caller chooses; returns (cert path, key path).
fn leaf_valid(
    pki: &Pki,
    stem: &str,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.not_before = not_before;
    params.not_after = not_after;
    let cert_pem = pki.sign(params, &key);
    let dir = pki.dir.path();
    let cert = dir.join(format!("{stem}.crt"));
    let keyp = dir.join(format!("{stem}.key"));
    std::fs::write(&cert, format!("{cert_pem}{}", pki.ca_pem)).unwrap();
    write_key(&keyp, &key.serialize_pem());
    (cert, keyp)
}

fn tls_listener(i: usize, cert: impl AsRef<Path>, key: impl AsRef<Path>) -> String {
    format!(
        "[[listeners]]\nname = \"l{i}\"\naddress = \"127.0.0.1:{}\"\n[listeners.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        20000 + i,
        cert.as_ref().display(),
        key.as_ref().display()
    )
}

#[test]
fn broken_certificates_are_all_reported_with_key_paths_and_exit_78() {
    let pki = Pki::new();
    let now = time::OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    let (expired_c, expired_k) = leaf_valid(&pki, "expired", now - day * 30, now - day);
    let (future_c, future_k) = leaf_valid(&pki, "future", now + day, now + day * 90);
    let (good_c, _) = pki.leaf("good", &["localhost"]);
    let (_, other_k) = pki.leaf("other", &["localhost"]);
    let not_pem = pki.dir.path().join("not-pem.crt");
    std::fs::write(&not_pem, "this is not a certificate\n").unwrap();
    let missing = pki.dir.path().join("missing.key");

    let mut cfg = String::new();
    cfg += &tls_listener(0, &expired_c, &expired_k);
    cfg += &tls_listener(1, &future_c, &future_k);
    cfg += &tls_listener(2, &good_c, &other_k); // key of another certificate
    cfg += &tls_listener(3, &not_pem, &other_k);
    cfg += &tls_listener(4, &good_c, &missing);
    cfg += "[admin]\naddress = \"\"\n";
    let path = pki.dir.path().join("broken.toml");
    std::fs::write(&path, cfg).unwrap();

    let (code, out) = check(&path);
    assert_eq!(code, Some(78), "{out}");
    for (key, needle) in [
        ("listeners[0].tls.cert", "expired on"),
        ("listeners[1].tls.cert", "is not valid before"),
        ("listeners[2].tls.key", "does not belong to the certificate"),
        ("listeners[3].tls.cert", "holds no PEM certificate"),
        ("listeners[4].tls.key", "does not exist"),
    ] {
        let line = out
            .lines()
            .find(|l| l.contains(key) && l.contains(needle))
            .unwrap_or_else(|| panic!("no finding for {key} saying `{needle}` in:\n{out}"));
        assert!(!line.trim().is_empty());
    }
}

#[test]
fn certificate_warnings_name_the_fix_and_do_not_fail_the_check() {
    let pki = Pki::new();
    let now = time::OffsetDateTime::now_utc();
    let day = time::Duration::days(1);
    // Expires in 5 days: a warning, not an error.
    let (soon_c, soon_k) = leaf_valid(&pki, "soon", now - day, now + day * 5);
    // A key readable by others.
    let (open_c, open_k) = pki.leaf("open", &["localhost"]);
    std::fs::set_permissions(&open_k, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    // A chain file holding only the leaf, whose issuer (our CA) is not in it.
    let (lonely_c, lonely_k) = pki.leaf("lonely", &["localhost"]);
    let leaf_only = std::fs::read_to_string(&lonely_c).unwrap().replace(&pki.ca_pem, "");
    std::fs::write(&lonely_c, leaf_only).unwrap();

    let mut cfg = String::new();
    cfg += &tls_listener(0, &soon_c, &soon_k);
    cfg += &tls_listener(1, &open_c, &open_k);
    cfg += &tls_listener(2, &lonely_c, &lonely_k);
    cfg += "[admin]\naddress = \"\"\n";
    let path = pki.dir.path().join("warnings.toml");
    std::fs::write(&path, cfg).unwrap();

    let (code, out) = check(&path);
    assert_eq!(code, Some(0), "warnings alone must not fail the check:\n{out}");
    for (key, needle, fix) in [
        ("listeners[0].tls.cert", "expires on", "renew"),
        ("listeners[1].tls.key", "readable by group or others", "chmod 600"),
        ("listeners[2].tls.cert", "holds only the leaf", "append"),
    ] {
        assert!(
            out.lines().any(|l| l.contains(key) && l.contains(needle)),
            "no warning for {key} saying `{needle}` in:\n{out}"
        );
        assert!(out.contains(fix), "the fix `{fix}` is not given in:\n{out}");
    }
}

#[test]
fn duplicate_listeners_and_bad_values_are_reported_together_and_nothing_is_bound() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    drop(taken);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dup.toml");
    std::fs::write(
        &path,
        format!(
            "[admin]\naddress = \"\"\n\
             [[listeners]]\nname = \"web\"\naddress = \"{addr}\"\n\
             [[listeners]]\nname = \"web\"\naddress = \"{addr}\"\n\
             [limits]\nmax_body_bytes = \"lots\"\n"
        ),
    )
    .unwrap();
    let (code, out) = check(&path);
    assert_eq!(code, Some(78), "{out}");
    assert!(out.contains("max_body_bytes"), "{out}");
    std::fs::write(
        &path,
        format!(
            "[admin]\naddress = \"\"\n\
             [[listeners]]\nname = \"web\"\naddress = \"{addr}\"\n\
             [[listeners]]\nname = \"web\"\naddress = \"{addr}\"\n"
        ),
    )
    .unwrap();
    let (code, out) = check(&path);
    assert_eq!(code, Some(78), "{out}");
    assert!(
        out.contains("listeners[1].name") && out.contains("used by an earlier listener"),
        "{out}"
    );
    assert!(out.contains("listeners[1].address"), "{out}");
    // `check` bound nothing: the address is still free.
    std::net::TcpListener::bind(addr).expect("check must not bind listener addresses");
}
