//! What clients were told, and what the cluster must therefore hold.
//!
//! Every acknowledged put and delete is recorded with the receipt the node
//! gave (version, origin). Last-writer-wins orders versions by (version,
//! origin) (DESIGN §2), so once the cluster has converged each id must read
//! as its greatest acknowledged operation on every node: the value of that
//! put, or absent for a delete. A put that reads as something else is a
//! lost acknowledged write; a delete that reads as a value is a resurrected
//! delete.
//!
//! An operation that failed in a way that may still have applied it (a
//! timeout, a connection lost mid-request) is recorded as indeterminate: the
//! id may then read as that operation instead, provided the version read
//! beats the greatest acknowledged one (what LWW would do had it applied).

use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::Mutex;
use syncnode::process::NodeProcess;

#[derive(Debug, Clone)]
struct Op {
    version: u64,
    origin: String,
    /// `None` for a delete.
    value: Option<Bytes>,
}

#[derive(Default)]
pub struct History {
    ops: Mutex<BTreeMap<String, Vec<Op>>>,
    /// Per id, what indeterminate operations would have left (`None`: a delete).
    maybe: Mutex<BTreeMap<String, Vec<Option<Bytes>>>>,
}

/// How the cluster disagrees with what clients were told.
#[derive(Debug, Default)]
pub struct Violations {
    pub lost_writes: Vec<String>,
    pub resurrected_deletes: Vec<String>,
}

impl Violations {
    pub fn is_empty(&self) -> bool {
        self.lost_writes.is_empty() && self.resurrected_deletes.is_empty()
    }
}

/// The tombstone `node` holds for `id` (`/v1/items/{id}/status`), if any.
async fn tombstone(node: &NodeProcess, id: &str) -> anyhow::Result<Option<(u64, String)>> {
    let path = format!("/v1/items/{}/status", syncnode::client::encode_id(id));
    let v = node.api.ok_json(node.api.get(&path).await).await?;
    Ok(syncnode::client::version(&v["deleted"]["version"])
        .map(|version| (version, v["deleted"]["origin"].as_str().unwrap_or_default().to_string())))
}

impl History {
    /// Puts through `node`; records the write when acknowledged.
    pub async fn put(&self, node: &NodeProcess, id: &str, value: &str) -> anyhow::Result<()> {
        let r = node
            .api
            .ok_json(node.api.put_item(id, Bytes::from(value.to_string()), false).await)
            .await?;
        self.record(id, &r, Some(Bytes::from(value.to_string())))
    }

    /// Deletes through `node`; records the tombstone when acknowledged.
    pub async fn del(&self, node: &NodeProcess, id: &str) -> anyhow::Result<()> {
        let r = node.api.ok_json(node.api.delete_item(id).await).await?;
        self.record(id, &r, None)
    }

    /// Records an acknowledged operation from its receipt (`version`, `origin`).
    pub fn record(&self, id: &str, receipt: &serde_json::Value, value: Option<Bytes>) -> anyhow::Result<()> {
        let (Some(version), Some(origin)) = (
            syncnode::client::version(&receipt["version"]),
            receipt["origin"].as_str(),
        ) else {
            anyhow::bail!("receipt without version and origin: {receipt}");
        };
        self.ops.lock().unwrap().entry(id.to_string()).or_default().push(Op {
            version,
            origin: origin.to_string(),
            value,
        });
        Ok(())
    }

    /// Records an operation whose outcome is unknown (`None`: a delete).
    pub fn record_indeterminate(&self, id: &str, value: Option<Bytes>) {
        self.maybe
            .lock()
            .unwrap()
            .entry(id.to_string())
            .or_default()
            .push(value);
    }

