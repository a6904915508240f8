//! Debug switches: detailed events that can be turned on at run time, for one listener or one client.

use arc_swap::ArcSwap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// A kind of detailed event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Switch {
    /// TLS handshake details: offered and chosen ALPN, version, cipher, SNI, resumption, failures.
    Tls,
    /// Every connection open, state transition (`idle -> busy`...) and close.
    Conn,
    /// Every accepted and refused connection, and every failed accept.
    Accept,
    /// Every HTTP/2 frame head in both directions: type, flags, stream, length (and error code).
    H2Frames,
    /// Every HTTP/1.1 request and response header block with its size, sensitive values redacted
    /// per `[log]`.
    H1Headers,
    /// Every reload: its trigger, what it changed or why it was refused, and how long each stage
    /// took. Process-wide, so the `listener` and `peer` narrowing does not apply to it.
    Reload,
}

impl Switch {
    pub const ALL: [Switch; 6] = [
        Switch::Tls,
        Switch::Conn,
        Switch::Accept,
        Switch::H2Frames,
        Switch::H1Headers,
        Switch::Reload,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Switch::Tls => "tls",
            Switch::Conn => "conn",
            Switch::Accept => "accept",
            Switch::H2Frames => "h2_frames",
            Switch::H1Headers => "h1_headers",
            Switch::Reload => "reload",
        }
    }
    pub fn parse(s: &str) -> Option<Switch> {
        Switch::ALL.into_iter().find(|x| x.as_str() == s)
    }
    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A client address or CIDR block, like `203.0.113.7/32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerFilter {
    net: IpAddr,
    prefix: u8,
}

impl PeerFilter {
    pub fn parse(s: &str) -> Result<PeerFilter, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = ip.trim().parse().map_err(|_| format!("`{s}` is not an IP address"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}` has a bad prefix length"))?,
            None => max,
        };
        Ok(PeerFilter { net, prefix })
    }

    pub fn matches(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.prefix))
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.prefix))
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for PeerFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// The switches in force: which events, narrowed to a listener and/or a client block.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SwitchSet {
    bits: u8,
    pub listener: Option<String>,
    pub peer: Option<PeerFilter>,
}

impl SwitchSet {
    pub fn new(switches: &[Switch], listener: Option<String>, peer: Option<PeerFilter>) -> Self {
        SwitchSet {
            bits: switches.iter().fold(0, |b, s| b | s.bit()),
            listener,
            peer,
        }
    }
    pub fn switches(&self) -> Vec<Switch> {
        Switch::ALL.into_iter().filter(|s| self.bits & s.bit() != 0).collect()
    }
}

/// The live switch set, replaceable at run time. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Switches(Arc<Live>);

#[derive(Debug, Default)]
struct Live {
    set: ArcSwap<SwitchSet>,
    /// The set's switches alone, for the hot paths' "is anything on?" (a request asks four times;
    /// each `ArcSwap` load costs about sixty instructions, this one load a few). Written after the
    /// set, so a switch is never seen on before its filters are.
    bits: AtomicU8,
}

impl Switches {
    pub fn new(set: SwitchSet) -> Self {
        let bits = AtomicU8::new(set.bits);
        Switches(Arc::new(Live {
            set: ArcSwap::from_pointee(set),
            bits,
        }))
    }
    pub fn replace(&self, set: SwitchSet) {
        let bits = set.bits;
        self.0.set.store(Arc::new(set));
        self.0.bits.store(bits, Ordering::Release);
    }
    pub fn current(&self) -> SwitchSet {
        (**self.0.set.load()).clone()
    }
    /// Whether `switch` is on for this listener and peer: lets hot paths skip per-item work.
    /// Inlined: the usual answer (the switch is off) is one load and a test, where a call cost
    /// a request about a hundred instructions over its four asks (callgrind).
    #[inline]
    pub fn enabled(&self, switch: Switch, listener: &str, peer: SocketAddr) -> bool {
        self.0.bits.load(Ordering::Acquire) & switch.bit() != 0 && self.filters_match(switch, listener, peer)
    }
    /// The rest of [`Switches::enabled`], once the switch is on somewhere.
    #[inline(never)]
    fn filters_match(&self, switch: Switch, listener: &str, peer: SocketAddr) -> bool {
        let set = self.0.set.load();
        set.bits & switch.bit() != 0
            && set.listener.as_deref().is_none_or(|l| l == listener)
            && set.peer.is_none_or(|p| p.matches(peer.ip()))
    }
    /// Emits `message()` as an info event with a `switch` field when `switch` is on for this
    /// listener and peer. The message is only built when it will be written.
    pub fn event(&self, switch: Switch, listener: &str, peer: SocketAddr, message: impl FnOnce() -> String) {
        if !self.enabled(switch, listener, peer) {
            return;
        }
        tracing::info!(switch = switch.as_str(), listener, peer = %peer, "{}", message());
    }

    /// Like [`Switches::event`] for an event with no client address (a failed accept). A peer
    /// filter cannot match it, so it is only written when no peer filter is set.
    pub fn listener_event(&self, switch: Switch, listener: &str, message: impl FnOnce() -> String) {
        if self.0.bits.load(Ordering::Acquire) & switch.bit() == 0 {
            return;
        }
        let set = self.0.set.load();
        if set.bits & switch.bit() == 0 || set.listener.as_deref().is_some_and(|l| l != listener) || set.peer.is_some()
        {
            return;
        }
        tracing::info!(switch = switch.as_str(), listener, "{}", message());
    }

    /// Emits a process-wide event (a reload) when `switch` is on. Such an event has neither a
    /// listener nor a client, and a narrowing chosen to watch one client must not hide it.
    pub fn process_event(&self, switch: Switch, message: impl FnOnce() -> String) {
        if self.0.bits.load(Ordering::Acquire) & switch.bit() == 0 {
            return;
        }
        tracing::info!(switch = switch.as_str(), "{}", message());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_filters_match_cidr_blocks() {
        let f = PeerFilter::parse("10.1.0.0/16").unwrap();
        assert!(f.matches("10.1.2.3".parse().unwrap()));
        assert!(!f.matches("10.2.0.1".parse().unwrap()));
        assert!(f.matches("::ffff:10.1.9.9".parse().unwrap()));
        assert!(PeerFilter::parse("127.0.0.1")
            .unwrap()
            .matches("127.0.0.1".parse().unwrap()));
        assert!(PeerFilter::parse("1.2.3.4/33").is_err());
        assert!(PeerFilter::parse("::1/128").unwrap().matches("::1".parse().unwrap()));
    }
}
