//! Stopping and starting the Redis and MariaDB that `scripts/test` runs, for
//! outage and soak tests. `scripts/test` exports their pid files and start
//! commands; a stopped server stays a zombie child of the script, so "gone"
//! means gone or a zombie.

use std::time::{Duration, Instant};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the tests through ./scripts/test"))
}

fn pid_in(var: &str) -> i32 {
    let f = env(var);
    std::fs::read_to_string(&f)
        .unwrap_or_else(|e| panic!("read {f}: {e}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{f}: not a pid: {e}"))
}

/// SIGTERM, then waits until the process is gone (or a zombie).
fn stop(what: &str, pid_var: &str, within: Duration) {
    let pid = pid_in(pid_var);
    let ok = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "could not signal {what} pid {pid}");
    let deadline = Instant::now() + within;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.split_whitespace().nth(2) == Some("Z") {
            return;
        }
        assert!(Instant::now() < deadline, "{what} did not stop within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts a server in the background with the command `scripts/test` gave.
fn start(start_var: &str) {
    let cmd = env(start_var);
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{cmd} >/dev/null 2>&1 &"))
        .status()
        .unwrap();
    assert!(status.success(), "could not start: {cmd}");
}

pub fn stop_mysql() {
    stop("MariaDB", "SYNCNODE_TEST_MYSQL_PIDFILE", Duration::from_secs(60));
}

pub fn start_mysql() {
    start("SYNCNODE_TEST_MYSQL_START");
}

pub fn stop_redis() {
    stop("Redis", "SYNCNODE_TEST_REDIS_PIDFILE", Duration::from_secs(30));
}

pub fn start_redis() {
    start("SYNCNODE_TEST_REDIS_START");
}
