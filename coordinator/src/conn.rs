//! Accepted TCP connections, before TLS: at most `limits.max_connections` open at once (a new
//! one beyond that is closed at once, so idle or slow sockets cannot use up the process's file
//! descriptors), TCP keepalive and no Nagle delay on each.
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// One accepted connection; its place is given back when it is dropped.
pub struct Capped {
    inner: TcpStream,
    _place: Place,
}

struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The listener's connections, at most `max` open at once (`open` counts them).
pub fn capped(listener: TcpListener, max: usize, open: Arc<AtomicUsize>) -> impl Stream<Item = std::io::Result<Capped>> {
    tokio_stream::wrappers::TcpListenerStream::new(listener).filter_map(move |r| match r {
        Err(e) => Some(Err(e)),
        Ok(s) => {
            if open.fetch_add(1, Ordering::SeqCst) >= max {
                open.fetch_sub(1, Ordering::SeqCst);
                crate::metrics::METRICS.refused_calls.get_or_create(&crate::metrics::Kind { kind: "connection".into() }).inc();
                tracing::debug!("refused a connection: {max} open");
                return None;
            }
            let _ = s.set_nodelay(true);
            let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)).with_interval(Duration::from_secs(10));
            let _ = socket2::SockRef::from(&s).set_tcp_keepalive(&keepalive);
            Some(Ok(Capped { inner: s, _place: Place(open.clone()) }))
        }
    })
}

impl Connected for Capped {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Capped {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Capped {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
