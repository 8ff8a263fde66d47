//! Hosts on a LAN, made of network namespaces, for tests that cut real links.
//!
//! The switch is a bridge inside a namespace of its own, so the root
//! namespace's firewall (Docker sets FORWARD to DROP, with
//! `bridge-nf-call-iptables` on) never sees the traffic between hosts, and
//! the container tests and these cannot break each other. Each host is a
//! namespace with two links:
//! - `lan`: a veth to the switch, `10.78.<n>.<i+1>/24`, where nodes talk;
//! - `mgmt`: a veth straight to the root namespace, `10.79.<n>.<4i+2>/30`,
//!   where the test reaches the node's HTTP API; it never carries
//!   replication traffic, so cutting the LAN leaves the API reachable.
//!
//! Faults are made the way networks fail: a switch port down (with or
//! without aborting the TCP connections across it, `ss -K`), or a firewall
//! rule in one host dropping what one peer sends (a one-way cut, nftables).
//! Everything is removed on drop. Needs root.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Runs a command, panicking with its stderr when it fails.
pub fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}; ./scripts/test installs iproute2 and nftables"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program).args(args).output();
}

/// Panics unless this process is root, naming `scripts/test`.
pub fn require_root(what: &str) {
    let euid = Command::new("id").arg("-u").output().expect("id -u");
    assert_eq!(
        String::from_utf8_lossy(&euid.stdout).trim(),
        "0",
        "{what} needs root: run ./scripts/test as root (as CI does)"
    );
}

