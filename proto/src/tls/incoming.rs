//! Incoming connections: the TLS and plaintext accept streams.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tonic::transport::server::Connected;
use tracing::{Instrument, debug, warn};

use super::*;

/// What a handler knows about the connection of a request: find it with
/// [`ConnInfo::of`] (`request.extensions().get::<ConnInfo>()`).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote_addr: Option<SocketAddr>,
    pub local_addr: Option<SocketAddr>,
    /// The client's certificate chain, leaf first; `None` on a plaintext connection.
    pub peer_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

impl ConnInfo {
    /// The connection info of a request served through [`tls_incoming`] or
    /// [`plain_incoming`].
    pub fn of<T>(request: &tonic::Request<T>) -> Option<&ConnInfo> {
        request.extensions().get::<ConnInfo>()
    }
}

/// Options of the TLS acceptor.
#[derive(Debug, Clone)]
pub struct IncomingOptions {
    /// A client that has not finished its handshake by then is dropped.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; further accepted sockets wait.
    pub max_concurrent_handshakes: usize,
    /// Established connections waiting to be picked up by the server.
    pub backlog: usize,
}

impl Default for IncomingOptions {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            max_concurrent_handshakes: 1024,
            backlog: 128,
        }
    }
}

/// An accepted connection with its [`ConnInfo`], so handlers look the caller up the same
/// way whether the listener speaks TLS or (`--insecure`, loopback only) plaintext.
pub struct Conn<S> {
    stream: S,
    info: ConnInfo,
}

/// A server-side TLS connection.
pub type TlsConn = Conn<tokio_rustls::server::TlsStream<TcpStream>>;

/// A plaintext connection (`--insecure`, loopback only): its [`ConnInfo`] has no
/// certificates.
pub type PlainConn = Conn<TcpStream>;

impl<S> Conn<S> {
    pub fn info(&self) -> &ConnInfo {
        &self.info
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Connected for Conn<S> {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Conn<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The stream of established TLS connections for `Server::serve_with_incoming`. Dropping it
/// stops accepting (the listener is closed).
pub struct TlsIncoming {
    rx: mpsc::Receiver<TlsConn>,
    accept_task: tokio::task::JoinHandle<()>,
    local_addr: Option<SocketAddr>,
}

impl TlsIncoming {
    /// The address the listener is bound to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }
}

impl Stream for TlsIncoming {
    type Item = io::Result<TlsConn>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|c| c.map(Ok))
    }
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

/// Accepts TCP connections on `listener` and performs TLS handshakes with the current
/// configuration of `tls`, concurrently (a slow or garbage client never blocks others).
/// Failed handshakes are logged and dropped. Must be called within a tokio runtime.
pub fn tls_incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    options: IncomingOptions,
) -> TlsIncoming {
    let local_addr = listener.local_addr().ok();
    let (tx, rx) = mpsc::channel(options.backlog.max(1));
    let accept_task = tokio::spawn(accept_loop(listener, tls, options, tx));
    TlsIncoming {
        rx,
        accept_task,
        local_addr,
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    options: IncomingOptions,
    tx: mpsc::Sender<TlsConn>,
) {
    let permits = Arc::new(Semaphore::new(options.max_concurrent_handshakes.max(1)));
    loop {
        let permit = tokio::select! {
            _ = tx.closed() => return,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (tcp, remote) = tokio::select! {
            _ = tx.closed() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(error) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    warn!(%error, "accepting a TCP connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let config = tls.current().config.clone();
        let tx = tx.clone();
        let timeout = options.handshake_timeout;
        let span = tracing::info_span!("tls_accept", peer = %remote);
        tokio::spawn(async move {
            let _permit = permit;
            let local_addr = tcp.local_addr().ok();
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let peer_certs = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .map(|c| Arc::new(c.to_vec()));
                    let info = ConnInfo {
                        remote_addr: Some(remote),
                        local_addr,
                        peer_certs,
                    };
                    debug!(%remote, "TLS handshake done");
                    let _ = tx.send(TlsConn { stream, info }).await;
                }
                Ok(Err(error)) if error.kind() == io::ErrorKind::UnexpectedEof => {
                    debug!(%remote, %error, "client closed the connection during the TLS handshake");
                }
                Ok(Err(error)) => warn!(%remote, %error, "TLS handshake failed"),
                Err(_) => warn!(%remote, ?timeout, "TLS handshake timed out"),
            }
        }
        .instrument(span),
        );
    }
}

/// Refuses a plaintext (`--insecure`) listener on anything but a loopback address.
pub fn check_insecure_bind(addr: SocketAddr) -> Result<()> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(TlsError::InsecureNonLoopback { addr })
    }
}

/// Accepted plaintext connections of an `--insecure` loopback listener. Refuses a listener
/// bound to a non-loopback address.
pub fn plain_incoming(listener: TcpListener) -> Result<impl Stream<Item = io::Result<PlainConn>>> {
    let addr = listener
        .local_addr()
        .map_err(|e| TlsError::InvalidAddress {
            address: "listener".into(),
            reason: e.to_string(),
        })?;
    check_insecure_bind(addr)?;
    Ok(futures::stream::unfold(listener, |listener| async move {
        let item = listener.accept().await.map(|(stream, remote)| {
            let _ = stream.set_nodelay(true);
            PlainConn {
                info: ConnInfo {
                    remote_addr: Some(remote),
                    local_addr: stream.local_addr().ok(),
                    peer_certs: None,
                },
                stream,
            }
        });
        Some((item, listener))
    }))
}
