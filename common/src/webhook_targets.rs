//! Where webhook deliveries may go: a guard against server-side request forgery. A user's
//! endpoint URL must be `http(s)` and must not reach private, loopback, link-local or other
//! non-public addresses (the metadata service at 169.254.169.254, the database next door),
//! unless an operator allowed that network (`WEBHOOK_ALLOW_NETWORKS`).
//!
//! The api checks a URL when it is registered; the worker checks every address again when
//! it connects (its DNS resolver drops refused addresses, and it never sends through a
//! proxy, whose address is all the resolver would see), so a name that later resolves
//! somewhere private (DNS rebinding) is still refused.
//!
//! IPv6 is judged by an allow-list: only global unicast (`2000::/3`) outside the special
//! ranges counts as public; forms that embed an IPv4 address (mapped, 6to4) are judged by
//! that address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use url::Url;

/// The longest endpoint URL accepted.
pub const MAX_URL_LEN: usize = 2_000;

#[derive(Clone, Debug, Default)]
pub struct TargetPolicy {
    allow: Vec<IpNet>,
}

/// Why an endpoint URL was refused. The messages are meant for the user who sent it.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("url must be an absolute http:// or https:// URL of at most 2000 characters")]
    Invalid,
    #[error("url must not contain a user name or password")]
    Credentials,
    #[error("url's host does not resolve")]
    Unresolvable,
    /// The address is not named: for a host name, it would tell the caller where the name
    /// points inside the network.
    #[error(
        "url's host is or resolves to a private, loopback or otherwise non-public address, which is not allowed \
         (an operator can allow networks with WEBHOOK_ALLOW_NETWORKS)"
    )]
    NotAllowed,
}

impl TargetPolicy {
    pub fn new(allow: Vec<IpNet>) -> Self {
        Self { allow }
    }

    /// Whether a delivery may connect to `ip`.
    pub fn permits(&self, ip: IpAddr) -> bool {
        is_public(ip) || self.allow.iter().any(|net| net.contains(&ip))
    }

    /// Parses an endpoint URL and checks its form (no network access).
    pub fn parse(&self, raw: &str) -> Result<Url, TargetError> {
        if raw.len() > MAX_URL_LEN {
            return Err(TargetError::Invalid);
        }
        let url = Url::parse(raw).map_err(|_| TargetError::Invalid)?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(TargetError::Invalid);
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(TargetError::Credentials);
        }
        Ok(url)
    }

    /// Parses the URL and resolves its host: every address it resolves to must be permitted.
    pub async fn check(&self, raw: &str) -> Result<Url, TargetError> {
        let url = self.parse(raw)?;
        let port = url.port_or_known_default().unwrap_or(80);
        let addresses: Vec<IpAddr> = match url.host() {
            Some(url::Host::Ipv4(ip)) => vec![IpAddr::V4(ip)],
            Some(url::Host::Ipv6(ip)) => vec![IpAddr::V6(ip)],
            Some(url::Host::Domain(name)) => tokio::net::lookup_host((name, port))
                .await
                .map_err(|_| TargetError::Unresolvable)?
                .map(|address| address.ip())
                .collect(),
            None => return Err(TargetError::Invalid),
        };
        if addresses.is_empty() {
            return Err(TargetError::Unresolvable);
        }
        match addresses.into_iter().all(|ip| self.permits(ip)) {
            true => Ok(url),
            false => Err(TargetError::NotAllowed),
        }
    }
}

/// Whether an address is on the public internet: not private, loopback, link-local,
/// unspecified, multicast, broadcast, documentation, shared (CGNAT), benchmarking, relay
/// or reserved; IPv4 addresses embedded in IPv6 (mapped `::ffff:a.b.c.d`, 6to4
/// `2002:aabb:ccdd::`) are judged as IPv4.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => is_public_v4(ip),
        IpAddr::V6(ip) => match embedded_v4(ip) {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(ip),
        },
    }
}

