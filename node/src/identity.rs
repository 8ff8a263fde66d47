//! A node's lasting identity (its ed25519 key, hence its peer id) in
//! `<data_dir>/identity.key`, and the pre-shared cluster key files of
//! `syncnode psk`. Both are secrets: written with mode 0600.

use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;
use std::io::Write;
use std::path::Path;

const IDENTITY_FILE: &str = "identity.key";

fn write_secret(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Loads the node key from `data_dir`, creating it (and the dir) when absent.
/// Returns the key and whether it was created now.
pub fn load_or_create(data_dir: &Path) -> anyhow::Result<(Keypair, bool)> {
    std::fs::create_dir_all(data_dir).map_err(|e| anyhow::anyhow!("data_dir {}: {e}", data_dir.display()))?;
    let path = data_dir.join(IDENTITY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes)
            .map(|k| (k, false))
            .map_err(|_| {
                // libp2p's decoding error can name a cargo feature: it says
                // nothing useful to an operator.
                anyhow::anyhow!(
                    "{} is damaged ({} bytes, truncated or not a node key); restore it from a backup, or move it away to make a new identity (a new peer id)",
                    path.display(),
                    bytes.len()
                )
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .map_err(|e| anyhow::anyhow!("encode key: {e}"))?;
            write_secret(&path, &bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            Ok((key, true))
        }
        Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
    }
}

/// A fresh pre-shared key, in the key-file format of libp2p pnet.
pub fn new_psk() -> String {
    PreSharedKey::new(rand::random::<[u8; 32]>()).to_key_file()
}

/// Writes a fresh key file to `path` (never over an existing file).
pub fn write_psk(path: &Path) -> anyhow::Result<PreSharedKey> {
    let text = new_psk();
    write_secret(path, text.as_bytes()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    read_psk(path)
}

pub fn read_psk(path: &Path) -> anyhow::Result<PreSharedKey> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("psk_file {}: {e}", path.display()))?;
    text.parse()
        .map_err(|e| anyhow::anyhow!("psk_file {}: not a pre-shared key file ({e})", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (a, created) = load_or_create(dir.path()).unwrap();
        assert!(created);
        let (b, created) = load_or_create(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        std::fs::write(dir.path().join(IDENTITY_FILE), b"junk").unwrap();
        assert!(
            load_or_create(dir.path()).is_err(),
            "a damaged key is an error, never replaced"
        );
    }

    #[test]
    fn psk_files_round_trip_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cluster.psk");
        let k = write_psk(&p).unwrap();
        assert_eq!(
            read_psk(&p).unwrap().fingerprint().to_string(),
            k.fingerprint().to_string()
        );
        assert!(write_psk(&p).is_err(), "never overwrites a key");
        std::fs::write(&p, "/key/swarm/psk/1.0.0/\n/base16/\nzz\n").unwrap();
        assert!(read_psk(&p).is_err());
    }
}