pub struct Lan {
    n: u32,
    switch: String,
    hosts: usize,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Lan {
    /// A switch and `hosts` hosts (at most 60) plugged into it.
    pub fn new(hosts: usize) -> Lan {
        require_root("a LAN of network namespaces");
        assert!(hosts <= 60);
        // A LAN number is claimed by creating its switch namespace, which
        // fails while another test (of any process) holds it.
        let start = (std::process::id() % 50) * 5 + NEXT.fetch_add(1, Ordering::Relaxed);
        let n = (0..250)
            .map(|k| (start + k) % 250)
            .find(|n| {
                Command::new("ip")
                    .args(["netns", "add", &format!("snsw{n}")])
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .expect("a free LAN number (250 switch namespaces snsw* exist: remove stale ones with `ip netns del`)");
        let lan = Lan {
            n,
            switch: format!("snsw{n}"),
            hosts,
        };
        // Hosts a crashed run may have left with this number.
        lan.remove_hosts();
        let sw = lan.switch.as_str();
        sh("ip", &["-n", sw, "link", "add", "br0", "type", "bridge"]);
        sh("ip", &["-n", sw, "link", "set", "br0", "up"]);
        for i in 0..hosts {
            let ns = lan.ns(i);
            let (port, mgmt) = (lan.port(i), lan.mgmt_link(i));
            sh("ip", &["netns", "add", &ns]);
            sh("ip", &["-n", &ns, "link", "set", "lo", "up"]);
            // LAN: host side `lan`, switch side `port`.
            sh(
                "ip",
                &[
                    "-n", &ns, "link", "add", "lan", "type", "veth", "peer", "name", &port, "netns", sw,
                ],
            );
            sh(
                "ip",
                &["-n", &ns, "addr", "add", &format!("{}/24", lan.ip(i)), "dev", "lan"],
            );
            sh("ip", &["-n", &ns, "link", "set", "lan", "up"]);
            sh("ip", &["-n", sw, "link", "set", &port, "master", "br0"]);
            sh("ip", &["-n", sw, "link", "set", &port, "up"]);
            // Management: host side `mgmt`, root side `mgmt_link`.
            sh(
                "ip",
                &[
                    "link", "add", &mgmt, "type", "veth", "peer", "name", "mgmt", "netns", &ns,
                ],
            );
            let (root_ip, host_ip) = lan.mgmt_ips(i);
            sh("ip", &["addr", "add", &format!("{root_ip}/30"), "dev", &mgmt]);
            sh("ip", &["link", "set", &mgmt, "up"]);
            sh(
                "ip",
                &["-n", &ns, "addr", "add", &format!("{host_ip}/30"), "dev", "mgmt"],
            );
            sh("ip", &["-n", &ns, "link", "set", "mgmt", "up"]);
        }
        lan
    }

    pub fn hosts(&self) -> usize {
        self.hosts
    }

    /// Host `i`'s namespace.
    pub fn ns(&self, i: usize) -> String {
        format!("snh{}x{i}", self.n)
    }

    fn port(&self, i: usize) -> String {
        format!("p{i}")
    }

    fn mgmt_link(&self, i: usize) -> String {
        format!("snm{}x{i}", self.n)
    }

    /// Host `i`'s LAN address.
    pub fn ip(&self, i: usize) -> String {
        format!("10.78.{}.{}", self.n, i + 1)
    }

    fn mgmt_ips(&self, i: usize) -> (String, String) {
        let base = 4 * i as u32;
        (
            format!("10.79.{}.{}", self.n, base + 1),
            format!("10.79.{}.{}", self.n, base + 2),
        )
    }

    /// Where host `i`'s node serves its HTTP API (reachable from the test).
    pub fn http(&self, i: usize) -> String {
        format!("{}:8080", self.mgmt_ips(i).1)
    }

    /// A script that runs `bin` inside host `i`'s namespace.
    pub fn wrapper(&self, i: usize, bin: &Path, dir: &Path) -> PathBuf {
        let path = dir.join(format!("in-{}.sh", self.ns(i)));
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\nexec ip netns exec {} {} \"$@\"\n",
                self.ns(i),
                bin.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// Runs one `syncnode` per host (`bin` inside each namespace, data in
    /// `dir/n<i>`): p2p on the LAN, HTTP on the management link, host 0 the
    /// first node and the others joining through it, `extra(i)` added.
    pub async fn start_nodes(
        &self,
        bin: &Path,
        dir: &Path,
        cluster: &str,
        extra: impl Fn(usize) -> Vec<String>,
    ) -> Vec<syncnode::process::NodeProcess> {
        let mut nodes = Vec::new();
        for i in 0..self.hosts {
            let mut args: Vec<String> = vec![
                "--listen".into(),
                format!("/ip4/{}/tcp/7070", self.ip(i)),
                "--http".into(),
                self.http(i),
                "--cluster-id".into(),
                cluster.into(),
            ];
            if i > 0 {
                args.extend(["--bootstrap".into(), format!("/ip4/{}/tcp/7070", self.ip(0))]);
            }
            args.extend(extra(i));
            let wrapper = self.wrapper(i, bin, dir);
            let node = syncnode::process::NodeProcess::spawn(&wrapper, &dir.join(format!("n{i}")), args)
                .await
                .unwrap_or_else(|e| panic!("node {i}: {e:#}"));
            nodes.push(node);
        }
        nodes
    }

    /// Unplugs host `i` from the switch. With `abort`, also resets every TCP
    /// connection it has across the LAN, as a rebooted router or a NAT
    /// timeout would; without, connections stall and may resume on heal.
    pub fn unplug(&self, i: usize, abort: bool) {
        sh("ip", &["-n", &self.switch, "link", "set", &self.port(i), "down"]);
        if abort {
            self.abort_connections(i);
        }
    }

    /// Plugs host `i` back in.
    pub fn plug(&self, i: usize) {
        sh("ip", &["-n", &self.switch, "link", "set", &self.port(i), "up"]);
    }

    /// Resets host `i`'s TCP connections to other hosts (`ss -K`).
    pub fn abort_connections(&self, i: usize) {
        let net = format!("10.78.{}.0/24", self.n);
        sh("ip", &["netns", "exec", &self.ns(i), "ss", "-K", "dst", &net]);
        // Without kernel support `ss -K` kills nothing and still exits 0.
        let left = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(i),
                "ss",
                "-Htn",
                "state",
                "established",
                "dst",
                &net,
            ])
            .output()
            .expect("ss");
        assert!(
            left.stdout.is_empty(),
            "ss -K left connections open (kernel without SOCK_DESTROY?): {}",
            String::from_utf8_lossy(&left.stdout)
        );
    }

    /// Host `to` drops every packet from host `from` (`on`), or stops doing so.
    /// `to` still sends to `from`: a one-way cut.
    pub fn drop_from(&self, to: usize, from: usize, on: bool) {
        let ns = self.ns(to);
        let table = format!("cut{from}");
        if on {
            let nft = |args: &[&str]| sh("ip", &[&["netns", "exec", &ns, "nft"], args].concat());
            nft(&["add", "table", "inet", &table]);
            nft(&[
                "add",
                "chain",
                "inet",
                &table,
                "input",
                "{ type filter hook input priority 0; policy accept; }",
            ]);
            nft(&[
                "add",
                "rule",
                "inet",
                &table,
                "input",
                "ip",
                "saddr",
                &self.ip(from),
                "drop",
            ]);
        } else {
            sh("ip", &["netns", "exec", &ns, "nft", "delete", "table", "inet", &table]);
        }
    }

    /// Whether a TCP connection from host `from` to host `to`'s `port`
    /// opens within a second (what the faults above should prevent).
    pub fn reachable(&self, from: usize, to: usize, port: u16) -> bool {
        let probe = format!("exec 3<>/dev/tcp/{}/{port}", self.ip(to));
        Command::new("ip")
            .args(["netns", "exec", &self.ns(from), "timeout", "1", "bash", "-c", &probe])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    fn remove_hosts(&self) {
        for i in 0..self.hosts {
            quiet("ip", &["link", "del", &self.mgmt_link(i)]);
            quiet("ip", &["netns", "del", &self.ns(i)]);
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        self.remove_hosts();
        // Last: it frees the number.
        quiet("ip", &["netns", "del", &self.switch]);
    }
}
