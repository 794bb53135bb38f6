//! DNS resolution: the server's one resolver (hickory-resolver), used by the plugins' `dns`
//! capability (DNSBL checks) and the outbound relay's MX lookups.
//!
//! Name servers come from the configuration (`[dns] nameservers`), so tests and operators can
//! point it at a resolver of their choice; without any, the system's resolv.conf is used.
//!
//! DANE's lookups (is the MX RRset signed, the MX hosts' TLSA records) go through a second,
//! DNSSEC-validating resolver over the same name servers (RFC 7672 §2.1: the client validates,
//! trusting no AD bit), so one bogus zone cannot slow the lookups every delivery makes.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError as WireError, NetError};
use hickory_resolver::proto::dnssec::{Proof, TrustAnchors};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{RData, Record};
use hickory_resolver::{Resolver, TokioResolver};

use crate::config::DnsConfig;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// NXDOMAIN, or no record of the asked type.
    #[error("not found")]
    NotFound,
    #[error("timed out")]
    Timeout,
    #[error("lookup failed: {0}")]
    Failed(String),
    /// DNSSEC validation failed: signatures that do not verify, or missing where the chain of
    /// trust says they must be (RFC 4035 §4.3 "bogus").
    #[error("DNSSEC validation failed (bogus)")]
    Bogus,
}

impl From<NetError> for DnsError {
    fn from(err: NetError) -> DnsError {
        if matches!(err, NetError::Dns(WireError::DnssecBogus)) {
            DnsError::Bogus
        } else if err.is_nx_domain() || err.is_no_records_found() {
            DnsError::NotFound
        } else if matches!(err, NetError::Timeout) {
            DnsError::Timeout
        } else {
            DnsError::Failed(err.to_string())
        }
    }
}

pub struct Dns {
    resolver: TokioResolver,
    /// The validating resolver, for DANE.
    validating: TokioResolver,
}

/// An answer and whether DNSSEC proved it (RFC 4035 §4.3: secure), or proved its zone
/// unsigned (insecure). Bogus answers are [`DnsError::Bogus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validated<T> {
    pub secure: bool,
    pub answer: T,
}

/// One TLSA record (RFC 6698 §2.1): certificate usage, selector, matching type, data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlsa {
    pub usage: u8,
    pub selector: u8,
    pub matching: u8,
    pub data: Vec<u8>,
}

impl std::fmt::Display for Tlsa {
    /// Presentation form (RFC 6698 §2.2), as TLS reports quote the policy.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {} ", self.usage, self.selector, self.matching)?;
        self.data.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

fn name_server(address: SocketAddr) -> NameServerConfig {
    let mut server = NameServerConfig::udp_and_tcp(address.ip());
    for connection in &mut server.connections {
        connection.port = address.port();
    }
    server
}

impl Dns {
    pub fn new(config: &DnsConfig) -> Result<Dns, DnsError> {
        let resolver = Dns::resolver_for(config, None)?;
        let anchors = match &config.trust_anchor {
            Some(path) => TrustAnchors::from_file(path)
                .map_err(|e| DnsError::Failed(format!("trust anchor {}: {e}", path.display())))?,
            None => TrustAnchors::default(),
        };
        let validating = Dns::resolver_for(config, Some(anchors))?;
        Ok(Dns {
            resolver,
            validating,
        })
    }

    fn resolver_for(
        config: &DnsConfig,
        anchors: Option<TrustAnchors>,
    ) -> Result<TokioResolver, DnsError> {
        let mut options = ResolverOpts::default();
        options.timeout = Duration::from_millis(config.timeout_ms);
        options.attempts = 2;
        let builder = if config.nameservers.is_empty() {
            Resolver::builder_tokio()
                .map_err(|e| DnsError::Failed(format!("system resolver configuration: {e}")))?
        } else {
            let servers = config
                .nameservers
                .iter()
                .copied()
                .map(name_server)
                .collect();
            Resolver::builder_with_config(
                ResolverConfig::from_parts(None, Vec::new(), servers),
                TokioRuntimeProvider::default(),
            )
        };
        let mut builder = builder.with_options(options);
        if let Some(anchors) = anchors {
            builder = builder.with_trust_anchor(std::sync::Arc::new(anchors));
        }
        builder.build().map_err(|e| DnsError::Failed(e.to_string()))
    }

