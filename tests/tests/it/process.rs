//! Running a binary under test: start it, read its start-up line, talk HTTP to it,
//! signal it, and collect what it printed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a process may take to start or to stop.
pub(crate) const PROCESS_TIMEOUT: Duration = Duration::from_secs(30);

/// Which binary to run.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Binary {
    Master,
    Worker,
}

impl Binary {
    fn path(self) -> &'static str {
        match self {
            Binary::Master => env!("CARGO_BIN_EXE_e2e-master"),
            Binary::Worker => env!("CARGO_BIN_EXE_e2e-worker"),
        }
    }
}

/// A running server process; killed if dropped while still running.
pub(crate) struct Server {
    child: Child,
    /// `http://IP:PORT` from the start-up line.
    pub(crate) base_url: String,
    /// The whole start-up line.
    pub(crate) startup_line: String,
    stderr: mpsc::Receiver<String>,
}

/// The outcome of a process that ran to its end.
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

fn command(binary: Binary, args: &[&str], cwd: &Path) -> Command {
    let mut command = Command::new(binary.path());
    command.args(args).current_dir(cwd).env("RUST_LOG", "info").stdin(Stdio::null());
    command
}

/// Runs a process that is expected to exit by itself (a start-up failure).
pub(crate) fn run_to_exit(binary: Binary, args: &[&str], cwd: &Path) -> Finished {
    let mut child = command(binary, args, cwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary under test starts");
    let deadline = Instant::now() + PROCESS_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{args:?} did not exit within {PROCESS_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child.stdout.take().expect("piped").read_to_string(&mut stdout).expect("read stdout");
    child.stderr.take().expect("piped").read_to_string(&mut stderr).expect("read stderr");
    Finished { status, stdout, stderr }
}

impl Server {
    /// Starts a server and waits for its start-up line on stdout.
    pub(crate) fn start(binary: Binary, args: &[&str], cwd: &Path) -> Server {
        let mut child = command(binary, args, cwd)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary under test starts");
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let (line_tx, line_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = line_tx.send(line);
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let (stderr_tx, stderr_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut text);
            let _ = stderr_tx.send(text);
        });
        let startup_line = match line_rx.recv_timeout(PROCESS_TIMEOUT) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = stderr_rx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
                panic!("no start-up line from {args:?}; stderr:\n{stderr}");
            }
        };
        let base_url = startup_line
            .split_whitespace()
            .find(|word| word.starts_with("http://"))
            .map(|word| word.trim_end_matches(',').to_owned())
            .unwrap_or_else(|| panic!("the start-up line names no http:// address: {startup_line:?}"));
        Server { child, base_url, startup_line, stderr: stderr_rx }
    }

    /// The process id, for signals.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's resident memory (`VmRSS` of `/proc/<pid>/status`), in bytes.
    pub(crate) fn resident_memory(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_else(|err| panic!("read /proc/{}/status: {err}", self.pid()));
        let kib = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no VmRSS in /proc/{}/status:\n{status}", self.pid()));
        kib * 1024
    }

    /// `GET path`: the status code and body.
    pub(crate) fn get(&self, path: &str) -> (u16, String) {
        http_get(&self.base_url, path)
    }

    /// Sends `signal` (e.g. `TERM`) and waits for the process to exit.
    pub(crate) fn stop_with(mut self, signal: &str) -> Finished {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for the child") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the process did not exit within {PROCESS_TIMEOUT:?} of SIG{signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stderr = self.stderr.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
        Finished { status, stdout: self.startup_line.clone(), stderr }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A minimal HTTP/1.1 GET, enough to check status codes and small bodies.
pub(crate) fn http_get(base_url: &str, path: &str) -> (u16, String) {
    http_request(base_url, "GET", path, None, None).unwrap_or_else(|err| panic!("GET {path}: {err}"))
}

/// A minimal HTTP/1.1 request with an optional bearer token and JSON body; an
/// error when the connection fails (a killed process, say).
pub(crate) fn http_request(
    base_url: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    json: Option<&str>,
) -> Result<(u16, String), std::io::Error> {
    let authority = base_url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(authority)?;
    stream.set_read_timeout(Some(PROCESS_TIMEOUT))?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    if let Some(token) = bearer {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    let body = json.unwrap_or("");
    if json.is_some() {
        request.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.split_whitespace().nth(1).and_then(|code| code.parse().ok()).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not an HTTP response: {response:?}"))
    })?;
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    Ok((status, body))
}
