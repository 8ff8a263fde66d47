//! A `syncnode run` child process, for tests, benchmarks and tools that run
//! real nodes: starts it, reads the one line it prints once serving
//! (`syncnode peer_id=… http=… listen=…`) and gives an API client for it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::client::ApiClient;

pub struct NodeProcess {
    pub child: Child,
    pub dir: PathBuf,
    /// The arguments after `run --data-dir <dir>`.
    pub args: Vec<String>,
    /// Extra environment (e.g. libfaketime's).
    pub env: Vec<(String, String)>,
    pub peer_id: String,
    /// `/ip4/…/tcp/<port>/p2p/<peer id>`, for `--bootstrap`.
    pub addr: String,
    pub p2p_port: u16,
    /// `127.0.0.1:<port>` of the HTTP API.
    pub http: String,
    pub api: ApiClient,
}

/// Linux's "text file busy".
const ETXTBSY: i32 = 26;

impl NodeProcess {
    /// Runs `bin run --data-dir dir args…`; stderr goes to `dir/stderr.log`.
    /// `--api-token` among `args` is used by the client.
    pub async fn spawn(bin: &Path, dir: &Path, args: Vec<String>) -> anyhow::Result<NodeProcess> {
        Self::spawn_with(bin, dir, "run", args, Vec::new()).await
    }

    /// `bin <command> --data-dir dir args…` with extra environment
    /// (`command` is `run`, or `resync` which runs the node after it).
    pub async fn spawn_with(
        bin: &Path,
        dir: &Path,
        command: &str,
        args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<NodeProcess> {
        std::fs::create_dir_all(dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("stderr.log"))?;
        // The caller's environment wins (an empty RUST_LOG gives the node's defaults).
        let mut command_line = Command::new(bin);
        command_line
            .arg(command)
            .arg("--data-dir")
            .arg(dir)
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,syncnode=info".into()),
            )
            .envs(env.iter().cloned())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        // A wrapper script written a moment ago can be "busy" (ETXTBSY): a
        // process forked meanwhile elsewhere in the test may still hold the
        // descriptor it was written through, until that child's exec.
        let mut tries = 0;
        let mut child = loop {
            match command_line.spawn() {
                Err(e) if e.raw_os_error() == Some(ETXTBSY) && tries < 20 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => break other.map_err(|e| anyhow::anyhow!("start {}: {e}", bin.display()))?,
            }
        };
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let stderr = || std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
        let line = match tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await {
            Err(_) => anyhow::bail!("node in {} did not start within 60 s: {}", dir.display(), stderr()),
            Ok(Ok(Some(line))) => line,
            Ok(_) => anyhow::bail!("node in {} exited: {}", dir.display(), stderr()),
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .map(str::to_string)
                .ok_or_else(|| anyhow::anyhow!("no {k} in {line:?}"))
        };
        let (peer_id, http) = (field("peer_id")?, field("http")?);
        let addr = field("listen")?.split(',').next().unwrap_or_default().to_string();
        let p2p_port = addr
            .split('/')
            .nth(4)
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no TCP port in {addr:?}"))?;
        let token = args
            .iter()
            .position(|a| a == "--api-token")
            .and_then(|i| args.get(i + 1).cloned());
        Ok(NodeProcess {
            child,
            dir: dir.to_path_buf(),
            api: ApiClient::new(format!("http://{http}"), token),
            args,
            env,
            peer_id,
            addr,
            p2p_port,
            http,
        })
    }

    /// The same node again (after a kill), on the ports it had.
    pub async fn restart(self, bin: &Path) -> anyhow::Result<NodeProcess> {
        let mut args = self.args.clone();
        for a in args.iter_mut() {
            if a.starts_with("/ip4/127.0.0.1/tcp/0") {
                *a = format!("/ip4/127.0.0.1/tcp/{}", self.p2p_port);
            } else if a == "127.0.0.1:0" {
                *a = self.http.clone();
            }
        }
        let (dir, env) = (self.dir.clone(), self.env.clone());
        drop(self);
        NodeProcess::spawn_with(bin, &dir, "run", args, env).await
    }

    /// `/v1/merkle` as `(root, count)`.
    pub async fn root(&self) -> anyhow::Result<(Option<String>, u64)> {
        let m = self.api.ok_json(self.api.get("/v1/merkle").await).await?;
        Ok((m["root"].as_str().map(str::to_string), m["count"].as_u64().unwrap_or(0)))
    }

    /// The sum of a metric's series in `/metrics` (0 when absent).
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = self.api.get("/metrics").await?.text();
        Ok(text
            .lines()
            .filter(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// `/v1/members`' list.
    pub async fn members(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let v = self.api.ok_json(self.api.get("/v1/members").await).await?;
        Ok(v["members"].as_array().cloned().unwrap_or_default())
    }

    /// SIGKILL, and wait until it is gone.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// Cuts (`true`) or restores the link between `self` and `other`, both ways.
    pub async fn block(&self, other: &NodeProcess, on: bool) -> anyhow::Result<()> {
        for (x, y) in [(self, other), (other, self)] {
            let path = format!("/v1/peers/{}/block", y.peer_id);
            let method = if on { hyper::Method::PUT } else { hyper::Method::DELETE };
            x.api.ok_json(x.api.call(method, &path, None).await).await?;
        }
        Ok(())
    }
}

/// Arguments for a node on loopback with free ports, in `cluster`, dialing
/// `bootstrap`.
pub fn loopback_args(cluster: &str, bootstrap: &[&NodeProcess]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--http",
        "127.0.0.1:0",
        "--cluster-id",
        cluster,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for b in bootstrap {
        a.extend(["--bootstrap".to_string(), b.addr.clone()]);
    }
    a
}

/// Retries `check` until it passes, or fails after `timeout` with `what`
/// and the check's last complaint.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let start = std::time::Instant::now();
    loop {
        match check().await {
            Ok(()) => return,
            Err(e) if start.elapsed() > timeout => panic!("{what} within {timeout:?}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Waits until every node shows the same Merkle root; returns the time taken.
pub async fn converge(nodes: &[&NodeProcess], timeout: Duration) -> anyhow::Result<Duration> {
    let start = std::time::Instant::now();
    loop {
        let mut roots = Vec::new();
        for n in nodes {
            roots.push(n.root().await.ok());
        }
        if roots[0].is_some() && roots.windows(2).all(|w| w[0] == w[1]) {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(start.elapsed() < timeout, "no convergence in {timeout:?}: {roots:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
