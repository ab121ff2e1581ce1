//! A fault-injecting TCP proxy, put between a process and what it replicates
//! through (Redis, or the master's listener) to cut that connection on demand.
//!
//! `cut()` closes every connection through the proxy and, until `restore()`,
//! closes each new one as soon as it is accepted: to the process behind it,
//! the other end went away and comes back later, as after a network fault.
//! Dropping the proxy stops it and closes everything it carries.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// A running proxy to one `HOST:PORT`.
#[derive(Debug)]
pub struct Proxy {
    address: String,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    target: String,
    cut: AtomicBool,
    stopping: AtomicBool,
    next_id: AtomicU64,
    /// Both sockets of every live connection, to close them on `cut()`.
    connections: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
    /// Connections accepted while cut, and so closed at once.
    refused: AtomicU64,
}

impl Shared {
    fn connections(&self) -> MutexGuard<'_, HashMap<u64, (TcpStream, TcpStream)>> {
        // A pump that panicked leaves nothing half-updated in the map.
        self.connections.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn close_all(&self) {
        for (_, (downstream, upstream)) in self.connections().drain() {
            let _ = downstream.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
        }
    }
}

impl Proxy {
    /// A proxy on a free loopback port, forwarding to `target` (`HOST:PORT`).
    pub fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let address = listener.local_addr().expect("the proxy's address").to_string();
        let shared = Arc::new(Shared {
            target: target.to_owned(),
            cut: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            connections: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || accept(&listener, &shared))
        };
        Proxy { address, shared, acceptor: Some(acceptor) }
    }

    /// Where the proxy listens, as `HOST:PORT`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Closes every connection through the proxy and refuses new ones until
    /// [`Proxy::restore`].
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        self.shared.close_all();
    }

    /// Lets connections through again.
    pub fn restore(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// Connections through the proxy now.
    pub fn connections(&self) -> usize {
        self.shared.connections().len()
    }

    /// Connections accepted while cut (and closed at once): the process behind
    /// the proxy tried to reconnect.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wakes the blocking accept, which then sees `stopping`.
        let _ = TcpStream::connect(&self.address);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        self.shared.close_all();
    }
}

fn accept(listener: &TcpListener, shared: &Arc<Shared>) {
    for downstream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(downstream) = downstream else { continue };
        if shared.cut.load(Ordering::SeqCst) {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            let _ = downstream.shutdown(Shutdown::Both);
            continue;
        }
        // An unreachable target looks like a refused connection too.
        let Ok(upstream) = TcpStream::connect(&shared.target) else {
            let _ = downstream.shutdown(Shutdown::Both);
            continue;
        };
        let _ = downstream.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        let (Ok(downstream_copy), Ok(upstream_copy)) = (downstream.try_clone(), upstream.try_clone()) else {
            continue;
        };
        shared.connections().insert(id, (downstream_copy, upstream_copy));
        // A cut between the check above and the insert would miss this one.
        if shared.cut.load(Ordering::SeqCst) {
            shared.close_all();
            continue;
        }
        for (from, to) in [(&downstream, &upstream), (&upstream, &downstream)] {
            let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else { continue };
            let shared = Arc::clone(shared);
            std::thread::spawn(move || pump(from, to, id, &shared));
        }
    }
}

/// Copies one direction until either side closes, then closes both.
fn pump(mut from: TcpStream, mut to: TcpStream, id: u64, shared: &Shared) {
    let mut buffer = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
    shared.connections().remove(&id);
}
