//! A TCP proxy a test puts between the connector and a real service to cut or
//! stall the network: `cut()` resets every open connection and refuses new ones
//! (a cable pulled, a firewall dropping the flow), `stall()` keeps connections
//! open but stops moving bytes (a black-holed route: only timeouts notice),
//! `restore()` heals it. It runs on its own thread and runtime so it keeps
//! working while the test blocks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Open,
    Stall,
    Cut,
}

pub struct TcpProxy {
    pub addr: SocketAddr,
    mode: Arc<watch::Sender<(Mode, u64)>>,
    accepted: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TcpProxy {
    /// Listens on an ephemeral 127.0.0.1 port and forwards to `target` ("host:port").
    pub fn start(target: &str) -> TcpProxy {
        let target = target.to_string();
        let (mode_tx, mode_rx) = watch::channel((Mode::Open, 0u64));
        let mode_tx = Arc::new(mode_tx);
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let accept = async {
                    loop {
                        let Ok((client, _)) = listener.accept().await else {
                            continue;
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        if mode_rx.borrow().0 == Mode::Cut {
                            drop(client);
                            continue;
                        }
                        tokio::spawn(serve(client, target.clone(), mode_rx.clone()));
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stop_rx => {}
                }
            });
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("proxy listening");
        TcpProxy {
            addr,
            mode: mode_tx,
            accepted,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// "127.0.0.1:PORT" of the proxy, to put in a URL instead of the service's.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    /// The mode, and in `.1` how many cuts there have been: a connection ends
    /// at a cut even when `restore()` follows before it had a chance to look.
    fn set(&self, mode: Mode) {
        self.mode.send_modify(|m| {
            m.0 = mode;
            if mode == Mode::Cut {
                m.1 += 1;
            }
        });
    }

    /// Resets open connections and refuses new ones until `restore()`.
    pub fn cut(&self) {
        self.set(Mode::Cut);
    }

    /// Keeps connections open but forwards nothing until `restore()`.
    pub fn stall(&self) {
        self.set(Mode::Stall);
    }

    pub fn restore(&self) {
        self.set(Mode::Open);
    }

    /// Connections accepted so far (refused ones while cut included): a client
    /// that gives up on a stalled connection shows up as a new one.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(client: TcpStream, target: String, mode: watch::Receiver<(Mode, u64)>) {
    let Ok(upstream) = TcpStream::connect(&target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let cuts = mode.borrow().1;
    // Either direction ending (EOF, error, cut) ends both: dropping the halves
    // closes the sockets, which is what a reset looks like to both peers.
    tokio::select! {
        _ = pump(cr, uw, mode.clone(), cuts) => {}
        _ = pump(ur, cw, mode, cuts) => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<(Mode, u64)>,
    cuts: u64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // While stalled, neither read nor write: the kernel buffers fill and
        // both peers see a silent connection.
        loop {
            let (m, now) = *mode.borrow_and_update();
            if now != cuts {
                return;
            }
            match m {
                Mode::Open => break,
                Mode::Cut => return,
                Mode::Stall => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        tokio::select! {
            r = from.read(&mut buf) => {
                let n = match r { Ok(0) | Err(_) => return, Ok(n) => n };
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            changed = mode.changed() => {
                if changed.is_err() { return; }
                // re-evaluate the mode at the top of the loop
            }
        }
    }
}
