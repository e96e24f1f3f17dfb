//! Where webhook deliveries may go: a guard against server-side request forgery. A user's
//! endpoint URL must be `http(s)` and must not reach private, loopback, link-local or other
//! non-public addresses (the metadata service at 169.254.169.254, the database next door),
//! unless an operator allowed that network (`WEBHOOK_ALLOW_NETWORKS`).
//!
//! The api checks a URL when it is registered; the worker checks every address again when
//! it connects (its DNS resolver drops refused addresses), so a name that later resolves
//! somewhere private (DNS rebinding) is still refused.

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
    #[error("url points at a private, loopback or otherwise non-public address ({0}), which is not allowed")]
    NotAllowed(IpAddr),
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
        match addresses.into_iter().find(|ip| !self.permits(*ip)) {
            Some(refused) => Err(TargetError::NotAllowed(refused)),
            None => Ok(url),
        }
    }
}

/// Whether an address is on the public internet: not private, loopback, link-local,
/// unspecified, multicast, broadcast, documentation, shared (CGNAT), benchmarking or
/// reserved; IPv4 addresses embedded in IPv6 are judged as IPv4.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(ip) => is_public_v4(ip),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(ip),
        },
    }
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
        || (a == 198 && (18..20).contains(&b))
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_unique_local()
        || ip.is_unicast_link_local()
        // 2001:db8::/32 documentation, 64:ff9b::/96 NAT64 (may reach IPv4 private space).
        || (first == 0x2001 && ip.segments()[1] == 0x0db8)
        || (first == 0x0064 && ip.segments()[1] == 0xff9b))
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
        ] {
            assert!(!is_public(ip(refused)), "{refused} counted as public");
        }
        for public in ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111", "::ffff:93.184.216.34"] {
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
        assert_eq!(
            policy.check("http://169.254.169.254/latest").await,
            Err(TargetError::NotAllowed(ip("169.254.169.254")))
        );
        assert_eq!(policy.check("http://[::1]:8080/").await, Err(TargetError::NotAllowed(ip("::1"))));
        assert!(matches!(policy.check("http://localhost:9/").await, Err(TargetError::NotAllowed(_))));
        let local = TargetPolicy::new(vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()]);
        assert!(local.check("http://localhost:9/").await.is_ok());
    }
}
