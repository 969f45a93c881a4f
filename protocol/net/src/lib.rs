//! The I/O edge of the wire contract, shared by the switch (`engine`) and the load tools
//! (`loadtest`), so both speak exactly the same QUIC and TCP.
//!
//! `payswitch-protocol` stays sans-IO; this crate puts it on sockets:
//! - [`tls`]: TLS 1.3 identities (PEM files or self-signed) and client trust, ALPN `iso8583`.
//! - [`quic`]: quinn endpoints with the transport limits of the switch.
//! - [`framed`]: reading whole frames from any async byte stream, writing framed messages.
//! - [`serve`]: the server loop of one stream or TCP connection — frames in, a
//!   [`serve::Handler`] per frame, responses out in completion order — and the QUIC and TCP
//!   accept loops around it, with connection and in-flight limits.

pub mod framed;
pub mod quic;
pub mod serve;
pub mod tls;

use thiserror::Error;

pub use framed::{FrameReader, ReadError};
pub use serve::{Handler, Limits, Reply, ServeStats};
pub use tls::{ClientTrust, TlsIdentity, ALPN};

/// Errors setting up endpoints.
#[derive(Debug, Error)]
pub enum NetError {
    /// Certificates, keys or TLS configuration.
    #[error("tls: {0}")]
    Tls(String),
    /// Binding or configuring a socket.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A QUIC connection could not be set up.
    #[error("quic connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The QUIC handshake or connection failed.
    #[error("quic connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
}

/// QUIC application error codes the switch closes streams and connections with.
pub mod codes {
    /// A frame that cannot be answered: not an ISO 8583 message at all.
    pub const GARBAGE_FRAME: u32 = 0x10;
    /// A frame header announcing more than the configured maximum, or zero bytes.
    pub const BAD_FRAME_LENGTH: u32 = 0x11;
    /// A handler failed: the stream cannot be answered in order any more.
    pub const INTERNAL: u32 = 0x12;
    /// The stream stalled: a frame begun and not finished, or answers not taken, within
    /// the stall timeout.
    pub const STALLED: u32 = 0x13;
    /// The server is shutting down.
    pub const SHUTDOWN: u32 = 0x20;
    /// Normal close by a client.
    pub const DONE: u32 = 0;
}
