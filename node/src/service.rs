//! Running under systemd: `Type=notify` services tell the service manager
//! when they are ready and what they are doing through the datagram socket
//! named by `NOTIFY_SOCKET` (sd_notify(3)). A node says `READY=1` once it
//! has caught up with the cluster (what `/readyz` checks, the write fence
//! aside), so `systemctl restart` returns only when the node serves current
//! data: a rolling upgrade can go on to the next node safely. Without
//! `NOTIFY_SOCKET` every call does nothing.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends one notification (`READY=1`, `STATUS=…`, `STOPPING=1`); errors are
/// logged, never fatal: the service manager is a spectator.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        let bytes = path.as_encoded_bytes();
        // `@name` is a socket in the abstract namespace.
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)?
            }
            None => SocketAddr::from_pathname(&path)?,
        };
        UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!(socket = ?path, "sd_notify {state:?}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_reaches_the_socket_named_by_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        // SAFETY: this test is the only one in the crate touching NOTIFY_SOCKET.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        notify("READY=1\nSTATUS=caught up");
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let mut buf = [0u8; 64];
        let n = sock.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=caught up");
    }
}
