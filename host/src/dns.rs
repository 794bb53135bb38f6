//! DNS resolution: the server's one resolver (hickory-resolver), used by the plugins' `dns`
//! capability (DNSBL checks) and the outbound relay's MX lookups.
//!
//! Name servers come from the configuration (`[dns] nameservers`), so tests and operators can
//! point it at a resolver of their choice; without any, the system's resolv.conf is used.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::RData;
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
}

impl From<NetError> for DnsError {
    fn from(err: NetError) -> DnsError {
        if err.is_nx_domain() || err.is_no_records_found() {
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
        let resolver = builder
            .with_options(options)
            .build()
            .map_err(|e| DnsError::Failed(e.to_string()))?;
        Ok(Dns { resolver })
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
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::MX(mx) => Some((mx.preference, mx.exchange.to_string())),
                    _ => None,
                })
                .map(|(preference, exchange)| {
                    let exchange = exchange.strip_suffix('.').unwrap_or(&exchange).to_string();
                    (preference, exchange)
                })
                .collect()),
            Err(err) if err.is_no_records_found() && !err.is_nx_domain() => Ok(Vec::new()),
            Err(err) => Err(err.into()),
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

/// Names are absolute: no search-domain guessing for DNSBL or MX names.
fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}
