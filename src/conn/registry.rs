//! The live connection table: every open connection's id, state and counters.
//!
//! The admin view, the `gatehouse_connections_open` gauge and drain all read this one table.
//! Per-request updates touch only atomics in the connection's own `ConnInfo`; the table's locks
//! are taken once when a connection opens and once when it closes.

use super::{ConnState, Protocol};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime};

/// What one connection is doing, shared between its task, its requests and the registry.
#[derive(Debug)]
pub struct ConnInfo {
    pub id: u64,
    pub listener: Arc<str>,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub opened: Instant,
    pub opened_wall: SystemTime,
    state: AtomicU8,
    protocol: AtomicU8,
    tls: OnceLock<TlsSummary>,
    requests: AtomicU64,
    in_flight: AtomicU32,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// Nanoseconds after `opened` when the connection last became idle.
    idle_since: AtomicU64,
    /// Nanoseconds after `opened` (+1, so 0 means none) when the first byte of a request head
    /// arrived on an idle HTTP/1.1 connection; cleared when the head is complete.
    head_started: AtomicU64,
    /// The last read asked of the transport found nothing to read: whoever reads (hyper) is
    /// waiting for the peer, not working through bytes it already holds.
    read_waiting: AtomicBool,
    /// Nanoseconds after `opened` (+1, so 0 means none) since when the transport has refused
    /// writes (the peer's receive window and our send buffer are full); cleared by progress.
    write_blocked_since: AtomicU64,
    /// HTTP/2: responses that handed hyper a frame (or their headers) and were not polled again,
    /// so hyper is waiting on the peer's flow-control window to send more.
    awaiting_peer: AtomicU32,
    /// Nanoseconds after `opened` when a response last began to wait on the peer, or the transport
    /// last accepted bytes while one did: the start of the current stall, if `awaiting_peer > 0`.
    peer_stalled_since: AtomicU64,
    /// The debug switches, for the `conn` switch's state-transition events; unset in tests that
    /// build a bare `ConnInfo`.
    debug: OnceLock<crate::observe::Switches>,
    /// File regions a response body handed to `sendfile` (cleartext HTTP/1.1 only).
    splice: super::sendfile::Splice,
}

/// What the TLS handshake settled on.
#[derive(Clone, Debug)]
pub struct TlsSummary {
    pub version: &'static str,
    pub alpn: Option<String>,
    pub sni: Option<String>,
    pub cipher: String,
}

impl ConnInfo {
    pub fn new(id: u64, listener: Arc<str>, peer: SocketAddr, local: SocketAddr, state: ConnState) -> Self {
        ConnInfo {
            id,
            listener,
            peer,
            local,
            opened: Instant::now(),
            opened_wall: SystemTime::now(),
            state: AtomicU8::new(state as u8),
            protocol: AtomicU8::new(Protocol::Unknown as u8),
            tls: OnceLock::new(),
            requests: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            read_waiting: AtomicBool::new(false),
            write_blocked_since: AtomicU64::new(0),
            awaiting_peer: AtomicU32::new(0),
            peer_stalled_since: AtomicU64::new(0),
            debug: OnceLock::new(),
            splice: Default::default(),
        }
    }

    /// Reports every state transition of this connection to the `conn` debug switch.
    pub fn watch_transitions(&self, switches: crate::observe::Switches) {
        let _ = self.debug.set(switches);
    }

    fn transition(&self, from: ConnState, to: ConnState) {
        if from == to {
            return;
        }
        if let Some(d) = self.debug.get() {
            d.event(crate::observe::Switch::Conn, &self.listener, self.peer, || {
                format!("conn {} {} -> {}", self.id, from.as_str(), to.as_str())
            });
        }
    }

