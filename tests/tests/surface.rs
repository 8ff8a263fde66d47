//! The operator's and client's surface, tried with the tools they use:
//! `/metrics` through promtool and Python's `prometheus_client` parsers
//! (OpenMetrics and the text format), log lines (default INFO, JSON, no
//! ANSI in a pipe, the exposure WARNs), the CLI's commands, `-o json`, help
//! and exit codes, SIGHUP reload, conditional requests, cursors, JSON
//! errors, slow clients and the drain on SIGTERM. Real `syncnode` processes.

use bytes::Bytes;
use serde_json::{Value, json};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use syncnode::process::{NodeProcess as Proc, eventually, loopback_args};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_node"))
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn args(cluster: &str, extra: &[&str]) -> Vec<String> {
    let mut a = loopback_args(cluster, &[]);
    a.extend(["--gossip-interval", "200ms"].map(String::from));
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// A node with the node's own log defaults (no RUST_LOG).
async fn spawn_default_logs(dir: &Path, a: Vec<String>) -> Proc {
    Proc::spawn_with(bin(), dir, "run", a, vec![("RUST_LOG".into(), String::new())])
        .await
        .unwrap()
}

fn stderr_of(p: &Proc) -> String {
    std::fs::read_to_string(p.dir.join("stderr.log")).unwrap_or_default()
}

/// Runs the CLI with `args`, `stdin` fed in; returns (exit code, stdout, stderr).
async fn cli(args: &[&str], stdin: &[u8]) -> (i32, String, String) {
    let mut child = tokio::process::Command::new(bin())
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("the CLI finishes")
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `program args…` with `input` on stdin; `missing` says how to get it.
fn piped(program: &str, args: &[&str], input: &str, missing: &str) -> std::process::Output {
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(missing);
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// `prometheus_client`'s parser over `text`: every sample as `[name, labels, value]`.
fn python_samples(text: &str, openmetrics: bool) -> Vec<(String, Value, f64)> {
    let script = r#"
import json, sys
mode = sys.argv[1]
if mode == "openmetrics":
    from prometheus_client.openmetrics.parser import text_string_to_metric_families
else:
    from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let out = piped(
        "/usr/bin/python3",
        &["-c", script, if openmetrics { "openmetrics" } else { "text" }],
        text,
        "/usr/bin/python3 with prometheus_client: run scripts/test, which installs python3-prometheus-client",
    );
    assert!(
        out.status.success(),
        "prometheus_client ({}) refused /metrics: {}\n{text}",
        if openmetrics { "OpenMetrics" } else { "text" },
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<(String, Value, f64)> = serde_json::from_slice(&out.stdout).unwrap();
    v
}

fn sample<'a>(samples: &'a [(String, Value, f64)], name: &str, label: Option<(&str, &str)>) -> Option<&'a f64> {
    samples
        .iter()
        .find(|(n, l, _)| n == name && label.is_none_or(|(k, v)| l[k] == v))
        .map(|(_, _, v)| v)
}

async fn metrics_with(p: &Proc, accept: Option<&str>) -> (String, String) {
    let mut req = hyper::Request::get(format!("http://{}/metrics", p.http));
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let resp = client
        .request(req.body(http_body_util::Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let ctype = resp.headers()["content-type"].to_str().unwrap().to_string();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    (ctype, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_and_openmetrics_with_base_unit_names() {
    let (d1, d2) = (tmp(), tmp());
    let n1 = Proc::spawn(bin(), d1.path(), args("surface-metrics", &[]))
        .await
        .unwrap();
    let mut a2 = args("surface-metrics", &[]);
    a2.extend(["--bootstrap".to_string(), n1.addr.clone()]);
    let n2 = Proc::spawn(bin(), d2.path(), a2).await.unwrap();
    n1.api
        .ok_json(n1.api.put_item("m.1", Bytes::from_static(b"one"), false).await)
        .await
        .unwrap();
    n1.api.get_item("m.1").await.unwrap();
    syncnode::process::converge(&[&n1, &n2], Duration::from_secs(60))
        .await
        .unwrap();
    // One more write, which n2 learns by CDC.
    n1.api
        .ok_json(n1.api.put_item("m.2", Bytes::from_static(b"two"), false).await)
        .await
        .unwrap();
    // Sessions and CDC batches have run on the joining node.
    eventually("a session and a CDC batch on n2", Duration::from_secs(30), || async {
        let (_, text) = metrics_with(&n2, Some("text/plain")).await;
        let s = python_samples(&text, false);
        match (
            sample(&s, "syncnode_session_duration_seconds_count", None),
            sample(&s, "syncnode_cdc_apply_duration_seconds_count", None),
        ) {
            (Some(a), Some(b)) if *a > 0.0 && *b > 0.0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    let (ctype, om) = metrics_with(&n1, None).await;
    assert_eq!(ctype, "application/openmetrics-text; version=1.0.0; charset=utf-8");
    assert!(om.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    let (ctype, text) = metrics_with(&n1, Some("text/plain;version=0.0.4;q=0.5,*/*;q=0.1")).await;
    assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");
    assert!(!text.contains("# EOF"));
    // What Prometheus 2.x sends: OpenMetrics first.
    let (ctype, _) = metrics_with(
        &n1,
        Some("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"),
    )
    .await;
    assert!(ctype.starts_with("application/openmetrics-text"));

    let out = piped(
        "promtool",
        &["check", "metrics"],
        &text,
        "promtool: run scripts/test, which installs prometheus",
    );
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    for (body, openmetrics) in [(&om, true), (&text, false)] {
        let s = python_samples(body, openmetrics);
        let has = |name: &str, label: Option<(&str, &str)>| {
            assert!(
                sample(&s, name, label).is_some(),
                "{name} {label:?} missing ({}):\n{body}",
                if openmetrics { "OpenMetrics" } else { "text" }
            )
        };
        has("syncnode_sync_sent_bytes_total", None);
        has("syncnode_sync_received_bytes_total", None);
        has("syncnode_membership_sent_bytes_total", None);
        has("syncnode_writes_accepted_total", None);
        has("syncnode_reads_total", Some(("tier", "l1")));
        has("syncnode_reads_total", Some(("tier", "missing")));
        has("syncnode_peer_lag_seconds", None);
        has("syncnode_build_info", Some(("version", env!("CARGO_PKG_VERSION"))));
        has("process_cpu_seconds_total", None);
        has("process_resident_memory_bytes", None);
        has("process_open_fds", None);
        has("syncnode_commit_duration_seconds_count", None);
        has("syncnode_session_duration_seconds_bucket", None);
        has("syncnode_cdc_apply_duration_seconds_sum", None);
        has(
            "syncnode_http_request_duration_seconds_count",
            Some(("route", "/v1/items/{id}")),
        );
        has("syncnode_http_connections_open", None);
        assert!(
            s.iter().any(|(n, _, _)| n.starts_with("syncnode_libp2p_")),
            "libp2p's metrics are missing:\n{body}"
        );
        for old in [
            "syncnode_peer_lag_ms",
            "syncnode_reads_l1_total",
            "syncnode_sync_bytes_sent_total",
        ] {
            assert!(!s.iter().any(|(n, _, _)| n == old), "{old} is still exported");
        }
        // Routes, not raw paths: an id never becomes a label.
        assert!(!s.iter().any(|(_, l, _)| l["route"] == "/v1/items/m.1"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_default_to_info_without_ansi_and_come_as_json_when_asked() {
    let redis = std::env::var("REDIS_URL").expect("REDIS_URL is set by scripts/test (run the tests with it)");
    let (d1, d2, d3) = (tmp(), tmp(), tmp());
    let mut a1 = args("surface-logs", &["--redis-url", &redis]);
    a1.extend(["--redis-prefix".into(), format!("surface-logs-{}:", std::process::id())]);
    let n1 = spawn_default_logs(d1.path(), a1).await;
    n1.api
        .ok_json(n1.api.put_item("l.1", Bytes::from_static(b"{\"a\":1}"), true).await)
        .await
        .unwrap();
    n1.api.get_item("l.1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = stderr_of(&n1);
    let start = log
        .lines()
        .find(|l| l.contains("node running"))
        .unwrap_or_else(|| panic!("no INFO start line:\n{log}"));
    assert!(start.contains(" INFO "), "{start}");
    for field in [
        "version=",
        &format!("peer_id={}", n1.peer_id),
        "advertise=",
        "l3=sqlite://",
        "l2=redis://",
        "cluster=surface-logs",
        "psk=none",
    ] {
        assert!(start.contains(field), "start line lacks {field}: {start}");
    }
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escapes in a log that is not a terminal:\n{log}"
    );
    assert!(!log.contains("empty command"), "spurious Redis WARN:\n{log}");
    assert!(
        !log.contains("beyond loopback"),
        "a loopback node WARNs of exposure:\n{log}"
    );

    // JSON lines, and the exposure WARNs of a node listening on every interface.
    let a2: Vec<String> = [
        "--listen",
        "/ip4/0.0.0.0/tcp/0",
        "--http",
        "0.0.0.0:0",
        "--cluster-id",
        "surface-logs2",
        "--log-format",
        "json",
    ]
    .map(String::from)
    .to_vec();
    let n2 = spawn_default_logs(d2.path(), a2).await;
    let log = stderr_of(&n2);
    let lines: Vec<Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["level"] == "INFO" && l["fields"]["message"] == "node running"),
        "{log}"
    );
    let warns: Vec<&Value> = lines.iter().filter(|l| l["level"] == "WARN").collect();
    for what in ["without api_token", "without psk_file"] {
        assert!(
            warns
                .iter()
                .any(|l| l["fields"]["message"].as_str().unwrap_or("").contains(what)),
            "no WARN {what}:\n{log}"
        );
    }
    drop(n2);

    // A bad log level is invalid configuration: exit code 3.
    let (code, _, err) = cli(
        &[
            "run",
            "--data-dir",
            d3.path().to_str().unwrap(),
            "--log-level",
            "x=verbose",
        ],
        b"",
    )
    .await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("log_level"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_commands_output_json_and_exit_codes() {
    let d = tmp();
    let n = Proc::spawn(bin(), d.path(), args("surface-cli", &[])).await.unwrap();
    let api = n.http.clone();
    let api = api.as_str();

    // put ID - reads stdin; a missing value says so, with exit code 3.
    let (code, out, err) = cli(&["put", "--api", api, "c.1", "-"], b"{\"from\":\"stdin\"}").await;
    assert_eq!(code, 0, "{err}");
    let receipt: Value = serde_json::from_str(&out).unwrap();
    assert!(receipt["version"].is_string(), "versions are strings: {receipt}");
    let (_, out, _) = cli(&["get", "--api", api, "c.1"], b"").await;
    assert_eq!(out, "{\"from\":\"stdin\"}");
    let (code, _, err) = cli(&["put", "--api", api, "c.2"], b"").await;
    assert_eq!(code, 3);
    assert!(err.contains("no value"), "{err}");
    for i in 2..=4 {
        let (code, _, err) = cli(
            &["put", "--api", api, &format!("c.{i}"), &format!("{{\"i\":{i}}}")],
            b"",
        )
        .await;
        assert_eq!(code, 0, "{err}");
    }

    // -o json on the read commands.
    let (code, out, err) = cli(&["get", "-o", "json", "--api", api, "c.1"], b"").await;
    assert_eq!(code, 0, "{err}");
    let item: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(item["content"]["from"], "stdin");
    assert_eq!(item["version"], receipt["version"]);
    let (code, out, err) = cli(
        &[
            "scan", "-o", "json", "--api", api, "--prefix", "c.", "--limit", "1", "--all",
        ],
        b"",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let scan: Value = serde_json::from_str(&out).unwrap();
    let ids: Vec<&str> = scan["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["c.1", "c.2", "c.3", "c.4"]);
    for cmd in ["peers", "members", "status"] {
        let (code, out, err) = cli(&[cmd, "-o", "json", "--api", api], b"").await;
        assert_eq!(code, 0, "{cmd}: {err}");
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{cmd} -o json ({e}): {out}"));
        match cmd {
            "peers" => assert!(v.is_array()),
            "members" => assert_eq!(v["self"]["peer_id"], n.peer_id.as_str()),
            _ => assert_eq!(v["health"]["peer_id"], n.peer_id.as_str()),
        }
    }
    n.api
        .ok_json(
            n.api
                .post_json(
                    "/v1/indexes",
                    &json!({"name": "cli", "prefix": "c.", "fields": [{"name": "i", "type": "numeric"}]}),
                )
                .await,
        )
        .await
        .unwrap();
    let (code, out, err) = cli(
        &[
            "search",
            "-o",
            "json",
            "--api",
            api,
            "--tier",
            "sql",
            "cli",
            "{\"range\":{\"field\":\"i\",\"min\":3}}",
        ],
        b"",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let found: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(found["ids"], json!(["c.3", "c.4"]));
    let (code, _, err) = cli(&["search", "--api", api, "cli", "{not json"], b"").await;
    assert_eq!((code, err.contains("not JSON")), (3, true), "{err}");

    // status --watch into a pipe: reports one after another, no screen codes.
    let mut watch = tokio::process::Command::new(bin())
        .args(["status", "--watch", "300ms", "--api", api])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = watch.stdout.take().unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = Vec::new();
    let until = Instant::now() + Duration::from_secs(3);
    while got.windows(4).filter(|w| w == b"peer").count() < 2 && Instant::now() < until {
        if let Ok(Ok(k)) = tokio::time::timeout(Duration::from_millis(500), stdout.read(&mut buf)).await {
            got.extend_from_slice(&buf[..k]);
        }
    }
    watch.kill().await.unwrap();
    let got = String::from_utf8_lossy(&got);
    assert!(got.matches("state ").count() >= 2, "two reports expected: {got}");
    assert!(!got.contains('\u{1b}'), "screen codes in a pipe: {got:?}");

    // Exit codes: usage 2, invalid configuration 3, failure 1 with the cause.
    let (code, _, _) = cli(&["get", "--no-such-flag"], b"").await;
    assert_eq!(code, 2);
    let bad = d.path().join("bad.toml");
    std::fs::write(&bad, "wal_path = \"/x\"\n").unwrap();
    let other = tmp();
    let (code, _, err) = cli(
        &[
            "run",
            "--config",
            bad.to_str().unwrap(),
            "--data-dir",
            other.path().to_str().unwrap(),
        ],
        b"",
    )
    .await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("unknown field") && err.contains("wal_path"), "{err}");
    let (code, _, err) = cli(&["get", "--api", "127.0.0.1:1", "x"], b"").await;
    assert_eq!(code, 1);
    assert!(
        err.contains("Connection refused") && !err.contains("Backtrace"),
        "{err}"
    );

    // A damaged identity and an unusable data dir name themselves.
    let broken = tmp();
    std::fs::write(broken.path().join("identity.key"), b"\x08\x01\x12").unwrap();
    let (code, _, err) = cli(&["keygen", "--data-dir", broken.path().to_str().unwrap()], b"").await;
    assert_eq!(code, 1);
    assert!(
        err.contains("identity.key is damaged") && !err.contains("feature"),
        "{err}"
    );
    let file = broken.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let inside = file.join("data");
    let (code, _, err) = cli(&["keygen", "--data-dir", inside.to_str().unwrap()], b"").await;
    assert_eq!(code, 1);
    assert!(err.contains(inside.to_str().unwrap()), "{err}");

    // --help documents every argument and option of every subcommand.
    let (_, top, _) = cli(&["--help"], b"").await;
    let subcommands: Vec<String> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect();
    assert!(subcommands.len() >= 15, "{top}");
    for sub in subcommands {
        let (code, help, err) = cli(&[&sub, "-h"], b"").await;
        assert_eq!(code, 0, "{sub}: {err}");
        let mut section = false;
        let lines: Vec<&str> = help.lines().collect();
        let is_entry = |l: &str| {
            let e = l.trim_start();
            l.starts_with("  ") && (e.starts_with('-') || e.starts_with('<') || e.starts_with('['))
        };
        for (i, line) in lines.iter().enumerate() {
            if line.ends_with(':') && !line.starts_with(' ') {
                section = *line == "Arguments:" || *line == "Options:";
                continue;
            }
            if section && is_entry(line) {
                let entry = line.trim_start();
                // The description follows on the line, or (long help) on the next one.
                let inline = entry.split_once("  ").is_some_and(|(_, d)| !d.trim().is_empty());
                let below = lines
                    .get(i + 1)
                    .is_some_and(|n| !is_entry(n) && n.starts_with("    ") && !n.trim().is_empty());
                assert!(
                    inline || below,
                    "`syncnode {sub} -h` leaves {entry:?} undocumented:\n{help}"
                );
            }
        }
    }

    // The demo: the number of items asked, and plain text in a pipe.
    let (code, out, err) = cli(&["demo", "--items", "500"], b"").await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("500 items written"), "{out}");
    assert!(!out.contains('\u{1b}') && !err.contains('\u{1b}'), "{out}{err}");
    // No WARN from its own steps (a session cut off by a partition or by
    // the shutdown). A WARN about a foreign incoming connection can come
    // from another test's node redialing a port the demo now uses.
    for line in err.lines().filter(|l| l.contains("WARN")) {
        assert!(
            line.contains("incoming connection failed"),
            "the demo warned: {line}\n{err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_what_can_change_and_names_what_cannot() {
    let d = tmp();
    let config = d.path().join("node.toml");
    let keys = "sql_timeout_ms = 4000\ncommit_log_max_items = 100000\ncommit_log_max_bytes = 100000000\n\
                batch_flush_count = 500\nbatch_flush_bytes = 1000000\ncommit_log_drain_batch = 100\n\
                snapshot_interval_secs = 10\nsql_max_connections = 4\nwarm_up_items = 100\n\
                max_clock_skew_ms = 500\nl1_max_bytes = 67108864\nlog_level = \"info\"\n";
    std::fs::write(&config, format!("{keys}max_payload_bytes = 1000\nregion = \"a\"\n")).unwrap();
    let mut a = args("surface-hup", &[]);
    a.extend(["--config".into(), config.display().to_string()]);
    let n = spawn_default_logs(&d.path().join("data"), a).await;
    let big = Bytes::from(vec![b'x'; 2000]);
    let r = n.api.put_item("h.1", big.clone(), false).await.unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    std::fs::write(&config, format!("{keys}max_payload_bytes = 100000\nregion = \"b\"\n")).unwrap();
    let pid = n.child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    eventually("the larger payload limit", Duration::from_secs(10), || async {
        let r = n
            .api
            .put_item("h.1", big.clone(), false)
            .await
            .map_err(|e| e.to_string())?;
        if r.status == 200 { Ok(()) } else { Err(r.text()) }
    })
    .await;
    let log = stderr_of(&n);
    assert!(
        log.lines()
            .any(|l| l.contains("config reloaded") && l.contains("max_payload_bytes")),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("next restart") && l.contains("region")),
        "{log}"
    );
    // A config that does not check keeps the running one.
    std::fs::write(&config, "no_such_key = 1\n").unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    eventually("the reload error", Duration::from_secs(10), || async {
        let log = stderr_of(&n);
        if log.contains("config reload failed") {
            Ok(())
        } else {
            Err(log)
        }
    })
    .await;
    assert_eq!(n.api.put_item("h.2", big.clone(), false).await.unwrap().status, 200);
}

async fn call(
    p: &Proc,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, hyper::HeaderMap, Bytes) {
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", p.http));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let resp = client
        .request(
            req.body(http_body_util::Full::new(Bytes::copy_from_slice(body)))
                .unwrap(),
        )
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = http_body_util::BodyExt::collect(body).await.unwrap().to_bytes();
    (parts.status.as_u16(), parts.headers, body)
}

fn error_of(body: &Bytes) -> String {
    let v: Value = serde_json::from_slice(body).unwrap_or_else(|_| panic!("not the JSON error shape: {body:?}"));
    assert!(v["detail"].is_string(), "{v}");
    v["error"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_requests_cursors_and_json_errors() {
    let d = tmp();
    let n = Proc::spawn(bin(), d.path(), args("surface-http", &["--api-token", "sesame"]))
        .await
        .unwrap();
    let auth = ("authorization", "bearer sesame");
    // The scheme is case-insensitive.
    let (status, _, _) = call(&n, "GET", "/health", &[auth], b"").await;
    assert_eq!(status, 200);
    let auth = ("authorization", "Bearer sesame");

    let (status, _, body) = call(&n, "PUT", "/v1/items/k", &[auth], b"one").await;
    assert_eq!(status, 200);
    let v1: Value = serde_json::from_slice(&body).unwrap();
    let (_, h, _) = call(&n, "GET", "/v1/items/k", &[auth], b"").await;
    let etag = h["etag"].to_str().unwrap().to_string();
    assert_eq!(h["x-version"].to_str().unwrap(), v1["version"].as_str().unwrap());
    // GET with a matching If-None-Match: 304.
    let (status, h, body) = call(&n, "GET", "/v1/items/k", &[auth, ("if-none-match", &etag)], b"").await;
    assert_eq!((status, body.len()), (304, 0));
    assert_eq!(h["etag"].to_str().unwrap(), etag);
    // If-Match is checked first (412, not 304) and compares strongly.
    let (status, _, _) = call(
        &n,
        "GET",
        "/v1/items/k",
        &[auth, ("if-match", "\"00\""), ("if-none-match", &etag)],
        b"",
    )
    .await;
    assert_eq!(status, 412);
    let weak = format!("W/{etag}");
    let (status, _, _) = call(&n, "PUT", "/v1/items/k", &[auth, ("if-match", &weak)], b"one").await;
    assert_eq!(status, 412, "a weak tag never matches If-Match");
    let (status, _, _) = call(&n, "GET", "/v1/items/k", &[auth, ("if-none-match", &weak)], b"").await;
    assert_eq!(status, 304, "If-None-Match compares weakly");
    // PUT If-Match: a stale tag fails, the current one wins.
    let (status, _, body) = call(&n, "PUT", "/v1/items/k", &[auth, ("if-match", "\"00\"")], b"two").await;
    assert_eq!((status, error_of(&body).as_str()), (412, "precondition_failed"));
    let (status, _, _) = call(&n, "PUT", "/v1/items/k", &[auth, ("if-match", &etag)], b"two").await;
    assert_eq!(status, 200);
    // The old tag is stale now: compare-and-set lets one writer through.
    let (status, _, _) = call(&n, "PUT", "/v1/items/k", &[auth, ("if-match", &etag)], b"three").await;
    assert_eq!(status, 412);
    // If-None-Match: * creates only.
    let (status, _, _) = call(&n, "PUT", "/v1/items/k", &[auth, ("if-none-match", "*")], b"x").await;
    assert_eq!(status, 412);
    let (status, _, _) = call(&n, "PUT", "/v1/items/fresh", &[auth, ("if-none-match", "*")], b"x").await;
    assert_eq!(status, 200);
    let (status, _, _) = call(&n, "DELETE", "/v1/items/fresh", &[auth, ("if-match", "\"00\"")], b"").await;
    assert_eq!(status, 412);
    let (status, _, _) = call(&n, "DELETE", "/v1/items/fresh", &[auth, ("if-match", "*")], b"").await;
    assert_eq!(status, 200);
    let (status, _, _) = call(&n, "DELETE", "/v1/items/fresh", &[auth, ("if-match", "*")], b"").await;
    assert_eq!(status, 412, "If-Match: * on a deleted item");
    let (_, _, body) = call(&n, "GET", "/v1/items/fresh/status", &[auth], b"").await;
    let st: Value = serde_json::from_slice(&body).unwrap();
    assert!(st["deleted"]["version"].is_string(), "{st}");

    // Scans page with a cursor.
    for i in 0..25 {
        call(&n, "PUT", &format!("/v1/items/p.{i:02}"), &[auth], b"v").await;
    }
    let (mut seen, mut after) = (Vec::new(), None::<String>);
    let mut pages = 0;
    while pages < 10 {
        let path = match &after {
            Some(a) => format!("/v1/items?prefix=p.&limit=10&after={a}"),
            None => "/v1/items?prefix=p.&limit=10".into(),
        };
        let (status, _, body) = call(&n, "GET", &path, &[auth], b"").await;
        assert_eq!(status, 200);
        let page: Value = serde_json::from_slice(&body).unwrap();
        pages += 1;
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["id"].as_str().unwrap().to_string()),
        );
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, (0..25).map(|i| format!("p.{i:02}")).collect::<Vec<_>>());
    assert_eq!(pages, 3);
    let (status, _, body) = call(&n, "GET", "/v1/items?after=zz", &[auth], b"").await;
    assert_eq!((status, error_of(&body).as_str()), (400, "bad_request"));

    // Every rejection has the JSON shape.
    let (status, _, body) = call(&n, "PATCH", "/v1/items/k", &[auth], b"").await;
    assert_eq!((status, error_of(&body).as_str()), (405, "method_not_allowed"));
    let (status, _, body) = call(
        &n,
        "POST",
        "/v1/indexes",
        &[auth, ("content-type", "application/json")],
        b"{\"nope\":1}",
    )
    .await;
    assert_eq!((status, error_of(&body).as_str()), (422, "unprocessable"));
    let (status, _, body) = call(&n, "GET", "/v1/nothing", &[auth], b"").await;
    assert_eq!((status, error_of(&body).as_str()), (404, "not_found"));
    let (status, _, body) = call(&n, "GET", "/v1/peers", &[], b"").await;
    assert_eq!((status, error_of(&body).as_str()), (401, "unauthorized"));

    // The OpenAPI document describes every endpoint, and each it lists is served.
    let (status, _, body) = call(&n, "GET", "/v1/openapi.json", &[auth], b"").await;
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 22, "{} paths", paths.len());
    let stranger = libp2p::PeerId::random().to_string();
    for (path, ops) in paths {
        let concrete = path
            .replace("{id}", "openapi.probe")
            .replace("{name}", "none")
            .replace("{path}", "root")
            .replace("{peer}", &stranger);
        for (verb, op) in ops.as_object().unwrap() {
            assert!(op["summary"].as_str().is_some_and(|s| !s.is_empty()), "{verb} {path}");
            let (status, _, body) = call(&n, &verb.to_uppercase(), &concrete, &[auth], b"").await;
            let unknown = status == 404 && body.windows(17).any(|w| w == b"no such endpoint");
            assert!(
                !unknown && status != 405,
                "{verb} {path} is described but not served ({status})"
            );
        }
    }

    // Indexes are listed; the search tiers take DESIGN §7's names.
    let index = json!({"name": "ps", "prefix": "p.", "fields": [{"name": "n", "type": "numeric"}]});
    let (status, _, _) = call(
        &n,
        "POST",
        "/v1/indexes",
        &[auth, ("content-type", "application/json")],
        index.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 201);
    let (status, _, body) = call(&n, "GET", "/v1/indexes", &[auth], b"").await;
    assert_eq!(status, 200);
    let list: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(list["indexes"][0]["name"], "ps");
    let search = json!({"query": {"range": {"field": "n", "min": 0}}, "tier": "sql"});
    let (status, _, body) = call(
        &n,
        "POST",
        "/v1/indexes/ps/search",
        &[auth, ("content-type", "application/json")],
        search.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{body:?}");
}

/// Opens `n` connections to `addr` that each send half a request header.
async fn half_open(addr: &str, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /livez HTTP/1.1\r\nHost: slow\r\n").await.unwrap();
        out.push(s);
    }
    out
}

/// One request on a connection of its own, closed after the answer.
async fn raw_get(addr: &str, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .expect("an answer")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the server closed `s` (EOF or reset) within `wait`.
async fn closed(s: &mut tokio::net::TcpStream, wait: Duration) -> bool {
    let mut b = [0u8; 256];
    loop {
        match tokio::time::timeout(wait, s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A 408 answer or the like before the close.
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_neither_stop_the_api_nor_replication_and_are_cut_off() {
    let (d1, d2, d3) = (tmp(), tmp(), tmp());
    let n1 = Proc::spawn(bin(), d1.path(), args("surface-slow", &["--http-header-timeout", "8s"]))
        .await
        .unwrap();
    let mut a2 = args("surface-slow", &[]);
    a2.extend(["--bootstrap".to_string(), n1.addr.clone()]);
    let n2 = Proc::spawn(bin(), d2.path(), a2).await.unwrap();
    let mut slow = half_open(&n1.http, 2000).await;
    let opened = Instant::now();
    // Each holds a connection, and the API answers meanwhile.
    eventually("2000 connections open", Duration::from_secs(5), || async {
        let open = n1
            .metric("syncnode_http_connections_open")
            .await
            .map_err(|e| e.to_string())?;
        if open >= 2000.0 {
            Ok(())
        } else {
            Err(format!("{open} open"))
        }
    })
    .await;
    assert_eq!(n1.api.get("/livez").await.unwrap().status, 200);
    // A write on n2 reaches n1.
    n2.api
        .ok_json(n2.api.put_item("slow.1", Bytes::from_static(b"through"), false).await)
        .await
        .unwrap();
    eventually("the write from n2 on n1", Duration::from_secs(30), || async {
        let a = n1.api.get_item("slow.1").await.map_err(|e| e.to_string())?;
        if a.status == 200 { Ok(()) } else { Err(a.text()) }
    })
    .await;
    // Every half-open connection is closed once the header timeout passes.
    for s in &mut slow {
        let left = Duration::from_secs(25).saturating_sub(opened.elapsed());
        assert!(
            closed(s, left).await,
            "a half-open connection outlived the header timeout"
        );
    }
    eventually("the connections gone", Duration::from_secs(10), || async {
        let open = n1
            .metric("syncnode_http_connections_open")
            .await
            .map_err(|e| e.to_string())?;
        if open < 10.0 {
            Ok(())
        } else {
            Err(format!("{open} open"))
        }
    })
    .await;

    // A body that stalls after its header is cut off by the idle timeout.
    let n3 = Proc::spawn(
        bin(),
        d3.path(),
        args(
            "surface-slow3",
            &[
                "--http-header-timeout",
                "2s",
                "--http-idle-timeout",
                "2s",
                "--http-max-connections",
                "10",
            ],
        ),
    )
    .await
    .unwrap();
    let mut stalled = tokio::net::TcpStream::connect(&n3.http).await.unwrap();
    stalled
        .write_all(b"PUT /v1/items/stall HTTP/1.1\r\nHost: n\r\nContent-Length: 100000\r\n\r\nfirst bytes")
        .await
        .unwrap();
    assert!(
        closed(&mut stalled, Duration::from_secs(15)).await,
        "a stalled request body held its connection"
    );
    let metrics = raw_get(&n3.http, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("syncnode_http_connections_idle_closed_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );

    // The cap: past it, a client waits for a slot instead of taking one more fd.
    let mut held = half_open(&n3.http, 10).await;
    // (raw requests with `Connection: close`: no pooled connection holds a slot)
    let answered = raw_get(&n3.http, "/livez").await;
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    // It was answered only after a held connection was let go.
    let mut freed = 0;
    for s in &mut held {
        freed += usize::from(closed(s, Duration::from_millis(10)).await);
    }
    assert!(freed > 0, "answered while all 10 slots were held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_requests_in_flight() {
    let d = tmp();
    let mut n = Proc::spawn(bin(), d.path(), args("surface-drain", &[])).await.unwrap();
    let mut s = tokio::net::TcpStream::connect(&n.http).await.unwrap();
    let body = vec![b'y'; 1000];
    s.write_all(b"PUT /v1/items/drain HTTP/1.1\r\nHost: n\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&body[..500]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = n.child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.write_all(&body[500..]).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let status = tokio::time::timeout(Duration::from_secs(30), n.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    // The write answered during the drain is there after a restart.
    let n = Proc::spawn(bin(), d.path(), args("surface-drain", &[])).await.unwrap();
    assert_eq!(n.api.get_item("drain").await.unwrap().body.len(), 1000);
}

async fn search_status(p: &Proc, index: &str, query: Value) -> (u16, Value) {
    let a = p
        .api
        .post_json(
            &format!("/v1/indexes/{index}/search"),
            &json!({"query": query, "tier": "sql"}),
        )
        .await
        .unwrap();
    (a.status.as_u16(), a.json().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_definitions_replicate_and_the_engine_ids_stay_hidden() {
    let (d1, d2, d3) = (tmp(), tmp(), tmp());
    let n1 = Proc::spawn(bin(), d1.path(), args("surface-idx", &[])).await.unwrap();
    let mut a2 = args("surface-idx", &[]);
    a2.extend(["--bootstrap".to_string(), n1.addr.clone()]);
    let n2 = Proc::spawn(bin(), d2.path(), a2).await.unwrap();
    for (id, city) in [("u.1", "oslo"), ("u.2", "rome")] {
        n1.api
            .ok_json(
                n1.api
                    .put_item(id, Bytes::from(json!({ "city": city }).to_string()), true)
                    .await,
            )
            .await
            .unwrap();
    }
    let def = json!({"name": "cities", "prefix": "u.", "fields": [{"name": "city", "type": "tag"}]});
    let created = n1.api.post_json("/v1/indexes", &def).await.unwrap();
    assert_eq!(created.status, 201, "{}", created.text());
    let oslo = json!({"tags": {"field": "city", "values": ["oslo"]}});
    // Created on n1, searchable on n2.
    eventually("the index on n2", Duration::from_secs(30), || async {
        match search_status(&n2, "cities", oslo.clone()).await {
            (200, v) if v["ids"] == json!(["u.1"]) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let listed = n2.api.ok_json(n2.api.get("/v1/indexes").await).await.unwrap();
    assert_eq!(listed["indexes"][0]["name"], "cities");
    assert_eq!(listed["indexes"][0]["fields"][0]["type"], "tag");
    // Search answers page with a cursor.
    let both = json!({"tags": {"field": "city", "values": ["oslo", "rome"]}});
    let (mut seen, mut after) = (Vec::new(), None::<String>);
    for pages in 0.. {
        assert!(pages < 10, "the search cursor does not move");
        let mut body = json!({"query": both, "tier": "sql", "limit": 1});
        if let Some(a) = &after {
            body["after"] = json!(a);
        }
        let page = n2
            .api
            .ok_json(n2.api.post_json("/v1/indexes/cities/search", &body).await)
            .await
            .unwrap();
        seen.extend(
            page["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_str().unwrap().to_string()),
        );
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, ["u.1", "u.2"]);
    // The definition's item is the engine's: not in scans, not writable.
    let scan = n2.api.ok_json(n2.api.get("/v1/items?limit=100").await).await.unwrap();
    let ids: Vec<&str> = scan["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["u.1", "u.2"]);
    let refused = n1
        .api
        .put_item("_syncnode/index/cities", Bytes::from_static(b"{}"), true)
        .await
        .unwrap();
    assert_eq!(refused.status, 400, "{}", refused.text());
    let refused = n1.api.delete_item("_syncnode/index/cities").await.unwrap();
    assert_eq!(refused.status, 400, "{}", refused.text());

    // A node that joins later learns it by anti-entropy.
    let mut a3 = args("surface-idx", &[]);
    a3.extend(["--bootstrap".to_string(), n2.addr.clone()]);
    let n3 = Proc::spawn(bin(), d3.path(), a3).await.unwrap();
    eventually("the index on n3", Duration::from_secs(30), || async {
        match search_status(&n3, "cities", oslo.clone()).await {
            (200, v) if v["ids"] == json!(["u.1"]) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Dropped on n2, gone everywhere.
    let dropped = n2
        .api
        .call(hyper::Method::DELETE, "/v1/indexes/cities", None)
        .await
        .unwrap();
    assert_eq!(dropped.status, 200, "{}", dropped.text());
    for n in [&n1, &n3] {
        eventually("the drop everywhere", Duration::from_secs(30), || async {
            match search_status(n, "cities", oslo.clone()).await {
                (404, v) if v["error"] == "unknown_index" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_port_answers_livez_while_the_node_starts() {
    use sqlx::Connection;
    let d = tmp();
    // A node that ran once: its database exists.
    let n = Proc::spawn(bin(), d.path(), args("surface-start", &[])).await.unwrap();
    n.api
        .ok_json(n.api.put_item("s.1", Bytes::from_static(b"x"), false).await)
        .await
        .unwrap();
    drop(n);
    // Another process holds the database: the next start waits on it.
    let db = d.path().join("l3.sqlite");
    let mut lock = sqlx::sqlite::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::raw_sql("BEGIN EXCLUSIVE").execute(&mut lock).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let http = format!("127.0.0.1:{port}");
    let mut a = args("surface-start", &["--sql-timeout-ms", "60000"]);
    let at = a.iter().position(|x| x == "127.0.0.1:0").unwrap();
    a[at] = http.clone();
    let starting = tokio::spawn({
        let dir = d.path().to_path_buf();
        async move { Proc::spawn(bin(), &dir, a).await }
    });
    // While it waits: alive, not ready, and saying why.
    eventually("/livez during the start", Duration::from_secs(30), || async {
        let s = raw_get_opt(&http, "/livez").await.ok_or("refused")?;
        if s.starts_with("HTTP/1.1 200") { Ok(()) } else { Err(s) }
    })
    .await;
    let ready = raw_get_opt(&http, "/readyz").await.unwrap();
    assert!(
        ready.starts_with("HTTP/1.1 503") && ready.contains("starting"),
        "{ready}"
    );
    let other = raw_get_opt(&http, "/v1/items/s.1").await.unwrap();
    assert!(
        other.starts_with("HTTP/1.1 503") && other.contains("not_ready"),
        "{other}"
    );
    assert!(!starting.is_finished(), "the node started while its database was held");
    sqlx::raw_sql("COMMIT").execute(&mut lock).await.unwrap();
    drop(lock);
    let n = starting.await.unwrap().unwrap();
    assert_eq!(n.http, http);
    // L1 is warmed with the stored items (warm_up_items) before any read.
    eventually("L1 warmed up", Duration::from_secs(10), || async {
        let h = n
            .api
            .ok_json(n.api.get("/health").await)
            .await
            .map_err(|e| e.to_string())?;
        if h["l1_items"].as_u64() == Some(1) {
            Ok(())
        } else {
            Err(h.to_string())
        }
    })
    .await;
    assert_eq!(n.api.get_item("s.1").await.unwrap().status, 200);
}

/// `raw_get`, or `None` when the port refuses the connection.
async fn raw_get_opt(addr: &str, path: &str) -> Option<String> {
    tokio::net::TcpStream::connect(addr).await.ok()?;
    Some(raw_get(addr, path).await)
}

/// `curl` with `args`; its stdout.
fn curl(args: &[&str]) -> String {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl is missing: run scripts/test, which installs it");
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_items_content_type_is_kept_replicated_and_returned() {
    use sqlx::Connection;
    let (d1, d2) = (tmp(), tmp());
    // n2 starts on a database made before media types: its table gains the column.
    let db = d2.path().join("l3.sqlite");
    let mut old = sqlx::sqlite::SqliteConnection::connect(&format!("sqlite://{}?mode=rwc", db.display()))
        .await
        .unwrap();
    sqlx::raw_sql(
        "CREATE TABLE sync_items (
            id BLOB PRIMARY KEY NOT NULL, version INTEGER NOT NULL, origin BLOB NOT NULL,
            updated_at INTEGER NOT NULL, content_type INTEGER NOT NULL, content BLOB NOT NULL,
            content_hash BLOB NOT NULL, state BLOB NOT NULL, tombstone INTEGER NOT NULL,
            access_count INTEGER NOT NULL, last_accessed INTEGER NOT NULL, trace_parent BLOB,
            hkey INTEGER NOT NULL, l2 INTEGER NOT NULL)",
    )
    .execute(&mut old)
    .await
    .unwrap();
    old.close().await.unwrap();

    let n1 = Proc::spawn(bin(), d1.path(), args("surface-ctype", &[])).await.unwrap();
    let mut a2 = args("surface-ctype", &[]);
    a2.extend(["--bootstrap".to_string(), n1.addr.clone()]);
    let n2 = Proc::spawn(bin(), d2.path(), a2).await.unwrap();
    let url = |p: &Proc, id: &str| format!("http://{}/v1/items/{id}", p.http);
    let ctype_of = |p: &Proc, id: &str| curl(&["-o", "/dev/null", "-w", "%{content_type}", &url(p, id)]);

    let md = "text/markdown; charset=utf-8";
    curl(&[
        "-f",
        "-X",
        "PUT",
        "-H",
        &format!("Content-Type: {md}"),
        "--data-binary",
        "# notes",
        &url(&n1, "doc.md"),
    ]);
    assert_eq!(ctype_of(&n1, "doc.md"), md);
    // Without a Content-Type of its own, an item answers as before.
    curl(&[
        "-f",
        "-X",
        "PUT",
        "-H",
        "Content-Type:",
        "--data-binary",
        "{\"a\":1}",
        &url(&n1, "plain"),
    ]);
    assert_eq!(ctype_of(&n1, "plain"), "application/json");
    // The CLI sets one too.
    let api = format!("http://{}", n1.http);
    let (code, _, err) = cli(
        &["put", "--api", &api, "--content-type", "image/svg+xml", "pic", "<svg/>"],
        b"",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(ctype_of(&n1, "pic"), "image/svg+xml");
    // A malformed one is refused with the JSON error shape.
    let (status, _, body) = call(&n1, "PUT", "/v1/items/bad", &[("content-type", "no slash")], b"x").await;
    assert!(matches!(status, 400 | 422), "{status}");
    assert!(error_of(&body).len() > 1);
    let (status, _, _) = call(
        &n1,
        "PUT",
        "/v1/items/bad",
        &[("content-type", &format!("text/{}", "x".repeat(300)))],
        b"x",
    )
    .await;
    assert!(matches!(status, 400 | 422), "{status}");

    // Replicated: n2 answers with the writer's media type, in GET and in
    // the item's JSON.
    eventually("doc.md on n2", Duration::from_secs(30), || async {
        match call(&n2, "GET", "/v1/items/doc.md", &[], b"").await {
            (200, h, body) if &body[..] == b"# notes" => Ok(h["content-type"].to_str().unwrap().to_string()),
            other => Err(format!("{other:?}")),
        }
        .and_then(|c| if c == md { Ok(()) } else { Err(c) })
    })
    .await;
    let get_on = |p: &Proc, ids: Value| {
        let api = p.api.clone();
        async move {
            api.ok_json(api.post_json("/v1/get", &json!({ "ids": ids })).await)
                .await
                .unwrap()
        }
    };
    let ids = json!(["doc.md", "plain", "pic"]);
    eventually("pic and plain on n2", Duration::from_secs(30), || async {
        let got = get_on(&n2, ids.clone()).await;
        match got.as_array() {
            Some(a) if a.iter().all(Value::is_object) => Ok(()),
            _ => Err(got.to_string()),
        }
    })
    .await;
    let got = get_on(&n2, ids).await;
    assert_eq!(got[0]["media_type"], md, "{got}");
    assert_eq!(got[1]["content"], json!({"a": 1}), "{got}");
    assert!(got[1].get("media_type").is_none(), "{got}");
    assert_eq!(got[2]["media_type"], "image/svg+xml", "{got}");
    assert_eq!(ctype_of(&n2, "pic"), "image/svg+xml");
    // An empty Content-Type is none; the default in another case is the default.
    for (id, ctype) in [("e.1", ""), ("e.2", "Application/JSON")] {
        let (status, _, _) = call(
            &n1,
            "PUT",
            &format!("/v1/items/{id}"),
            &[("content-type", ctype)],
            b"[1]",
        )
        .await;
        assert_eq!(status, 200, "{ctype:?}");
    }
    let got = get_on(&n1, json!(["e.1", "e.2"])).await;
    for g in got.as_array().unwrap() {
        assert!(g.is_object() && g.get("media_type").is_none(), "{got}");
    }

    // Kept across a restart (read back from L3, L1 empty).
    let n2 = n2.restart(bin()).await.unwrap();
    assert_eq!(ctype_of(&n2, "doc.md"), md);
    drop(n1);
}