/// The IPv4 address an IPv6 address stands for, where it stands for one that a connection
/// would reach: IPv4-mapped (`::ffff:0:0/96`) and 6to4 (`2002::/16`, the address in bits
/// 16–47).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let [first, high, low, ..] = ip.segments();
    (first == 0x2002).then(|| Ipv4Addr::from((u32::from(high) << 16) | u32::from(low)))
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
        || (a == 192 && b == 0 && c == 0)
        // 192.88.99.0/24: the 6to4 relay anycast, which leads anywhere.
        || (a == 192 && b == 88 && c == 99)
        || (a == 198 && (18..20).contains(&b))
        || a >= 240)
}

/// Global unicast (`2000::/3`) minus the special-purpose ranges inside it. Everything
/// outside `2000::/3` is refused: loopback, unspecified, IPv4-compatible and -translated
/// forms, NAT64 (`64:ff9b::/96`), discard, unique local, site-local, link-local, multicast.
fn is_public_v6(ip: Ipv6Addr) -> bool {
    let [first, second, ..] = ip.segments();
    let global_unicast = first & 0xe000 == 0x2000;
    global_unicast
        // 2001::/23: IETF protocol assignments (Teredo 2001::/32, whose IPv4 is obscured,
        // benchmarking, ORCHID…).
        && !(first == 0x2001 && second < 0x0200)
        // 2001:db8::/32 and 3fff::/20: documentation.
        && !(first == 0x2001 && second == 0x0db8)
        && !(first == 0x3fff && second < 0x1000)
        // 2002::/16 6to4 is judged by its embedded IPv4 address before this is reached.
        && first != 0x2002
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn non_public_addresses_are_refused() {
        for refused in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "198.18.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.1",
            "::1",
            "::",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "2001:db8::1",
            // Forms that once slipped through: IPv4-compatible, site-local, 6to4 of
            // loopback, Teredo, IPv4-translated, the 6to4 relay.
            "::127.0.0.1",
            "fec0::1",
            "2002:7f00:1::",
            "2002:a00:1::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "::ffff:0:7f00:1",
            "192.88.99.1",
            "3fff::1",
            "100::1",
            "5f00::1",
        ] {
            assert!(!is_public(ip(refused)), "{refused} counted as public");
        }
        for public in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "::ffff:93.184.216.34",
            "2002:5db8:d822::1",
            "2a00:1450:4001::1",
        ] {
            assert!(is_public(ip(public)), "{public} counted as non-public");
        }
    }

    #[test]
    fn the_allow_list_opens_listed_networks_only() {
        let policy = TargetPolicy::new(vec!["127.0.0.1/32".parse().unwrap()]);
        assert!(policy.permits(ip("127.0.0.1")));
        assert!(!policy.permits(ip("127.0.0.2")));
        assert!(!policy.permits(ip("10.0.0.1")));
    }

    #[test]
    fn urls_must_be_http_with_a_host_and_no_credentials() {
        let policy = TargetPolicy::default();
        assert!(policy.parse("https://example.com/hooks").is_ok());
        for invalid in ["ftp://example.com/", "example.com/hooks", "not a url", "file:///etc/passwd", "http://"] {
            assert_eq!(policy.parse(invalid), Err(TargetError::Invalid), "{invalid}");
        }
        assert_eq!(policy.parse("https://user:pw@example.com/"), Err(TargetError::Credentials));
        assert_eq!(
            policy.parse(&format!("https://example.com/{}", "a".repeat(MAX_URL_LEN))),
            Err(TargetError::Invalid)
        );
    }

    #[tokio::test]
    async fn literal_and_resolved_addresses_are_checked() {
        let policy = TargetPolicy::default();
        assert_eq!(policy.check("http://169.254.169.254/latest").await, Err(TargetError::NotAllowed));
        assert_eq!(policy.check("http://[::1]:8080/").await, Err(TargetError::NotAllowed));
        assert_eq!(policy.check("http://[::127.0.0.1]/").await, Err(TargetError::NotAllowed));
        assert_eq!(policy.check("http://localhost:9/").await, Err(TargetError::NotAllowed));
        assert!(!TargetError::NotAllowed.to_string().contains("127.0.0.1"));
        let local = TargetPolicy::new(vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()]);
        assert!(local.check("http://localhost:9/").await.is_ok());
    }
}
