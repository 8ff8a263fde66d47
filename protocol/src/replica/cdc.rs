//! CDC, the sending side's packing (DESIGN §5.3): after a local commit each
//! changed item becomes a delta — its entry, and its content when at most
//! `CDC_INLINE_MAX` — and deltas are packed several to a message, up to
//! about `PACK_BYTES`, so one message carries many writes.

use crate::wire::{CdcDelta, WireItem};

/// Largest content inlined in a delta; larger items are fetched.
pub const CDC_INLINE_MAX: usize = 32 * 1024;
/// Largest gossip message.
pub const GOSSIP_MAX: usize = 64 * 1024;
/// Deltas are packed into messages of about this size (a single delta with
/// 32 KiB of content and the longest id and origin still fits `GOSSIP_MAX`).
pub const PACK_BYTES: usize = 24 * 1024;
/// Most deltas in one message.
pub const MAX_DELTAS: usize = 1024;

/// The deltas of committed items (content inlined up to
/// `CDC_INLINE_MAX`), packed into message-sized groups.
pub fn pack(items: impl IntoIterator<Item = WireItem>) -> Vec<Vec<CdcDelta>> {
    pack_deltas(
        items
            .into_iter()
            .map(|w| CdcDelta {
                entry: w.entry.clone(),
                item: (w.content.len() <= CDC_INLINE_MAX).then_some(w),
            })
            .collect(),
    )
}

/// Deltas packed into message-sized groups of about `PACK_BYTES`.
pub fn pack_deltas(deltas: Vec<CdcDelta>) -> Vec<Vec<CdcDelta>> {
    let mut out = Vec::new();
    let (mut group, mut bytes) = (Vec::new(), 0);
    for d in deltas {
        let size = 128
            + 2 * d.entry.id.len()
            + 2 * d.entry.origin.len()
            + d.item.as_ref().map_or(0, |i| {
                i.state.len() + i.content.len() + i.media_type.as_ref().map_or(0, |m| m.len() + 8)
            });
        if !group.is_empty() && (bytes + size > PACK_BYTES || group.len() >= MAX_DELTAS) {
            out.push(std::mem::take(&mut group));
            bytes = 0;
        }
        bytes += size;
        group.push(d);
    }
    if !group.is_empty() {
        out.push(group);
    }
    out
}

/// Checks received deltas: a count within bounds, and every inlined item
/// matching its entry and within the inline limit. `valid_id` and
/// `valid_origin` are the store's rules for names.
pub fn check(
    deltas: &[CdcDelta],
    valid_id: impl Fn(&str) -> Result<(), String>,
    valid_origin: impl Fn(&str) -> Result<(), String>,
) -> Result<(), String> {
    if deltas.is_empty() || deltas.len() > MAX_DELTAS {
        return Err(format!("{} deltas in one message (1..={MAX_DELTAS})", deltas.len()));
    }
    for d in deltas {
        valid_id(&d.entry.id)?;
        valid_origin(&d.entry.origin)?;
        if let Some(item) = &d.item {
            if item.entry != d.entry {
                return Err("delta item does not match its entry".into());
            }
            if item.content.len() > CDC_INLINE_MAX {
                return Err("delta content past the inline limit".into());
            }
        }
    }
    Ok(())
}