    /// The TLSA records of `_port._tcp.host` (RFC 7672 §2.2.3), validated. No records is
    /// an empty answer, secure or not as the denial was proved.
    pub async fn tlsa(&self, host: &str, port: u16) -> Result<Validated<Vec<Tlsa>>, DnsError> {
        let name = format!("_{port}._tcp.{}", fqdn(host));
        match self.validating.tlsa_lookup(name).await {
            Ok(lookup) => Ok(Validated {
                secure: all_secure(lookup.answers()),
                answer: lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::TLSA(t) => Some(Tlsa {
                            usage: t.cert_usage.into(),
                            selector: t.selector.into(),
                            matching: t.matching.into(),
                            data: t.cert_data.clone(),
                        }),
                        _ => None,
                    })
                    .collect(),
            }),
            Err(err) => Ok(Validated {
                secure: negative(err)?,
                answer: Vec::new(),
            }),
        }
    }

    /// The resolver itself, for libraries that query through it (mail-auth).
    pub fn resolver(&self) -> &TokioResolver {
        &self.resolver
    }

    /// IPv4 addresses of a name.
    pub async fn a(&self, name: &str) -> Result<Vec<Ipv4Addr>, DnsError> {
        let lookup = self.resolver.ipv4_lookup(fqdn(name)).await?;
        Ok(lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect())
    }

    /// MX records of a domain as (preference, exchange without the final dot). `Ok(vec![])`
    /// when the domain exists without MX records (RFC 5321 §5.1: then its address is the MX);
    /// [`DnsError::NotFound`] when the domain does not exist.
    pub async fn mx(&self, domain: &str) -> Result<Vec<(u16, String)>, DnsError> {
        match self.resolver.mx_lookup(fqdn(domain)).await {
            Ok(lookup) => Ok(exchanges(lookup.answers())),
            Err(err) if err.is_no_records_found() && !err.is_nx_domain() => Ok(Vec::new()),
            Err(err) => Err(err.into()),
        }
    }

    /// [`Dns::mx`] through the validating resolver, and whether the answer (or the denial) is
    /// DNSSEC-secure: RFC 7672 §2.2.1 uses TLSA records only of hosts from a secure MX RRset,
    /// and a bogus one is an error (the caller defers).
    pub async fn mx_validated(
        &self,
        domain: &str,
    ) -> Result<Validated<Vec<(u16, String)>>, DnsError> {
        match self.validating.mx_lookup(fqdn(domain)).await {
            Ok(lookup) => Ok(Validated {
                secure: all_secure(lookup.answers()),
                answer: exchanges(lookup.answers()),
            }),
            Err(err) if err.is_nx_domain() => Err(DnsError::NotFound),
            Err(NetError::Dns(WireError::Nsec { response, .. }))
                if response.response_code == ResponseCode::NXDomain =>
            {
                Err(DnsError::NotFound)
            }
            Err(err) => Ok(Validated {
                secure: negative(err)?,
                answer: Vec::new(),
            }),
        }
    }

    /// Addresses (IPv4 and IPv6) of a host name.
    pub async fn ips(&self, host: &str) -> Result<Vec<std::net::IpAddr>, DnsError> {
        let lookup = self.resolver.lookup_ip(fqdn(host)).await?;
        Ok(lookup.iter().collect())
    }

    /// TXT records of a name, each record's strings joined.
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, DnsError> {
        let lookup = self.resolver.txt_lookup(fqdn(name)).await?;
        Ok(lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::TXT(txt) => Some(
                    txt.txt_data
                        .iter()
                        .map(|part| String::from_utf8_lossy(part).into_owned())
                        .collect::<String>(),
                ),
                _ => None,
            })
            .collect())
    }
}

/// The one record of a name's TXT records that starts with `version` (`v=STSv1`,
/// `v=TLSRPTv1`); RFC 8461 §3.1 and RFC 8460 §3 take none, or more than one, as no record.
pub fn versioned_record<'a>(records: &'a [String], version: &str) -> Option<&'a str> {
    let mut ours = records
        .iter()
        .filter(|r| r.trim_start().starts_with(version));
    match (ours.next(), ours.next()) {
        (Some(record), None) => Some(record.trim_start()),
        _ => None,
    }
}

fn exchanges(records: &[Record]) -> Vec<(u16, String)> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            RData::MX(mx) => Some((mx.preference, mx.exchange.to_string())),
            _ => None,
        })
        .map(|(preference, exchange)| {
            let exchange = exchange.strip_suffix('.').unwrap_or(&exchange).to_string();
            (preference, exchange)
        })
        .collect()
}

fn all_secure(records: &[Record]) -> bool {
    !records.is_empty() && records.iter().all(|r| r.proof == Proof::Secure)
}

/// A validated "no such records": whether the denial is secure (an NSEC/NSEC3 proof, RFC 4035
/// §5.4); bogus and lookup failures stay errors.
fn negative(err: NetError) -> Result<bool, DnsError> {
    match err {
        NetError::Dns(WireError::Nsec { proof, .. }) => match proof {
            Proof::Secure => Ok(true),
            Proof::Insecure => Ok(false),
            _ => Err(DnsError::Bogus),
        },
        err if err.is_no_records_found() || err.is_nx_domain() => Ok(false),
        err => Err(err.into()),
    }
}

/// Names are absolute: no search-domain guessing for DNSBL or MX names.
fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}
