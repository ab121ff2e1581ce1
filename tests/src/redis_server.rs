//! Redis for tests that must not touch the shared one: a dedicated
//! `redis-server` a test may stop and start again, and a raw RESP client to
//! send Redis any command (a `PUBLISH` no process of the deployment sent).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::deployment::free_port;
use crate::process::PROCESS_TIMEOUT;

/// A `redis-server` of one test, on a port of its own, persisting nothing;
/// killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers `PING`.
    pub fn start() -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            dir: tempfile::tempdir().expect("a temporary directory"),
            child: None,
        };
        server.start_again();
        server
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.address())
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same port.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the dedicated Redis is already running");
        let child = spawn(self.port, self.dir.path());
        self.child = Some(child);
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        while !redis_command(&self.address(), &["PING"]).is_ok_and(|reply| reply == "+PONG") {
            assert!(
                Instant::now() < deadline,
                "the dedicated redis-server on {} never answered PING",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (`kill -9`: no goodbye to its clients) and waits for
    /// it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(port: u16, dir: &Path) -> Child {
    let port = port.to_string();
    Command::new("redis-server")
        .args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server (is it installed?)")
}

/// Sends one command to the Redis at `address` on a fresh connection; its
/// reply's first line (`+PONG`, `:3`, `-ERR …`).
pub fn redis_command(address: &str, args: &[&str]) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    Ok(reply.trim_end().to_owned())
}
