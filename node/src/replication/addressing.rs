//! Addressing (DESIGN §5.6): which addresses a node tells others to dial,
//! and the exclusive hold on its listen ports. A wildcard listener is
//! advertised as every interface's address (loopback left out when there
//! is anything else, since it is useless to another host); `advertise`
//! overrides it, DNS names included. libp2p's TCP listeners set
//! SO_REUSEPORT, so a taken port is found by a plain bind first.

use libp2p::{Multiaddr, PeerId};

/// Fails when a TCP listen address names a port another socket holds.
/// libp2p listens with SO_REUSEPORT (to dial from the listen port), so a
/// second node on the same port would start and share it; a plain bind
/// finds the owner first.
pub fn check_port_free(addr: &Multiaddr) -> anyhow::Result<()> {
    use libp2p::multiaddr::Protocol;
    let mut it = addr.iter();
    let ip: std::net::IpAddr = match it.next() {
        Some(Protocol::Ip4(ip)) => ip.into(),
        Some(Protocol::Ip6(ip)) => ip.into(),
        _ => return Ok(()),
    };
    let Some(Protocol::Tcp(port)) = it.next() else {
        return Ok(());
    };
    if port == 0 {
        return Ok(());
    }
    std::net::TcpListener::bind((ip, port))
        .map(drop)
        .map_err(|e| anyhow::anyhow!("listen {addr}: port {port} is not available: {e}"))
}

/// Whether an address is loopback (useless to other hosts).
pub fn is_loopback(addr: &Multiaddr) -> bool {
    use libp2p::multiaddr::Protocol;
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_loopback(),
        Some(Protocol::Ip6(ip)) => ip.is_loopback(),
        Some(Protocol::Dns(h) | Protocol::Dns4(h) | Protocol::Dns6(h)) => h == "localhost",
        _ => false,
    }
}

/// The addresses to advertise: the configured ones, else what we listen on
/// (every interface's address for a wildcard), without loopback when
/// there is anything else.
pub fn advertised(configured: &[Multiaddr], listening: &[Multiaddr]) -> Vec<Multiaddr> {
    if !configured.is_empty() {
        return configured.to_vec();
    }
    let outside: Vec<Multiaddr> = listening.iter().filter(|a| !is_loopback(a)).cloned().collect();
    if outside.is_empty() {
        listening.to_vec()
    } else {
        outside
    }
}

/// The peer id an address ends with.
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::P2p(id) => Some(id),
        _ => None,
    })
}
