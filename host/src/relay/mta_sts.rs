//! MTA-STS (RFC 8461): a domain's published demand that mail to it go over TLS that verifies,
//! to MX hosts its policy names.
//!
//! The policy's presence and version are announced in DNS (`_mta-sts.<domain>` TXT,
//! `v=STSv1; id=…`) and the policy itself is fetched over HTTPS from
//! `https://mta-sts.<domain>/.well-known/mta-sts.txt`, its certificate verified against
//! `ca_file` and no redirect followed (§3.3). Policies are cached in memory and on disk
//! (`<data_dir>/mta-sts/<domain>`) for their `max_age`, so a restart or an attacker who blocks
//! the TXT lookup does not make the relay forget one (§5.1: a cached policy stays in force until
//! it expires, whatever DNS says meanwhile; a new `id` fetches it again).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use crate::dns::Dns;

/// §3.2: the policy file is at most 64 KiB.
const MAX_POLICY: usize = 64 * 1024;
/// §3.2: max_age is at most a year.
const MAX_AGE: u64 = 31_557_600;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// MX hosts must match and TLS must verify, or the mail waits.
    Enforce,
    /// Delivery as without a policy; what would have failed is reported (TLS-RPT).
    Testing,
    /// The domain withdrew its policy.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// The TXT record's id when it was fetched.
    pub id: String,
    pub mode: Mode,
    /// MX host patterns (`mail.example.com`, `*.example.net`).
    pub mx: Vec<String>,
    pub max_age: u64,
    /// Unix seconds when it was fetched.
    pub fetched_at: i64,
    /// Its lines, as TLS reports quote them (RFC 8460 §4.4 `policy-string`).
    pub lines: Vec<String>,
}

impl Policy {
    /// Parses a policy file (§3.2): `key: value` lines, CRLF or LF; unknown keys are ignored.
    pub fn parse(text: &str, id: &str, fetched_at: i64) -> Result<Policy, String> {
        let (mut version, mut mode, mut max_age) = (None, None, None);
        let mut mx = Vec::new();
        let mut lines = Vec::new();
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                return Err(format!("not a `key: value` line: {line:?}"));
            };
            let value = value.trim();
            match key.trim() {
                "version" => version = Some(value.to_string()),
                "mode" => {
                    mode = Some(match value {
                        "enforce" => Mode::Enforce,
                        "testing" => Mode::Testing,
                        "none" => Mode::None,
                        other => return Err(format!("unknown mode {other:?}")),
                    })
                }
                "max_age" => {
                    let age: u64 = value
                        .parse()
                        .map_err(|_| format!("max_age {value:?} is not a number"))?;
                    max_age = Some(age.min(MAX_AGE));
                }
                "mx" => mx.push(value.trim_end_matches('.').to_ascii_lowercase()),
                _ => {}
            }
            lines.push(line.to_string());
        }
        if version.as_deref() != Some("STSv1") {
            return Err("version is not STSv1".into());
        }
        let mode = mode.ok_or("no mode")?;
        let max_age = max_age.ok_or("no max_age")?;
        if mode != Mode::None && mx.is_empty() {
            return Err("no mx".into());
        }
        Ok(Policy {
            id: id.to_string(),
            mode,
            mx,
            max_age,
            fetched_at,
            lines,
        })
    }

    /// Whether the policy names `host` (§4.1: a `*.` pattern stands for one leftmost label).
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx
            .iter()
            .any(|pattern| match pattern.strip_prefix("*.") {
                Some(parent) => host
                    .split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
                None => *pattern == host,
            })
    }

    fn expired(&self, now: i64) -> bool {
        now >= self.fetched_at.saturating_add(self.max_age as i64)
    }
}

/// A domain's policy, as the relay applies it.
#[derive(Debug, Clone)]
pub enum Sts {
    /// No policy (no record and nothing cached, or mode `none`).
    None,
    Policy(Arc<Policy>),
    /// A record announces a policy, but none could be fetched and none is cached: delivery
    /// goes on as without one (§5.1), and TLS reports say why (RFC 8460 result type).
    Unavailable {
        result_type: &'static str,
        detail: String,
    },
}

