//! A replication peer speaking the line protocol by hand over a raw socket:
//! what an attacker, or a buggy process, can send to the master's listener.
//! It sends exactly the lines a test gives it and reports exactly what came
//! back, including how the connection ended.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// How a wait for the server's lines ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The server closed the connection (or reset it).
    Closed,
    /// The server kept it open past the wait.
    StillOpen,
}

/// One raw connection to a replication listener.
#[derive(Debug)]
pub struct RawPeer {
    stream: TcpStream,
    /// Bytes received after the last complete line.
    partial: Vec<u8>,
    /// Every line received so far, for failure messages.
    pub received: Vec<String>,
    closed: bool,
}

impl RawPeer {
    /// Connects to `address` (`HOST:PORT`).
    pub fn connect(address: &str) -> RawPeer {
        let stream = TcpStream::connect(address).unwrap_or_else(|err| panic!("connect to {address}: {err}"));
        let _ = stream.set_nodelay(true);
        RawPeer { stream, partial: Vec::new(), received: Vec::new(), closed: false }
    }

    /// Sends `line` and its newline; an error once the server has closed.
    pub fn send(&mut self, line: &str) -> std::io::Result<()> {
        self.stream.write_all(format!("{line}\n").as_bytes())
    }

    /// Sends each of `lines`, stopping at the first that cannot be written
    /// (the server closed: what it said is then in `received`).
    pub fn send_all(&mut self, lines: &[&str]) {
        for line in lines {
            if self.send(line).is_err() {
                return;
            }
        }
    }

    /// The next line from the server within `within`: `None` when it closed
    /// or the wait ended first.
    pub fn next_line(&mut self, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        let mut buffer = [0u8; 8192];
        loop {
            if let Some(end) = self.partial.iter().position(|byte| *byte == b'\n') {
                let line: Vec<u8> = self.partial.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line[..end]).into_owned();
                self.received.push(line.clone());
                return Some(line);
            }
            if self.closed {
                return None;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).expect("set a read timeout");
            match self.stream.read(&mut buffer) {
                Ok(0) => self.closed = true,
                Ok(n) => self.partial.extend_from_slice(&buffer[..n]),
                Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return None,
                Err(err) if err.kind() == ErrorKind::Interrupted => {}
                // A reset is a close, however rude.
                Err(_) => self.closed = true,
            }
        }
    }

    /// Reads until the server closes the connection or `within` passes.
    pub fn read_to_end(&mut self, within: Duration) -> Ending {
        let deadline = Instant::now() + within;
        while !self.closed && Instant::now() < deadline {
            self.next_line(deadline.saturating_duration_since(Instant::now()));
        }
        if self.closed { Ending::Closed } else { Ending::StillOpen }
    }

    /// Reads until a line starting with `prefix` arrives; an error, naming
    /// everything received, if the server closes, says `ERROR`, or stays
    /// silent for `within` first.
    pub fn wait_for(&mut self, prefix: &str, within: Duration) -> Result<String, String> {
        let deadline = Instant::now() + within;
        loop {
            match self.next_line(deadline.saturating_duration_since(Instant::now())) {
                Some(line) if line.starts_with(prefix) => return Ok(line),
                Some(line) if line.starts_with("ERROR") => {
                    return Err(format!(
                        "the server said {line:?}; everything received: {:?}",
                        self.received
                    ));
                }
                Some(_) => {}
                None if self.closed => {
                    return Err(format!(
                        "the server closed the connection before {prefix}; received {:?}",
                        self.received
                    ));
                }
                None => {
                    return Err(format!("no {prefix} within {within:?}; received {:?}", self.received));
                }
            }
        }
    }

    /// A second handle on the socket, to write from another thread while this
    /// one reads.
    pub fn writer(&self) -> TcpStream {
        self.stream.try_clone().expect("clone the socket")
    }

    /// Whether some line received so far starts with `ERROR`.
    pub fn got_error(&self) -> bool {
        self.received.iter().any(|line| line.starts_with("ERROR"))
    }

    /// Authenticates with `secret`, names itself `name` and asks to replicate,
    /// as a worker does; an error unless the server answers `REPLICATE` (with
    /// a `POSITION`) instead of refusing.
    pub fn join_as(&mut self, secret: &str, name: &str) -> Result<(), String> {
        self.send_all(&[&format!("AUTH {secret}"), &format!("NAME {name}"), "PING 0", "REPLICATE"]);
        self.wait_for("POSITION", Duration::from_secs(5)).map(drop).map_err(|err| {
            format!("the listener did not accept `AUTH <the secret>` then `NAME {name}`: {err}")
        })
    }
}
