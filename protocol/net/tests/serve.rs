//! The serving loop's promises to a handler, over real TCP sockets: a request runs to its
//! end even when its stream goes away, and a handler that panics ends its own stream only.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use payswitch_net::serve::{serve_tcp, Handler, Limits, Reply, ServeStats};
use payswitch_protocol::{Message, Mti};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Echoes each request after the delay its STAN (11) names in milliseconds; STAN 666666
/// panics. Counts the requests whose handling ran to its end.
#[derive(Default)]
struct Delayed {
    completed: AtomicUsize,
}

impl Handler for Delayed {
    async fn handle(self: Arc<Self>, frame: Bytes) -> Reply {
        let message = Message::decode(frame).expect("the tests send valid messages");
        let stan = std::str::from_utf8(message.get(11).unwrap_or(b"0")).unwrap_or("0");
        if stan == "666666" {
            panic!("a handler bug");
        }
        let delay: u64 = stan.parse().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        self.completed.fetch_add(1, Ordering::SeqCst);
        Reply::Message(message)
    }
}

fn frame(stan: &str) -> BytesMut {
    let message = Message::builder(Mti::AUTHORIZATION_REQUEST)
        .set(11, stan.as_bytes())
        .expect("a six-digit STAN")
        .build();
    let mut out = BytesMut::new();
    message.encode_framed(&mut out).expect("encodes");
    out
}

async fn server() -> (std::net::SocketAddr, Arc<Delayed>, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let addr = listener.local_addr().expect("bound");
    let handler = Arc::new(Delayed::default());
    let shutdown = CancellationToken::new();
    tokio::spawn(serve_tcp(
        listener,
        Arc::clone(&handler),
        Limits::default(),
        Arc::new(ServeStats::default()),
        shutdown.clone(),
    ));
    (addr, handler, shutdown)
}

/// Reads one framed answer's STAN, or `None` when the connection ends first.
async fn answer(stream: &mut TcpStream) -> Option<String> {
    let mut header = [0u8; 2];
    stream.read_exact(&mut header).await.ok()?;
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(header))];
    stream.read_exact(&mut body).await.ok()?;
    let message = Message::decode(Bytes::from(body)).ok()?;
    Some(String::from_utf8_lossy(message.get(11)?).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_run_to_their_end_when_their_stream_goes_away() {
    let (addr, handler, shutdown) = server().await;
    let mut stream = TcpStream::connect(addr).await.expect("connects");
    // The slow request is the stream's first (polled by the stream's own task), the quick
    // one the second (a task of its own). The peer resets the connection before either is
    // answered, so writing the quick one's answer fails and the stream ends.
    stream.write_all(&frame("000300")).await.expect("sends");
    stream.write_all(&frame("000020")).await.expect("sends");
    tokio::time::sleep(Duration::from_millis(5)).await;
    stream.set_zero_linger().expect("linger");
    drop(stream);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(handler.completed.load(Ordering::SeqCst), 2);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_panics_ends_its_stream_and_nothing_else() {
    let (addr, handler, shutdown) = server().await;
    for pipelined_behind in [None, Some("000050")] {
        let mut other = TcpStream::connect(addr).await.expect("connects");
        let mut stream = TcpStream::connect(addr).await.expect("connects");
        if let Some(first) = pipelined_behind {
            // The panic happens on a request task of its own, behind one in progress.
            stream.write_all(&frame(first)).await.expect("sends");
        }
        stream.write_all(&frame("666666")).await.expect("sends");
        other.write_all(&frame("000001")).await.expect("sends");
        assert_eq!(answer(&mut other).await.as_deref(), Some("000001"));
        // The panicking stream gets at most the answer before the panic, then its end.
        let mut answers = Vec::new();
        while let Ok(Some(stan)) =
            tokio::time::timeout(Duration::from_secs(2), answer(&mut stream)).await
        {
            answers.push(stan);
        }
        assert!(answers.iter().all(|s| s == "000050"), "{answers:?}");
        // The server goes on.
        let mut fresh = TcpStream::connect(addr).await.expect("connects");
        fresh.write_all(&frame("000002")).await.expect("sends");
        assert_eq!(answer(&mut fresh).await.as_deref(), Some("000002"));
    }
    assert!(handler.completed.load(Ordering::SeqCst) >= 3);
    shutdown.cancel();
}