/// The id of the one valid `v=STSv1` record among a name's TXT records (§3.1: none, or more
/// than one, is no policy).
pub fn record_id(records: &[String]) -> Option<String> {
    let record = crate::dns::versioned_record(records, "v=STSv1")?;
    let mut fields = record.split(';').map(str::trim).filter(|f| !f.is_empty());
    if fields.next() != Some("v=STSv1") {
        return None;
    }
    fields
        .filter_map(|f| f.split_once('='))
        .find(|(k, _)| k.trim() == "id")
        .map(|(_, v)| v.trim().to_string())
        .filter(|id| (1..=32).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric()))
}

pub struct MtaSts {
    dns: Arc<Dns>,
    /// Verifies the policy host's certificate (`ca_file`).
    connector: Result<TlsConnector, String>,
    /// The HTTPS port (443; tests point it elsewhere).
    port: u16,
    deadline: Duration,
    dir: PathBuf,
    cache: Mutex<HashMap<String, Arc<Policy>>>,
}

impl MtaSts {
    pub fn new(
        dns: Arc<Dns>,
        connector: Result<TlsConnector, String>,
        port: u16,
        deadline: Duration,
        dir: PathBuf,
    ) -> MtaSts {
        MtaSts {
            dns,
            connector,
            port,
            deadline,
            dir,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The policy in force for `domain` now (§5.1).
    pub async fn policy(&self, domain: &str) -> Sts {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let now = chrono::Utc::now().timestamp();
        let cached = self.cached(&domain).filter(|p| !p.expired(now));
        let id = match self.dns.txt(&format!("_mta-sts.{domain}")).await {
            Ok(records) => record_id(&records),
            Err(err) => {
                debug!(%domain, "no MTA-STS record: {err}");
                None
            }
        };
        let in_force = |policy: Arc<Policy>| match policy.mode {
            Mode::None => Sts::None,
            _ => Sts::Policy(policy),
        };
        let id = match (id, cached) {
            // The record gone or unreadable does not remove a policy still in its max_age.
            (None, Some(policy)) => return in_force(policy),
            (None, None) => return Sts::None,
            (Some(id), Some(policy)) if policy.id == id => return in_force(policy),
            (Some(id), _) => id,
        };
        match self.fetch(&domain, &id, now).await {
            Ok(policy) => {
                info!(%domain, id = %policy.id, mode = ?policy.mode, "MTA-STS policy fetched");
                let policy = Arc::new(policy);
                self.keep(&domain, policy.clone()).await;
                in_force(policy)
            }
            Err((result_type, detail)) => {
                warn!(%domain, "MTA-STS policy not usable: {detail}");
                match self.cached(&domain).filter(|p| !p.expired(now)) {
                    Some(policy) => in_force(policy),
                    None => Sts::Unavailable {
                        result_type,
                        detail,
                    },
                }
            }
        }
    }

    fn cached(&self, domain: &str) -> Option<Arc<Policy>> {
        if let Some(policy) = self.cache.lock().expect("sts cache").get(domain) {
            return Some(policy.clone());
        }
        let file = self.file(domain)?;
        let policy: Policy = serde_json::from_slice(&std::fs::read(file).ok()?).ok()?;
        let policy = Arc::new(policy);
        self.cache
            .lock()
            .expect("sts cache")
            .insert(domain.to_string(), policy.clone());
        Some(policy)
    }

    async fn keep(&self, domain: &str, policy: Arc<Policy>) {
        {
            let mut cache = self.cache.lock().expect("sts cache");
            if cache.len() > 10_000 {
                cache.clear();
            }
            cache.insert(domain.to_string(), policy.clone());
        }
        let (Some(file), Ok(json)) = (self.file(domain), serde_json::to_vec(&*policy)) else {
            return;
        };
        let dir = self.dir.clone();
        let written = tokio::task::spawn_blocking(move || {
            crate::durable::create_dir_all(&dir)?;
            let tmp = file.with_extension("tmp");
            crate::durable::write_and_rename(&tmp, &file, &json)?;
            crate::durable::sync_dir(&dir)
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            warn!(%domain, "cannot keep the MTA-STS policy on disk; it is kept in memory");
        }
    }

    /// The cache file of a domain; None for a name that is no safe file name.
    fn file(&self, domain: &str) -> Option<PathBuf> {
        let safe = !domain.is_empty()
            && !domain.starts_with('.')
            && domain
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
        safe.then(|| self.dir.join(domain))
    }

    /// Fetches and parses the policy (§3.3). Err is the RFC 8460 result type and why.
    async fn fetch(
        &self,
        domain: &str,
        id: &str,
        now: i64,
    ) -> Result<Policy, (&'static str, String)> {
        let fetch_error = |detail: String| ("sts-policy-fetch-error", detail);
        let connector = self
            .connector
            .as_ref()
            .map_err(|e| fetch_error(e.clone()))?;
        let host = format!("mta-sts.{domain}");
        let ips = self
            .dns
            .ips(&host)
            .await
            .map_err(|e| fetch_error(format!("{host}: {e}")))?;
        let mut last = format!("{host} has no address");
        for ip in ips {
            let address = std::net::SocketAddr::new(ip, self.port);
            let fetched = match crate::http::get_https(
                connector,
                address,
                &host,
                "/.well-known/mta-sts.txt",
                self.deadline,
                MAX_POLICY,
            )
            .await
            {
                Ok(fetched) => fetched,
                // A certificate that does not verify is its own result type (§3.3).
                Err(crate::http::FetchError::Tls(err)) => return Err(("sts-webpki-invalid", err)),
                Err(err) => {
                    last = err.to_string();
                    continue;
                }
            };
            if fetched.status != 200 {
                return Err(fetch_error(format!(
                    "{host} answered HTTP {}",
                    fetched.status
                )));
            }
            let text_plain = fetched
                .content_type
                .as_deref()
                .is_some_and(|t| t.trim().to_ascii_lowercase().starts_with("text/plain"));
            if !text_plain {
                return Err(("sts-policy-invalid", format!("{host}: not text/plain")));
            }
            let text = std::str::from_utf8(&fetched.body)
                .map_err(|_| ("sts-policy-invalid", format!("{host}: not UTF-8")))?;
            return Policy::parse(text, id, now)
                .map_err(|e| ("sts-policy-invalid", format!("{host}: {e}")));
        }
        Err(fetch_error(last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_and_match_mx_hosts() {
        let text = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 604800\r\n";
        let policy = Policy::parse(text, "20160831085700Z", 0).unwrap();
        assert_eq!(policy.mode, Mode::Enforce);
        assert_eq!(policy.max_age, 604_800);
        assert_eq!(policy.lines.len(), 5);
        assert!(policy.allows("mail.example.com"));
        assert!(policy.allows("MAIL.example.com."));
        assert!(policy.allows("mx1.example.net"));
        // §4.1: the wildcard is one label, not any depth, not the parent itself.
        assert!(!policy.allows("a.b.example.net"));
        assert!(!policy.allows("example.net"));
        assert!(!policy.allows("evil-mail.example.com"));
        assert!(!policy.expired(604_799));
        assert!(policy.expired(604_800));

        assert!(
            Policy::parse("version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n", "1", 0).is_err()
        );
        assert!(Policy::parse("version: STSv1\nmode: enforce\nmax_age: 1\n", "1", 0).is_err());
        assert!(
            Policy::parse("version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n", "1", 0).is_err()
        );
        let none = Policy::parse("version: STSv1\nmode: none\nmax_age: 86400\n", "1", 0).unwrap();
        assert_eq!(none.mode, Mode::None);
        let long = Policy::parse(
            "version: STSv1\nmode: testing\nmx: a\nmax_age: 99999999999\n",
            "1",
            0,
        )
        .unwrap();
        assert_eq!(long.max_age, MAX_AGE);
    }

    #[test]
    fn one_valid_record_announces_a_policy() {
        let one = |r: &str| record_id(&[r.to_string()]);
        assert_eq!(
            one("v=STSv1; id=20160831085700Z;"),
            Some("20160831085700Z".into())
        );
        assert_eq!(one("v=STSv1;id=abc"), Some("abc".into()));
        assert_eq!(one("v=STSv1; id=has-dash;"), None);
        assert_eq!(one("v=STSv1;"), None);
        assert_eq!(one("v=spf1 -all"), None);
        let two = ["v=STSv1; id=a;".to_string(), "v=STSv1; id=b;".to_string()];
        assert_eq!(record_id(&two), None, "§3.1: more than one is none");
        let mixed = ["v=spf1 -all".to_string(), "v=STSv1; id=a;".to_string()];
        assert_eq!(record_id(&mixed), Some("a".into()));
    }
}
