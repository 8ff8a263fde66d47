//! What clients were told, and what the cluster must therefore hold.
//!
//! Every acknowledged put and delete is recorded with the receipt the node
//! gave (version, origin). Last-writer-wins orders versions by (version,
//! origin) (DESIGN §2), so once the cluster has converged each id must read
//! as its greatest acknowledged operation on every node: the value of that
//! put, or absent for a delete. A put that reads as something else is a
//! lost acknowledged write; a delete that reads as a value is a resurrected
//! delete.

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
        let (Some(version), Some(origin)) = (receipt["version"].as_u64(), receipt["origin"].as_str()) else {
            anyhow::bail!("receipt without version and origin: {receipt}");
        };
        self.ops.lock().unwrap().entry(id.to_string()).or_default().push(Op {
            version,
            origin: origin.to_string(),
            value,
        });
        Ok(())
    }

    /// Acknowledged operations recorded.
    pub fn len(&self) -> usize {
        self.ops.lock().unwrap().values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Each id's winning operation: its value, or `None` when deleted.
    pub fn expected(&self) -> BTreeMap<String, Option<Bytes>> {
        self.ops
            .lock()
            .unwrap()
            .iter()
            .map(|(id, ops)| {
                let win = ops
                    .iter()
                    .max_by(|a, b| (a.version, a.origin.as_bytes()).cmp(&(b.version, b.origin.as_bytes())))
                    .expect("an id is recorded with an operation");
                (id.clone(), win.value.clone())
            })
            .collect()
    }

    /// Reads every recorded id from `node` and compares with [`expected`](Self::expected).
    pub async fn check(&self, node: &NodeProcess) -> anyhow::Result<Violations> {
        let mut v = Violations::default();
        for (id, want) in self.expected() {
            let got = node.api.get_item(&id).await?;
            let got = match got.status.as_u16() {
                200 => Some(got.body),
                404 => None,
                s => anyhow::bail!("GET {id} on {}: HTTP {s}: {}", node.http, got.text()),
            };
            match (&want, &got) {
                (Some(w), g) if g.as_ref() != Some(w) => v.lost_writes.push(format!(
                    "{id} on {}: acknowledged {:?}, reads {:?}",
                    node.http,
                    String::from_utf8_lossy(w),
                    g.as_ref().map(|g| String::from_utf8_lossy(g).into_owned())
                )),
                (None, Some(g)) => v.resurrected_deletes.push(format!(
                    "{id} on {}: deleted, reads {:?}",
                    node.http,
                    String::from_utf8_lossy(g)
                )),
                _ => {}
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
