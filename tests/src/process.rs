//! The binaries as processes: started, read (their JSON log lines), signalled, killed.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use serde_json::Value;

use crate::binary;

/// A running process whose JSON log lines are forwarded to the test's output.
pub struct Process {
    child: Child,
    logs: Arc<Mutex<Vec<Value>>>,
}

impl Process {
    /// Starts `binary` with `args` and `envs`; when `ready_message` is given, waits for a log
    /// line with that message and returns it parsed.
    pub fn spawn(
        name: &str,
        args: &[&str],
        envs: &[(&str, String)],
        ready_message: Option<&str>,
    ) -> (Self, Option<Value>) {
        let mut command = Command::new(binary(name));
        command
            .args(args)
            .current_dir(std::env::temp_dir())
            .env("RUST_LOG", "info")
            // Many processes at once: each serves its metrics on a port of its own.
            .env("METRICS_ADDR", "127.0.0.1:0")
            .env_remove("LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in envs {
            command.env(key, value);
        }
        let mut child = command.spawn().unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        let (tx, rx) = mpsc::channel::<Value>();
        let wanted = ready_message.map(str::to_owned);
        let stdout = child.stdout.take().expect("piped stdout");
        let label = name.to_owned();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let captured = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                eprintln!("[{label}] {line}");
                let Ok(value) = serde_json::from_str::<Value>(&line) else { continue };
                if let Some(wanted) = &wanted
                    && value["message"] == wanted.as_str()
                {
                    let _ = tx.send(value.clone());
                }
                captured.lock().unwrap_or_else(|e| e.into_inner()).push(value);
            }
        });
        let stderr = child.stderr.take().expect("piped stderr");
        let label = name.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{label} stderr] {line}");
            }
        });
        let mut process = Process { child, logs };
        let ready = ready_message.map(|message| {
            rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
                let status = process.child.try_wait().ok().flatten();
                panic!("{name} did not log {message:?} within 60 s (exit status: {status:?}); see its output above")
            })
        });
        (process, ready)
    }

    /// Sends SIGTERM and waits (up to 30 s) for the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().ok()?;
        for _ in 0..300 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    /// Waits (up to `timeout`) for the process to exit by itself; its exit status.
    pub async fn wait_for_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no clean-up, no goodbye (a crash).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Every JSON log line printed so far.
    pub fn all_logs(&self) -> Vec<Value> {
        self.logs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Where the process serves its metrics (`METRICS_ADDR`), from its `metrics listening`
    /// log line: `http://host:port`.
    pub fn metrics_base(&self) -> String {
        let line = self.logs("metrics listening").into_iter().next().expect("a `metrics listening` log line");
        format!("http://{}", line["addr"].as_str().expect("metrics listening line has addr"))
    }

    /// The JSON log lines printed so far whose `message` is `message`.
    pub fn logs(&self, message: &str) -> Vec<Value> {
        let logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        logs.iter().filter(|line| line["message"] == message).cloned().collect()
    }

    /// Waits (up to `timeout`) for a log line with `message` that satisfies `check`.
    pub async fn wait_for_log(&self, message: &str, timeout: Duration, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(line) = self.logs(message).into_iter().find(|line| check(line)) {
                return line;
            }
            assert!(tokio::time::Instant::now() < deadline, "no {message:?} log line as expected within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a workspace binary to completion and returns (success, stdout, stderr).
pub fn run(name: &str, args: &[&str], envs: &[(&str, String)], stdin: Option<&str>) -> (bool, String, String) {
    use std::io::Write;
    let mut command = Command::new(binary(name));
    command
        .args(args)
        .current_dir(std::env::temp_dir())
        .env_remove("JWT_SECRET")
        .env_remove("WEBHOOK_SECRET")
        .env_remove("TICKET_SECRET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in envs {
        command.env(key, value);
    }
    let mut child = command.spawn().unwrap_or_else(|e| panic!("spawning {name}: {e}"));
    if let Some(mut pipe) = child.stdin.take() {
        let _ = pipe.write_all(stdin.unwrap_or_default().as_bytes());
    }
    let out = child.wait_with_output().expect("wait for process");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
