//! quinn endpoints with the switch's transport settings.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{ClientConfig, Endpoint, ServerConfig, TransportConfig, VarInt};

use crate::tls::{self, ClientAuth, ClientTrust, TlsIdentity};
use crate::NetError;

/// Concurrent bidirectional streams a peer may open on one connection. Gateways open one
/// stream per transaction, and a stream's credit comes back to the peer only once its
/// answer has been acknowledged — a round trip after the request is done, longer under
/// load. Under 3x overload on 8 connections 1024 ran out before the connection's in-flight
/// bound (512) could shed, and requests waited in the gateway for credit for seconds
/// (bench/RESULTS.md); 4096 leaves the bound and its quick 91 in charge. What a peer's
/// streams can hold is bounded apart from this: [`MAX_SERVED_STREAMS`] served at once,
/// and [`CONNECTION_RECEIVE_WINDOW`] buffered for the rest.
pub const MAX_CONCURRENT_STREAMS: u32 = 4096;

/// Streams of one connection the server reads and answers at once; the peer's further
/// streams wait in the transport (within its receive window) until one ends. Each served
/// stream holds at most a frame (8 KiB by default) and a task, for at most the stall
/// timeout when it stalls: about 10 MiB per connection at worst.
pub const MAX_SERVED_STREAMS: usize = 1024;

/// Bytes one stream may have sent and the server not yet read: a pipelined stream's few
/// hundred requests in flight over a long round trip.
pub const STREAM_RECEIVE_WINDOW: u32 = 256 * 1024;

/// Bytes one connection may have sent over all its streams and the server not yet read
/// (quinn's default has no bound), and may be sent and not yet acknowledged: what a
/// connection can make the server buffer whatever its streams do.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 2 * 1024 * 1024;

/// A connection idle this long is closed; links send keep-alives well inside it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Keep-alive interval, so idle acquirer links and gateway connections stay open.
pub const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// Idle timeout of links the switch keeps to acquirers: a peer that vanished without
/// closing (killed, network gone) is noticed within this time, the link is marked down and
/// its reversals wait for the next connection. With traffic on the link the acquirer's
/// circuit breaker (`payswitch::breaker`) notices a stall sooner still, from the answers
/// that stop coming.
pub const LINK_IDLE_TIMEOUT: Duration = Duration::from_millis(800);

/// Keep-alive of acquirer links: four per `LINK_IDLE_TIMEOUT`, so a lost packet or two do
/// not take a healthy link down (QUIC never times out sooner than three probe timeouts,
/// so a link with a long round trip gets longer on its own).
pub const LINK_KEEP_ALIVE: Duration = Duration::from_millis(200);

fn transport(idle_timeout: Duration, keep_alive: Duration) -> Arc<TransportConfig> {
    let mut transport = TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_CONCURRENT_STREAMS))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
        .send_window(u64::from(CONNECTION_RECEIVE_WINDOW))
        .keep_alive_interval(Some(keep_alive))
        .max_idle_timeout(Some(
            idle_timeout
                .try_into()
                .expect("idle timeouts here are seconds, far below QUIC's limit"),
        ));
    Arc::new(transport)
}

/// A QUIC server endpoint bound to `addr`.
pub fn server_endpoint(addr: SocketAddr, identity: TlsIdentity) -> Result<Endpoint, NetError> {
    server_endpoint_with(addr, identity, None)
}

/// A QUIC server endpoint bound to `addr` that requires client certificates as
/// `clients` says, when given: a handshake without one is refused.
pub fn server_endpoint_with(
    addr: SocketAddr,
    identity: TlsIdentity,
    clients: Option<&ClientAuth>,
) -> Result<Endpoint, NetError> {
    let config = server_config_with(identity, clients)?;
    Ok(Endpoint::server(config, addr)?)
}

/// The server settings of a gateway endpoint (for a new endpoint, or to swap into one
/// with `Endpoint::set_server_config`).
pub fn server_config_with(
    identity: TlsIdentity,
    clients: Option<&ClientAuth>,
) -> Result<ServerConfig, NetError> {
    let crypto = tls::server_crypto_with(identity, clients)?;
    let mut config = ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport(IDLE_TIMEOUT, KEEP_ALIVE));
    Ok(config)
}

/// A QUIC client endpoint on an ephemeral port, trusting servers as `trust` says.
pub fn client_endpoint(trust: ClientTrust) -> Result<Endpoint, NetError> {
    let bind: SocketAddr = "0.0.0.0:0".parse().expect("literal address");
    client_endpoint_bound(bind, trust)
}

/// A QUIC client endpoint for a switch-to-acquirer link: as `client_endpoint`, with the
/// short `LINK_IDLE_TIMEOUT` so a dead acquirer is noticed quickly.
pub fn link_endpoint(trust: ClientTrust) -> Result<Endpoint, NetError> {
    let bind: SocketAddr = "0.0.0.0:0".parse().expect("literal address");
    client_endpoint_with(bind, trust, transport(LINK_IDLE_TIMEOUT, LINK_KEEP_ALIVE))
}

/// A QUIC client endpoint bound to `bind`.
pub fn client_endpoint_bound(bind: SocketAddr, trust: ClientTrust) -> Result<Endpoint, NetError> {
    client_endpoint_with(bind, trust, transport(IDLE_TIMEOUT, KEEP_ALIVE))
}

/// A QUIC client endpoint on an ephemeral port presenting `identity` as its client
/// certificate (a gateway in front of a switch that requires one).
pub fn client_endpoint_with_identity(
    trust: ClientTrust,
    identity: Option<TlsIdentity>,
) -> Result<Endpoint, NetError> {
    let bind: SocketAddr = "0.0.0.0:0".parse().expect("literal address");
    let crypto = tls::client_crypto_with(trust, identity)?;
    let mut config = ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport(IDLE_TIMEOUT, KEEP_ALIVE));
    let mut endpoint = Endpoint::client(bind)?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

fn client_endpoint_with(
    bind: SocketAddr,
    trust: ClientTrust,
    transport: Arc<TransportConfig>,
) -> Result<Endpoint, NetError> {
    let crypto = tls::client_crypto(trust)?;
    let mut config = ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport);
    let mut endpoint = Endpoint::client(bind)?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Connects to `addr`. `server_name` is checked against the certificate (ignored under
/// `ClientTrust::AcceptAny`).
pub async fn connect(
    endpoint: &Endpoint,
    addr: SocketAddr,
    server_name: &str,
) -> Result<quinn::Connection, NetError> {
    Ok(endpoint.connect(addr, server_name)?.await?)
}
