//! Connection states, negotiated protocols and close reasons, as named in SPEC.md.

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ConnState {
    /// TLS handshake under way.
    Handshaking = 0,
    /// Open with no request in flight (including a new connection waiting for its first request).
    Idle = 1,
    /// At least one request in flight.
    Busy = 2,
    /// Shutting down: no new requests; in-flight ones finish.
    Closing = 3,
    Closed = 4,
}

impl ConnState {
    pub const ALL: [ConnState; 5] = [
        ConnState::Handshaking,
        ConnState::Idle,
        ConnState::Busy,
        ConnState::Closing,
        ConnState::Closed,
    ];
    pub fn from_u8(v: u8) -> Self {
        match v {
            0 => ConnState::Handshaking,
            1 => ConnState::Idle,
            2 => ConnState::Busy,
            3 => ConnState::Closing,
            _ => ConnState::Closed,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Handshaking => "handshaking",
            ConnState::Idle => "idle",
            ConnState::Busy => "busy",
            ConnState::Closing => "closing",
            ConnState::Closed => "closed",
        }
    }
}

/// The HTTP protocol a connection speaks, once known.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Protocol {
    /// Not decided yet (handshake or preface detection under way).
    Unknown = 0,
    Http11 = 1,
    /// HTTP/2 over TLS.
    H2 = 2,
    /// HTTP/2 over cleartext TCP (prior knowledge or `Upgrade: h2c`).
    H2c = 3,
}

impl Protocol {
    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => Protocol::Http11,
            2 => Protocol::H2,
            3 => Protocol::H2c,
            _ => Protocol::Unknown,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Unknown => "unknown",
            Protocol::Http11 => "http/1.1",
            Protocol::H2 => "h2",
            Protocol::H2c => "h2c",
        }
    }
    pub fn is_h2(self) -> bool {
        matches!(self, Protocol::H2 | Protocol::H2c)
    }
}

/// Why a connection ended: a log field and the `reason` label of `gatehouse_connections_closed_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    ClientClosed,
    HandshakeFailed,
    HandshakeTimeout,
    FirstRequestTimeout,
    HeaderTimeout,
    BodyTimeout,
    WriteTimeout,
    IdleTimeout,
    MaxRequests,
    Shutdown,
    DrainForced,
    ProtocolError,
    Limit,
    IoError,
}

impl CloseReason {
    pub const ALL: [CloseReason; 14] = [
        CloseReason::ClientClosed,
        CloseReason::HandshakeFailed,
        CloseReason::HandshakeTimeout,
        CloseReason::FirstRequestTimeout,
        CloseReason::HeaderTimeout,
        CloseReason::BodyTimeout,
        CloseReason::WriteTimeout,
        CloseReason::IdleTimeout,
        CloseReason::MaxRequests,
        CloseReason::Shutdown,
        CloseReason::DrainForced,
        CloseReason::ProtocolError,
        CloseReason::Limit,
        CloseReason::IoError,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::HandshakeFailed => "handshake_failed",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::FirstRequestTimeout => "first_request_timeout",
            CloseReason::HeaderTimeout => "header_timeout",
            CloseReason::BodyTimeout => "body_timeout",
            CloseReason::WriteTimeout => "write_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::MaxRequests => "max_requests",
            CloseReason::Shutdown => "shutdown",
            CloseReason::DrainForced => "drain_forced",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::Limit => "limit",
            CloseReason::IoError => "io_error",
        }
    }
    /// The `kind` label of `gatehouse_timeouts_total`, when this close is a timeout.
    pub fn timeout_kind(self) -> Option<&'static str> {
        Some(match self {
            CloseReason::HandshakeTimeout => "tls_handshake",
            CloseReason::FirstRequestTimeout => "first_request",
            CloseReason::HeaderTimeout => "header_read",
            CloseReason::BodyTimeout => "body_read",
            CloseReason::WriteTimeout => "write",
            CloseReason::IdleTimeout => "idle",
            _ => return None,
        })
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
