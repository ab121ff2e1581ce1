//! Running a binary under test: start it, read its start-up line, talk HTTP to it,
//! signal it, and collect what it printed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a process may take to start or to stop.
pub const PROCESS_TIMEOUT: Duration = Duration::from_secs(30);

/// Which binary to run: the package's `e2e-master` or `e2e-worker`, or
/// another built into the same target directory (a downstream server's).
#[derive(Debug, Clone, Copy)]
pub enum Binary {
    /// `e2e-master`, the `master` entry point.
    Master,
    /// `e2e-worker`, the `worker` entry point.
    Worker,
    /// A binary of another package, by name, built beside the running test
    /// (a package's tests are built after its binaries).
    Named(&'static str),
}

impl Binary {
    /// Where Cargo put the binary: beside the running executable, or one level
    /// up from a test's or benchmark's `deps/`. Cargo names a binary's path
    /// (`CARGO_BIN_EXE_*`) only to the package's tests and benchmarks, not to
    /// its library, so the harness looks where Cargo builds them; it builds
    /// them before any test or benchmark of the package, and `cargo xtask demo`
    /// builds them before the demo.
    pub fn path(self) -> PathBuf {
        let name = match self {
            Binary::Master => "e2e-master",
            Binary::Worker => "e2e-worker",
            Binary::Named(name) => name,
        };
        let exe = std::env::current_exe().expect("the path of the running executable");
        let mut dir = exe.parent().expect("an executable lives in a directory");
        if dir.file_name().is_some_and(|dir_name| dir_name == "deps") {
            dir = dir.parent().expect("deps/ lives in the profile's directory");
        }
        dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
    }
}

/// A running server process; killed if dropped while still running.
#[derive(Debug)]
pub struct Server {
    child: Child,
    /// `http://IP:PORT` from the start-up line.
    pub base_url: String,
    /// The whole start-up line.
    pub startup_line: String,
    stderr: Stderr,
}

/// The outcome of a process that ran to its end.
#[derive(Debug)]
pub struct Finished {
    /// How it exited.
    pub status: ExitStatus,
    /// What it printed on stdout (for a server, its start-up line).
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

/// Why a server did not start or stop as it should: the reason in words, and
/// what it had written to stderr by then.
#[derive(Debug)]
pub struct Failure {
    /// What went wrong, as a sentence fragment (`` `master` exited at start-up (…)``).
    pub reason: String,
    /// Everything the process wrote to stderr.
    pub stderr: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for Failure {}

/// Everything a process writes to stderr, gathered by a thread as it comes, so
/// that its end can be shown while the process still runs.
#[derive(Debug)]
struct Stderr {
    text: Arc<Mutex<Vec<u8>>>,
    reader: JoinHandle<()>,
}

impl Stderr {
    fn gather(mut pipe: impl Read + Send + 'static) -> Stderr {
        let text = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let text = Arc::clone(&text);
            std::thread::spawn(move || {
                let mut buffer = [0u8; 8192];
                while let Ok(n @ 1..) = pipe.read(&mut buffer) {
                    text.lock().unwrap_or_else(PoisonError::into_inner).extend_from_slice(&buffer[..n]);
                }
            })
        };
        Stderr { text, reader }
    }

