//! Who the client of an HTTP request is, behind trusted proxies.
//!
//! `--trusted-proxies` lists addresses and CIDR blocks (`10.0.0.0/8`, `::1`) whose
//! `X-Forwarded-For` is believed. The client is the connection's peer, unless that peer
//! is trusted: then the hops of every `X-Forwarded-For` line (joined in order) are walked
//! from the right, past trusted proxies, to the first that is not one (each proxy
//! appends the address it got the request from, so anything left of that hop may be
//! forged by the client). A hop that does not parse stops the walk at the last trusted
//! proxy. The share endpoints' per-client rate limit keys on the result.

use std::net::IpAddr;

/// A set of trusted addresses and blocks.
#[derive(Clone, Debug, Default)]
pub struct Trusted {
    nets: Vec<(IpAddr, u8)>,
}

fn bits(ip: IpAddr) -> (u128, u8) {
    match ip {
        IpAddr::V4(a) => (u32::from(a) as u128, 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

impl Trusted {
    /// Parses `a.b.c.d`, `a.b.c.d/n`, an IPv6 address or block; the error names the entry.
    pub fn parse(list: &[String]) -> Result<Trusted, String> {
        let mut nets = Vec::new();
        for e in list.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let (addr, len) = match e.split_once('/') {
                Some((a, l)) => (a, Some(l)),
                None => (e, None),
            };
            let ip: IpAddr =
                addr.parse().map_err(|_| format!("--trusted-proxies: {e:?} is not an address or block"))?;
            let max = bits(ip).1;
            let len = match len {
                Some(l) => l
                    .parse::<u8>()
                    .ok()
                    .filter(|l| *l <= max)
                    .ok_or_else(|| format!("--trusted-proxies: {e:?} has a bad prefix length"))?,
                None => max,
            };
            nets.push((ip, len));
        }
        Ok(Trusted { nets })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(a) => a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4),
            v4 => v4,
        };
        let (x, w) = bits(ip);
        self.nets.iter().any(|(net, len)| {
            let (n, nw) = bits(*net);
            if nw != w {
                return false;
            }
            let shift = w - len;
            shift >= w || (x >> shift) == (n >> shift)
        })
    }

    /// The client of a request from `peer` carrying `forwarded_for`: every
    /// `X-Forwarded-For` line's value, in order (empty: none).
    pub fn client(&self, peer: IpAddr, forwarded_for: &[&str]) -> IpAddr {
        let mut client = peer;
        if !self.contains(peer) {
            return client;
        }
        let hops = forwarded_for.iter().flat_map(|h| h.split(',')).collect::<Vec<_>>();
        for hop in hops.into_iter().rev() {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) if self.contains(ip) => client = ip,
                Ok(ip) => return ip,
                Err(_) => return client,
            }
        }
        client
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_client_is_the_first_untrusted_hop_from_the_right() {
        let t = Trusted::parse(&["10.0.0.0/8".into(), "::1".into(), "192.168.1.7".into()]).unwrap();
        assert!(t.contains(ip("10.20.30.40")) && t.contains(ip("::1")) && t.contains(ip("192.168.1.7")));
        assert!(!t.contains(ip("192.168.1.8")) && !t.contains(ip("11.0.0.1")));
        // Not from a trusted proxy: the header is ignored.
        assert_eq!(t.client(ip("203.0.113.9"), &["1.2.3.4"]), ip("203.0.113.9"));
        // Through two trusted proxies: the client, whatever it put left of itself.
        assert_eq!(t.client(ip("10.0.0.2"), &["6.6.6.6, 198.51.100.4, 10.0.0.1"]), ip("198.51.100.4"));
        // A proxy that adds a line of its own: the client's forged line comes first.
        assert_eq!(t.client(ip("10.0.0.2"), &["6.6.6.6", "198.51.100.4"]), ip("198.51.100.4"));
        // No header: the proxy itself. Garbage left of the real hops changes nothing,
        // and garbage right of them stops at the last trusted proxy.
        assert_eq!(t.client(ip("10.0.0.2"), &[]), ip("10.0.0.2"));
        assert_eq!(t.client(ip("10.0.0.2"), &["nonsense, 198.51.100.4"]), ip("198.51.100.4"));
        assert_eq!(t.client(ip("10.0.0.2"), &["198.51.100.4, 10.0.0.1, nonsense"]), ip("10.0.0.2"));
        assert!(Trusted::parse(&["10.0.0.0/33".into()]).is_err());
        assert!(Trusted::parse(&["proxy.local".into()]).is_err());
        // No list: nobody is trusted.
        assert_eq!(Trusted::default().client(ip("127.0.0.1"), &["1.2.3.4"]), ip("127.0.0.1"));
    }
}
