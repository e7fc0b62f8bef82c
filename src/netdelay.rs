//! A loopback TCP proxy that delivers every byte a fixed time after it arrived, each way
//! (a network with that one-way latency and no bandwidth limit), can cut every open
//! connection (the Generate stream's resume is tested through it) and can partition: hold
//! every byte, both ways and on new connections too, until healed, as a network that drops
//! packets does to TCP, whose retransmissions deliver them once it is back (tests/faults.rs).
//! TLS passes through untouched: the proxy sees only bytes.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

pub struct DelayProxy {
    pub addr: SocketAddr,
    cut: Arc<Notify>,
    partitioned: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl DelayProxy {
    /// Listens on a free loopback port and forwards to `upstream`, `one_way` late each way.
    pub async fn start(upstream: SocketAddr, one_way: Duration) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(Notify::new());
        let on_cut = cut.clone();
        let (partitioned, held) = watch::channel(false);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let on_cut = on_cut.clone();
                let held = held.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else { return };
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    // Dropping both pumps closes both sockets.
                    tokio::select! {
                        _ = pump(cr, sw, one_way, held.clone()) => {}
                        _ = pump(sr, cw, one_way, held) => {}
                        _ = on_cut.notified() => {}
                    }
                });
            }
        });
        Ok(Self { addr, cut, partitioned, accept })
    }

    /// From now on no byte gets through either way (they are held, not lost).
    pub fn partition(&self) {
        self.partitioned.send_replace(true);
    }

    /// Delivers what was held and lets traffic through again.
    pub fn heal(&self) {
        self.partitioned.send_replace(false);
    }

    /// Closes every connection open now; new ones are accepted as before.
    pub fn cut(&self) {
        self.cut.notify_waiters();
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Copies `from` to `to`, each chunk written `delay` after it was read and not while
/// `held`; ends when either side closes.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration, mut held: watch::Receiver<bool>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if held.wait_for(|h| !h).await.is_err() {
                break;
            }
            if to.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    };
    // The writer drains what was read before the reader saw the end.
    tokio::join!(reader, writer);
}