    /// What was written so far.
    fn so_far(&self) -> String {
        String::from_utf8_lossy(&self.text.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }

    /// Everything, once the process has exited: the reader gets up to 5 s to
    /// reach the end of the pipe.
    fn all(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.reader.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.so_far()
    }
}

fn command(binary: Binary, args: &[&str], cwd: &Path) -> Command {
    let mut command = Command::new(binary.path());
    command.args(args).current_dir(cwd).env("RUST_LOG", "info").stdin(Stdio::null());
    command
}

/// Runs a process that is expected to exit by itself (a start-up failure).
pub fn run_to_exit(binary: Binary, args: &[&str], cwd: &Path) -> Finished {
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
    pub fn start(binary: Binary, args: &[&str], cwd: &Path) -> Server {
        Server::try_start(binary, args, cwd).unwrap_or_else(|failure| {
            panic!("no start-up line from {args:?}: {}; stderr:\n{}", failure.reason, failure.stderr)
        })
    }

    /// Starts a server and waits for its start-up line on stdout; why not, if
    /// it cannot be started, exits first, prints nothing within
    /// [`PROCESS_TIMEOUT`] or names no address (and is then killed).
    pub fn try_start(binary: Binary, args: &[&str], cwd: &Path) -> Result<Server, Failure> {
        let mut child =
            command(binary, args, cwd).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(
                |err| Failure {
                    reason: format!("start {}: {err}", binary.path().display()),
                    stderr: String::new(),
                },
            )?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = Stderr::gather(child.stderr.take().expect("piped"));
        let (line_tx, line_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = line_tx.send(line);
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let mut server = Server { child, base_url: String::new(), startup_line: String::new(), stderr };
        match line_rx.recv_timeout(PROCESS_TIMEOUT) {
            Ok(line) => server.startup_line = line,
            Err(not_printed) => {
                // A closed stdout is a process on its way out: give it a moment to finish.
                let exited = match not_printed {
                    mpsc::RecvTimeoutError::Disconnected => server.wait(Duration::from_secs(5)),
                    mpsc::RecvTimeoutError::Timeout => server.exit_status(),
                };
                let reason = match exited {
                    Some(status) => format!("exited at start-up ({status})"),
                    None => format!("printed no start-up line within {PROCESS_TIMEOUT:?}"),
                };
                return Err(server.fail(reason));
            }
        }
        match server.startup_line.split_whitespace().find(|word| word.starts_with("http://")) {
            Some(word) => server.base_url = word.trim_end_matches(',').to_owned(),
            None => {
                let reason = format!("the start-up line names no http:// address: {:?}", server.startup_line);
                return Err(server.fail(reason));
            }
        }
        Ok(server)
    }

    /// Kills the process (if it still runs) and reports `reason` with
    /// everything it wrote to stderr.
    fn fail(mut self, reason: String) -> Failure {
        let _ = self.child.kill();
        let _ = self.child.wait();
        Failure { reason, stderr: self.stderr.all() }
    }

    /// The process id, for signals.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's resident memory (`VmRSS` of `/proc/<pid>/status`), in bytes.
    pub fn resident_memory(&self) -> u64 {
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
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(&self.base_url, path)
    }

    /// The exit status, once the process has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait for the child")
    }

    /// Waits up to `within` for the process to exit; its status if it did.
    pub fn wait(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last `lines` lines the process wrote to stderr so far; once it has
    /// exited, up to the end.
    pub fn stderr_tail(&mut self, lines: usize) -> String {
        let text = if self.exit_status().is_some() { self.stderr.all() } else { self.stderr.so_far() };
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Sends `signal` (e.g. `TERM`) and waits for the process to exit.
    pub fn stop_with(mut self, signal: &str) -> Finished {
        self.try_stop_with(signal).unwrap_or_else(|failure| panic!("{failure}"))
    }

    /// Sends `signal` (e.g. `TERM`) and waits up to [`PROCESS_TIMEOUT`] for the
    /// process to exit; why not, if it could not be signalled or outlived the
    /// wait (it is then killed). The server stays, for its stderr.
    pub fn try_stop_with(&mut self, signal: &str) -> Result<Finished, Failure> {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        if !status.success() {
            return Err(Failure { reason: format!("kill -{signal} failed"), stderr: self.stderr.so_far() });
        }
        let Some(status) = self.wait(PROCESS_TIMEOUT) else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            return Err(Failure {
                reason: format!("the process did not exit within {PROCESS_TIMEOUT:?} of SIG{signal}"),
                stderr: self.stderr.all(),
            });
        };
        Ok(Finished { status, stdout: self.startup_line.clone(), stderr: self.stderr.all() })
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
pub fn http_get(base_url: &str, path: &str) -> (u16, String) {
    http_request(base_url, "GET", path, None, None).unwrap_or_else(|err| panic!("GET {path}: {err}"))
}

/// A minimal HTTP/1.1 request with an optional bearer token and JSON body; an
/// error when the connection fails (a killed process, say).
pub fn http_request(
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

/// One kept-alive HTTP/1.1 connection, for load: a request at a time, each
/// answer read by its `Content-Length`, so the next request reuses the
/// connection instead of paying for a new one (as real clients do).
#[derive(Debug)]
pub struct HttpConnection {
    authority: String,
    reader: BufReader<TcpStream>,
}

impl HttpConnection {
    /// Connects to `base_url` (`http://IP:PORT`).
    pub fn open(base_url: &str) -> Result<HttpConnection, std::io::Error> {
        let authority = base_url.trim_start_matches("http://").to_owned();
        let stream = TcpStream::connect(&authority)?;
        stream.set_read_timeout(Some(PROCESS_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(HttpConnection { authority, reader: BufReader::new(stream) })
    }

    /// Like [`http_request`], on this connection.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        json: Option<&str>,
    ) -> Result<(u16, String), std::io::Error> {
        let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.authority);
        if let Some(token) = bearer {
            request.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        let body = json.unwrap_or("");
        if json.is_some() {
            request
                .push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
        }
        request.push_str("\r\n");
        request.push_str(body);
        self.reader.get_mut().write_all(request.as_bytes())?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| invalid(format!("not an HTTP status line: {line:?}")))?;
        let mut length = None;
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse::<usize>().ok();
            }
        }
        let length = length.ok_or_else(|| invalid("an answer without Content-Length".to_owned()))?;
        let mut answer = vec![0; length];
        self.reader.read_exact(&mut answer)?;
        Ok((status, String::from_utf8_lossy(&answer).into_owned()))
    }
}