    fn nanos_since_open(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.opened).as_nanos()).unwrap_or(u64::MAX)
    }
    /// When the connection last became idle (its open time if it never served a request).
    pub fn idle_since(&self) -> Instant {
        self.opened + std::time::Duration::from_nanos(self.idle_since.load(Relaxed))
    }
    /// When the head of a not-yet-complete HTTP/1.1 request started arriving.
    pub fn head_started(&self) -> Option<Instant> {
        match self.head_started.load(Relaxed) {
            0 => None,
            n => Some(self.opened + std::time::Duration::from_nanos(n - 1)),
        }
    }
    /// Bytes arrived: on an idle connection they start a request head.
    pub fn note_read(&self) {
        if self.head_started.load(Relaxed) == 0 && self.state() == ConnState::Idle {
            let n = self.nanos_since_open(Instant::now()).saturating_add(1);
            self.head_started.store(n, Relaxed);
        }
    }

    /// Records whether the last read of the transport found nothing (`Pending`).
    pub fn note_read_waiting(&self, waiting: bool) {
        if self.read_waiting.load(Relaxed) != waiting {
            self.read_waiting.store(waiting, Relaxed);
        }
    }

    /// Whether the last read of the transport found nothing to read.
    pub fn read_waiting(&self) -> bool {
        self.read_waiting.load(Relaxed)
    }

    /// The transport refused a write (or a flush): the peer is not taking bytes right now.
    pub fn note_write_blocked(&self) {
        if self.write_blocked_since.load(Relaxed) == 0 {
            let n = self.nanos_since_open(Instant::now()).saturating_add(1);
            self.write_blocked_since.store(n, Relaxed);
        }
    }
    /// The transport accepted bytes. Costs two loads unless a write was blocked or a response
    /// waits on the peer, so the hot path reads no clock.
    pub fn note_write_progress(&self) {
        if self.write_blocked_since.load(Relaxed) != 0 {
            self.write_blocked_since.store(0, Relaxed);
        }
        if self.awaiting_peer.load(Relaxed) > 0 {
            self.peer_stalled_since
                .store(self.nanos_since_open(Instant::now()), Relaxed);
        }
    }
    /// Since when writes have been refused, if they are now.
    pub fn write_blocked_since(&self) -> Option<Instant> {
        match self.write_blocked_since.load(Relaxed) {
            0 => None,
            n => Some(self.opened + std::time::Duration::from_nanos(n - 1)),
        }
    }
    /// HTTP/2: a response now waits for hyper to send what it was given (the peer's window).
    pub fn peer_wait_started(&self) {
        if self.awaiting_peer.fetch_add(1, Relaxed) == 0 {
            self.peer_stalled_since
                .store(self.nanos_since_open(Instant::now()), Relaxed);
        }
    }
    /// HTTP/2: a response that waited on the peer was polled again, ended or was dropped.
    pub fn peer_wait_ended(&self) {
        let _ = self.awaiting_peer.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
    }
    /// HTTP/2: since when the responses waiting on the peer have seen no bytes accepted, if any waits.
    pub fn peer_stalled_since(&self) -> Option<Instant> {
        if self.awaiting_peer.load(Relaxed) == 0 {
            return None;
        }
        Some(self.opened + std::time::Duration::from_nanos(self.peer_stalled_since.load(Relaxed)))
    }

    pub fn state(&self) -> ConnState {
        ConnState::from_u8(self.state.load(Relaxed))
    }
    /// Moves to `next`; returns the previous state.
    pub fn set_state(&self, next: ConnState) -> ConnState {
        let prev = ConnState::from_u8(self.state.swap(next as u8, Relaxed));
        self.transition(prev, next);
        prev
    }
    pub fn protocol(&self) -> Protocol {
        Protocol::from_u8(self.protocol.load(Relaxed))
    }
    pub fn set_protocol(&self, p: Protocol) {
        self.protocol.store(p as u8, Relaxed);
    }
    /// Where a file response on this connection queues the regions `sendfile` sends, if it may
    /// (cleartext HTTP/1.1; see `conn::sendfile`).
    pub fn sendfile(&self) -> Option<&super::sendfile::Splice> {
        (self.splice.enabled() && self.protocol() == Protocol::Http11).then_some(&self.splice)
    }
    pub(super) fn splice(&self) -> &super::sendfile::Splice {
        &self.splice
    }
    /// Of `bytes_out`, those sent with `sendfile` (file responses on cleartext HTTP/1.1).
    pub fn bytes_sendfile(&self) -> u64 {
        self.splice.sent()
    }
    pub fn tls(&self) -> Option<&TlsSummary> {
        self.tls.get()
    }
    pub fn set_tls(&self, t: TlsSummary) {
        let _ = self.tls.set(t);
    }
    pub fn requests(&self) -> u64 {
        self.requests.load(Relaxed)
    }
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }
    /// A request started: returns its 1-based sequence number on this connection.
    pub fn request_started(&self) -> u64 {
        self.head_started.store(0, Relaxed);
        if self.in_flight.fetch_add(1, Relaxed) == 0 {
            self.set_state_unless_closing(ConnState::Busy);
        }
        self.requests.fetch_add(1, Relaxed) + 1
    }
    /// A request's response finished (or was abandoned) at `now`.
    pub fn request_finished(&self, now: Instant) {
        if self.in_flight.fetch_sub(1, Relaxed) == 1 {
            self.idle_since.store(self.nanos_since_open(now), Relaxed);
            self.set_state_unless_closing(ConnState::Idle);
        }
    }
    fn set_state_unless_closing(&self, next: ConnState) {
        let prev = self
            .state
            .fetch_update(Relaxed, Relaxed, |cur| match ConnState::from_u8(cur) {
                ConnState::Closing | ConnState::Closed => None,
                _ => Some(next as u8),
            });
        if let Ok(prev) = prev {
            self.transition(ConnState::from_u8(prev), next);
        }
    }
    pub fn add_bytes_in(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Relaxed);
    }
    pub fn add_bytes_out(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Relaxed);
    }
    pub fn bytes_in(&self) -> u64 {
        self.bytes_in.load(Relaxed)
    }
    pub fn bytes_out(&self) -> u64 {
        self.bytes_out.load(Relaxed)
    }
}

