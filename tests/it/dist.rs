//! The deployment files in dist/: their timeouts cover the drain, their configuration validates.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn dist(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist").join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `Key=value` of a systemd unit file (the last assignment wins, as in systemd).
fn unit_value<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .next_back()
        .map(str::trim)
}

/// A systemd time span as these files write it: "45s", "2min" or bare seconds.
fn systemd_span(v: &str) -> Duration {
    let secs = if let Some(m) = v.strip_suffix("min") {
        m.trim().parse::<u64>().unwrap() * 60
    } else {
        v.trim_end_matches('s').trim().parse::<u64>().unwrap()
    };
    Duration::from_secs(secs)
}

/// The lines of the YAML block scalar `key: |` (indentation removed).
fn yaml_block(yaml: &str, key: &str) -> String {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    let header = lines.next().unwrap_or_else(|| panic!("no `{key}: |` block"));
    let outer = header.len() - header.trim_start().len();
    let body: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > outer)
        .collect();
    let indent = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    body.iter()
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The scalar value of the first `key: value` line.
fn yaml_value<'a>(yaml: &'a str, key: &str) -> &'a str {
    yaml.lines()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no `{key}:`"))
        .trim()
}

#[test]
fn systemd_unit_stops_after_the_default_drain_and_reloads_with_sighup() {
    let unit = dist("gatehouse.service");
    let defaults = gatehouse::config::ShutdownConfig::default();
    let drain = defaults.drain_delay.get() + defaults.drain_timeout.get();
    let stop = systemd_span(unit_value(&unit, "TimeoutStopSec").expect("TimeoutStopSec"));
    assert!(
        stop > drain,
        "TimeoutStopSec {stop:?} must exceed the default drain {drain:?}"
    );
    assert_eq!(unit_value(&unit, "Type"), Some("notify"));
    assert_eq!(unit_value(&unit, "KillSignal"), Some("SIGTERM"));
    assert!(unit_value(&unit, "ExecReload").is_some_and(|v| v.contains("-HUP $MAINPID")));
    assert!(unit_value(&unit, "LimitNOFILE").is_some());
    // The notification socket is AF_UNIX: a filter without it would silently break Type=notify.
    assert!(unit_value(&unit, "RestrictAddressFamilies").is_some_and(|v| v.contains("AF_UNIX")));

    let socket = dist("gatehouse.socket");
    assert_eq!(unit_value(&socket, "Accept"), Some("no"));
    let name = unit_value(&socket, "FileDescriptorName").expect("FileDescriptorName");
    // The example names the listener of the example configuration.
    let config = yaml_block(&dist("kubernetes.yaml"), "gatehouse.toml");
    assert!(config.contains(&format!("name = \"{name}\"")), "{config}");
}

#[test]
fn kubernetes_config_passes_check_and_grace_period_covers_the_drain() {
    let yaml = dist("kubernetes.yaml");
    let text = yaml_block(&yaml, "gatehouse.toml");
    let config = gatehouse::config::load_str(&text).unwrap();
    let drain = config.shutdown.drain_delay.get() + config.shutdown.drain_timeout.get();
    let grace = Duration::from_secs(yaml_value(&yaml, "terminationGracePeriodSeconds").parse().unwrap());
    assert!(
        grace > drain,
        "terminationGracePeriodSeconds {grace:?} must exceed the drain {drain:?}"
    );

    // The probes hit the admin API's endpoints on the configured admin port.
    let admin_port = config.admin.address.rsplit(':').next().unwrap().to_string();
    assert!(
        yaml.contains(&format!("containerPort: {admin_port}")),
        "admin port {admin_port}"
    );
    let readiness = yaml.split("readinessProbe:").nth(1).unwrap();
    assert_eq!(yaml_value(readiness, "path"), "/readyz");
    let liveness = yaml.split("livenessProbe:").nth(1).unwrap();
    assert_eq!(yaml_value(liveness, "path"), "/healthz");

    // `gatehouse check` in a directory laid out like the pod's working directory: the
    // ConfigMap's file and the token Secret's file.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gatehouse.toml"), &text).unwrap();
    crate::common::write_key(&dir.path().join("admin.token"), "a-test-token\n");
    let out = Command::new(env!("CARGO_BIN_EXE_gatehouse"))
        .args(["check", "-c", "gatehouse.toml"])
        .current_dir(dir.path())
        .env("GATEHOUSE_STATE_DIR", dir.path().join("state"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