    /// Acknowledged operations recorded.
    pub fn len(&self) -> usize {
        self.ops.lock().unwrap().values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each id's winning acknowledged operation.
    fn winners(&self) -> BTreeMap<String, Op> {
        self.ops
            .lock()
            .unwrap()
            .iter()
            .map(|(id, ops)| {
                let win = ops
                    .iter()
                    .max_by(|a, b| (a.version, a.origin.as_bytes()).cmp(&(b.version, b.origin.as_bytes())))
                    .expect("an id is recorded with an operation");
                (id.clone(), win.clone())
            })
            .collect()
    }

    /// Each id's winning acknowledged operation: its value, or `None` when deleted.
    pub fn expected(&self) -> BTreeMap<String, Option<Bytes>> {
        self.winners().into_iter().map(|(id, op)| (id, op.value)).collect()
    }

    /// Reads every recorded id from `node` and compares with what clients were told.
    pub async fn check(&self, node: &NodeProcess) -> anyhow::Result<Violations> {
        let winners = self.winners();
        let maybe = self.maybe.lock().unwrap().clone();
        let ids: std::collections::BTreeSet<&String> = winners.keys().chain(maybe.keys()).collect();
        let mut v = Violations::default();
        for id in ids {
            let a = node.api.get_item(id).await?;
            let got = match a.status.as_u16() {
                200 => {
                    let header = |h: &str| a.headers.get(h).and_then(|x| x.to_str().ok()).map(str::to_string);
                    let version: u64 = header("x-version").and_then(|x| x.parse().ok()).unwrap_or(0);
                    Some((a.body.clone(), version, header("x-origin").unwrap_or_default()))
                }
                404 => None,
                s => anyhow::bail!("GET {id} on {}: HTTP {s}: {}", node.http, a.text()),
            };
            let win = winners.get(id);
            let unknown = maybe.get(id).map(Vec::as_slice).unwrap_or_default();
            let explained = match (&got, win) {
                (Some((body, version, origin)), w) => {
                    let is_winner = w.is_some_and(|w| {
                        w.value.as_ref() == Some(body) && (w.version, w.origin.as_str()) == (*version, origin.as_str())
                    });
                    let beats_winner =
                        w.is_none_or(|w| (*version, origin.as_bytes()) > (w.version, w.origin.as_bytes()));
                    is_winner || (beats_winner && unknown.iter().any(|u| u.as_ref() == Some(body)))
                }
                (None, None) => true,
                (None, Some(w)) if w.value.is_none() => true,
                // Absent where a put won: only an indeterminate delete with a
                // later version explains it (a purged tombstone cannot say).
                (None, Some(w)) => {
                    unknown.iter().any(Option::is_none)
                        && match tombstone(node, id).await? {
                            Some((version, origin)) => (version, origin.as_bytes()) > (w.version, w.origin.as_bytes()),
                            None => true,
                        }
                }
            };
            if explained {
                continue;
            }
            let read = got
                .as_ref()
                .map(|(b, ver, org)| format!("{:?} (version {ver}, origin {org})", String::from_utf8_lossy(b)));
            match win {
                Some(Op { value: None, .. }) => v.resurrected_deletes.push(format!(
                    "{id} on {}: deleted, reads {}",
                    node.http,
                    read.unwrap_or_default()
                )),
                Some(Op {
                    value: Some(w),
                    version,
                    origin,
                }) => v.lost_writes.push(format!(
                    "{id} on {}: acknowledged {:?} (version {version}, origin {origin}), reads {}",
                    node.http,
                    String::from_utf8_lossy(w),
                    read.unwrap_or_else(|| "nothing".into())
                )),
                None => v.lost_writes.push(format!(
                    "{id} on {}: reads {} which no client wrote",
                    node.http,
                    read.unwrap_or_default()
                )),
            }
        }
        Ok(v)
    }

    /// Checks every node; fails naming each violation.
    pub async fn assert_held(&self, nodes: &[&NodeProcess]) {
        let mut all = Violations::default();
        for n in nodes {
            let v = self.check(n).await.expect("reading the items back");
            all.lost_writes.extend(v.lost_writes);
            all.resurrected_deletes.extend(v.resurrected_deletes);
        }
        assert!(
            all.is_empty(),
            "{} lost acknowledged writes, {} resurrected deletes: {all:#?}",
            all.lost_writes.len(),
            all.resurrected_deletes.len()
        );
    }
}