const SHARDS: usize = 16;

/// Every open connection, by id. Sharded so that workers opening connections rarely contend.
#[derive(Debug)]
pub struct Registry {
    shards: Vec<Mutex<HashMap<u64, Arc<ConnInfo>>>>,
    next_id: AtomicU64,
    open: AtomicU64,
    changed: tokio::sync::Notify,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            next_id: AtomicU64::new(1),
            open: AtomicU64::new(0),
            changed: tokio::sync::Notify::new(),
        }
    }
}

impl Registry {
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Relaxed)
    }

    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnInfo>>> {
        // A poisoned shard only means a panic happened while a map insert ran; the map is intact.
        self.shards[(id as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, info: Arc<ConnInfo>) {
        self.shard(info.id).insert(info.id, info);
        self.open.fetch_add(1, Relaxed);
    }

    pub fn remove(&self, id: u64) {
        if self.shard(id).remove(&id).is_some() {
            self.open.fetch_sub(1, Relaxed);
            self.changed.notify_waiters();
        }
    }

    pub fn len(&self) -> u64 {
        self.open.load(Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A snapshot of every open connection.
    pub fn snapshot(&self) -> Vec<Arc<ConnInfo>> {
        let mut all = Vec::with_capacity(self.len() as usize);
        for s in &self.shards {
            all.extend(s.lock().unwrap_or_else(|p| p.into_inner()).values().cloned());
        }
        all.sort_by_key(|c| c.id);
        all
    }

    /// Resolves once no connection is open.
    pub async fn wait_empty(&self) {
        loop {
            let notified = self.changed.notified();
            if self.is_empty() {
                return;
            }
            notified.await;
        }
    }
}
