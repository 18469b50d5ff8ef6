//! The seal of a connection after its handshake: every frame carries its sequence number
//! and an HMAC-SHA256 over it and the frame's SHA-256, with a key per connection and
//! direction; a frame that is forged, rewritten, replayed, out of order or reflected does not
//! open.

use super::{body_digest, RecvError};
use serde::Deserialize;
use sha2::Sha256;
use std::sync::Arc;

/// The frames of one connection after its handshake: each carries its sequence number and an
/// HMAC-SHA256 over both (`JSON\tSEQ\tMAC`), one key per direction. Lines before
/// `from_in`/`from_out` (the handshake's) are plain.
#[derive(Clone)]
pub struct SealKeys {
    pub out_key: [u8; 32],
    pub in_key: [u8; 32],
    /// The index of the first sealed line read, and written.
    pub from_in: u64,
    pub from_out: u64,
}

impl SealKeys {
    /// The master's end of the connection whose handshake had these nonces: its first two
    /// lines (the Challenge, the Accepted) are plain, and what it reads after the hello is
    /// sealed.
    pub fn master(key: &crate::auth::JobKey, master_nonce: &str, rank_nonce: &str) -> SealKeys {
        let (m2r, r2m) = key.channel_keys(master_nonce, rank_nonce);
        SealKeys {
            out_key: m2r,
            in_key: r2m,
            from_in: 1,
            from_out: 2,
        }
    }

    /// The rank's end: its hello is plain, what it reads after the Challenge and the Accepted
    /// is sealed.
    pub fn rank(key: &crate::auth::JobKey, master_nonce: &str, rank_nonce: &str) -> SealKeys {
        let (m2r, r2m) = key.channel_keys(master_nonce, rank_nonce);
        SealKeys {
            out_key: r2m,
            in_key: m2r,
            from_in: 2,
            from_out: 1,
        }
    }
}

/// A connection's seal, set once its handshake is done (none: `security.auth: off`).
#[derive(Clone, Default)]
pub(super) struct Seal(Arc<std::sync::Mutex<Option<SealKeys>>>);

impl Seal {
    pub(super) fn set(&self, keys: SealKeys) {
        if let Ok(mut k) = self.0.lock() {
            *k = Some(keys);
        }
    }

    pub(super) fn get(&self) -> Option<SealKeys> {
        self.0.lock().ok().and_then(|k| k.clone())
    }
}

/// The MAC of frame `seq` whose JSON has this SHA-256 (a broadcast is hashed once, and each
/// connection's MAC covers the hash).
fn mac(key: &[u8; 32], seq: u64, digest: &[u8; 32]) -> [u8; 32] {
    use hmac::Mac as _;
    let mut m = <hmac::Hmac<Sha256> as hmac::Mac>::new_from_slice(key).expect("any key length");
    m.update(&seq.to_le_bytes());
    m.update(digest);
    m.finalize().into_bytes().into()
}

pub(super) fn sealed(key: &[u8; 32], seq: u64, line: &[u8], digest: &[u8; 32]) -> Vec<u8> {
    let body = line.strip_suffix(b"\n").unwrap_or(line);
    let mut out = Vec::with_capacity(body.len() + 90);
    out.extend_from_slice(body);
    out.extend_from_slice(
        format!("\t{seq}\t{}\n", crate::auth::hex(&mac(key, seq, digest))).as_bytes(),
    );
    out
}

/// `line` (JSON and a newline) sealed with `key` as frame `seq`.
pub fn seal_line(key: &[u8; 32], seq: u64, line: &[u8]) -> Vec<u8> {
    sealed(key, seq, line, &body_digest(line))
}

/// The JSON of a sealed line, if its MAC and sequence number (`want`) are right.
fn open_line<'a>(key: &[u8; 32], want: u64, line: &'a [u8]) -> Result<&'a [u8], String> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let mut parts = line.rsplitn(3, |b| *b == b'\t');
    let (Some(tag), Some(seq), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("it carries no MAC".into());
    };
    let seq: u64 = std::str::from_utf8(seq)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or("its sequence number is unreadable")?;
    let want_mac = mac(key, seq, &body_digest(body));
    let ok = crate::auth::unhex(std::str::from_utf8(tag).unwrap_or(""))
        .is_some_and(|t| subtle::ConstantTimeEq::ct_eq(t.as_slice(), &want_mac[..]).into());
    if !ok {
        return Err(format!(
            "frame {seq}: its MAC does not verify (forged or rewritten)"
        ));
    }
    if seq != want {
        return Err(format!(
            "frame {seq} where {want} was due (replayed or reordered)"
        ));
    }
    Ok(body)
}

/// Decode line `idx` of a connection: plain before the seal's `from_in`, else opened.
pub(super) fn decode<T: for<'de> Deserialize<'de>>(
    seal: &Seal,
    in_seq: &mut u64,
    idx: u64,
    line: &[u8],
) -> Result<T, RecvError> {
    let body = match seal.get() {
        Some(k) if idx >= k.from_in => {
            let body = open_line(&k.in_key, *in_seq, line).map_err(RecvError::Forged)?;
            *in_seq += 1;
            body
        }
        _ => line,
    };
    serde_json::from_slice(body).map_err(|e| RecvError::Bad(e.to_string()))
}
