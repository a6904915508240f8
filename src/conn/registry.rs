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
    /// The transport's last write did not complete: the peer is not taking response bytes, so
    /// some are still buffered above the socket.
    write_blocked: AtomicBool,
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
            write_blocked: AtomicBool::new(false),
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

    pub fn state(&self) -> ConnState {
        ConnState::from_u8(self.state.load(Relaxed))
    }
    /// Moves to `next`; returns the previous state.
    pub fn set_state(&self, next: ConnState) -> ConnState {
        ConnState::from_u8(self.state.swap(next as u8, Relaxed))
    }
    pub fn protocol(&self) -> Protocol {
        Protocol::from_u8(self.protocol.load(Relaxed))
    }
    pub fn set_protocol(&self, p: Protocol) {
        self.protocol.store(p as u8, Relaxed);
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
    /// A request's response finished (or was abandoned).
    pub fn request_finished(&self) {
        if self.in_flight.fetch_sub(1, Relaxed) == 1 {
            self.idle_since.store(self.nanos_since_open(Instant::now()), Relaxed);
            self.set_state_unless_closing(ConnState::Idle);
        }
    }
    fn set_state_unless_closing(&self, next: ConnState) {
        let _ = self
            .state
            .fetch_update(Relaxed, Relaxed, |cur| match ConnState::from_u8(cur) {
                ConnState::Closing | ConnState::Closed => None,
                _ => Some(next as u8),
            });
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
    pub fn set_write_blocked(&self, blocked: bool) {
        self.write_blocked.store(blocked, Relaxed);
    }
    pub fn write_blocked(&self) -> bool {
        self.write_blocked.load(Relaxed)
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
