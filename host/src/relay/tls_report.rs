//! SMTP TLS reporting (RFC 8460): what became of TLS in each session with a domain's MX hosts,
//! counted per recipient domain and policy, and sent once a period (`tls_report_interval`, a
//! day by default) as the aggregate JSON report, gzipped, to the addresses the domain publishes
//! in `_smtp._tls.<domain>` (`v=TLSRPTv1; rua=mailto:…`). Domains without that record get no
//! report; `https:` addresses are not posted to (only `mailto:`). Counts live in memory: a
//! restart starts a new period.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use chrono::{TimeZone, Utc};
use tracing::{info, warn};

use crate::address::Address;
use crate::queue::{Envelope, Queue, Recipient};

/// Domains counted at once; past it new domains are not (a relay for millions of domains
/// reports on the first ten thousand of a period).
const MAX_DOMAINS: usize = 10_000;

/// The policy sessions are counted under (RFC 8460 §4.4).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReportPolicy {
    /// `tlsa`, `sts` or `no-policy-found`.
    pub kind: &'static str,
    /// The policy's lines (`policy-string`).
    pub strings: Vec<String>,
    /// Its MX patterns (`mx-host`).
    pub mx: Vec<String>,
}

impl ReportPolicy {
    pub fn none() -> ReportPolicy {
        ReportPolicy {
            kind: "no-policy-found",
            strings: Vec::new(),
            mx: Vec::new(),
        }
    }

    /// DANE: the MX host's usable TLSA records in presentation form (§4.4).
    pub fn tlsa(host: &str, records: &[crate::dns::Tlsa]) -> ReportPolicy {
        ReportPolicy {
            kind: "tlsa",
            strings: records.iter().map(|r| r.to_string()).collect(),
            mx: vec![host.to_string()],
        }
    }

    pub fn sts(policy: &super::mta_sts::Policy) -> ReportPolicy {
        ReportPolicy {
            kind: "sts",
            strings: policy.lines.clone(),
            mx: policy.mx.clone(),
        }
    }
}

/// One session's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Result {
    Success,
    /// The RFC 8460 §4.3 result type.
    Failure(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FailureKey {
    result_type: &'static str,
    mx_host: Option<String>,
    ip: Option<String>,
}

#[derive(Debug, Default)]
struct Counts {
    successes: u64,
    failures: HashMap<FailureKey, u64>,
}

#[derive(Default)]
struct Period {
    /// Unix seconds it began.
    start: i64,
    domains: HashMap<String, HashMap<ReportPolicy, Counts>>,
}

/// The counts of the current period.
pub struct TlsReports {
    period: Mutex<Period>,
}

impl Default for TlsReports {
    fn default() -> Self {
        TlsReports {
            period: Mutex::new(Period {
                start: Utc::now().timestamp(),
                domains: HashMap::new(),
            }),
        }
    }
}

impl TlsReports {
    /// Counts one session with (or attempt at) `mx_host` of `domain`.
    pub fn record(
        &self,
        domain: &str,
        policy: &ReportPolicy,
        mx_host: Option<&str>,
        ip: Option<std::net::IpAddr>,
        result: Result,
    ) {
        let mut period = self.period.lock().expect("tls reports");
        let domain = domain.to_ascii_lowercase();
        if !period.domains.contains_key(&domain) && period.domains.len() >= MAX_DOMAINS {
            return;
        }
        let counts = period
            .domains
            .entry(domain)
            .or_default()
            .entry(policy.clone())
            .or_default();
        match result {
            Result::Success => counts.successes += 1,
            Result::Failure(result_type) => {
                let key = FailureKey {
                    result_type,
                    mx_host: mx_host.map(str::to_string),
                    ip: ip.map(|ip| ip.to_string()),
                };
                *counts.failures.entry(key).or_default() += 1;
            }
        }
    }

    /// Ends the period: its counts, its start and end; a new period begins.
    fn take(&self) -> (i64, i64, HashMap<String, HashMap<ReportPolicy, Counts>>) {
        let mut period = self.period.lock().expect("tls reports");
        let now = Utc::now().timestamp();
        let ended = std::mem::replace(
            &mut *period,
            Period {
                start: now,
                domains: HashMap::new(),
            },
        );
        (ended.start, now, ended.domains)
    }
}

/// The `mailto:` addresses of a domain's TLSRPT record (§3: none, or more than one, is none).
pub fn rua(records: &[String]) -> Vec<String> {
    let Some(record) = crate::dns::versioned_record(records, "v=TLSRPTv1") else {
        return Vec::new();
    };
    record
        .split(';')
        .filter_map(|f| f.trim().strip_prefix("rua="))
        .flat_map(|list| list.split(','))
        .filter_map(|uri| uri.trim().strip_prefix("mailto:"))
        .filter(|a| Address::parse(a).is_some())
        .map(str::to_string)
        .collect()
}

fn rfc3339(ts: i64) -> String {
    Utc.timestamp_opt(ts, 0)
        .single()
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The report (§4) of one domain's period, as JSON.
fn report_json(
    hostname: &str,
    report_id: &str,
    domain: &str,
    (start, end): (i64, i64),
    policies: &HashMap<ReportPolicy, Counts>,
) -> serde_json::Value {
    let policies: Vec<serde_json::Value> = policies
        .iter()
        .map(|(policy, counts)| {
            let failed: u64 = counts.failures.values().sum();
            let details: Vec<serde_json::Value> = counts
                .failures
                .iter()
                .map(|(key, n)| {
                    let mut detail = serde_json::json!({
                        "result-type": key.result_type,
                        "failed-session-count": n,
                    });
                    if let Some(mx) = &key.mx_host {
                        detail["receiving-mx-hostname"] = mx.clone().into();
                    }
                    if let Some(ip) = &key.ip {
                        detail["receiving-ip"] = ip.clone().into();
                    }
                    detail
                })
                .collect();
            let mut entry = serde_json::json!({
                "policy": {
                    "policy-type": policy.kind,
                    "policy-domain": domain,
                },
                "summary": {
                    "total-successful-session-count": counts.successes,
                    "total-failure-session-count": failed,
                },
                "failure-details": details,
            });
            if !policy.strings.is_empty() {
                entry["policy"]["policy-string"] = policy.strings.clone().into();
            }
            if !policy.mx.is_empty() {
                entry["policy"]["mx-host"] = policy.mx.clone().into();
            }
            entry
        })
        .collect();
    serde_json::json!({
        "organization-name": hostname,
        "date-range": {
            "start-datetime": rfc3339(start),
            "end-datetime": rfc3339(end),
        },
        "contact-info": format!("postmaster@{hostname}"),
        "report-id": report_id,
        "policies": policies,
    })
}

/// The report mail (§5.3): multipart/report of type tlsrpt with the gzipped JSON.
fn report_mail(
    hostname: &str,
    report_id: &str,
    domain: &str,
    to: &str,
    (start, end): (i64, i64),
    json: &serde_json::Value,
) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let _ = gz.write_all(json.to_string().as_bytes());
    let gzipped = gz.finish().unwrap_or_default();
    let encoded = base64::engine::general_purpose::STANDARD.encode(gzipped);
    let boundary = format!("tlsrpt/{report_id}");
    let file = format!("{hostname}!{domain}!{start}!{end}.json.gz");
    let mut out = format!(
        "From: TLS reporting <postmaster@{hostname}>\r\n\
         To: <{to}>\r\n\
         Subject: Report Domain: {domain} Submitter: {hostname} Report-ID: <{report_id}>\r\n\
         Date: {}\r\n\
         Message-ID: <{report_id}>\r\n\
         TLS-Report-Domain: {domain}\r\n\
         TLS-Report-Submitter: {hostname}\r\n\
         Auto-Submitted: auto-generated\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=\"tlsrpt\";\r\n\tboundary=\"{boundary}\"\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         This is an aggregate TLS report (RFC 8460) from {hostname} for {domain}.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: application/tlsrpt+gzip\r\n\
         Content-Transfer-Encoding: base64\r\n\
         Content-Disposition: attachment; filename=\"{file}\"\r\n\
         \r\n",
        Utc::now().to_rfc2822(),
    );
    for line in encoded.as_bytes().chunks(76) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push_str("\r\n");
    }
    out.push_str(&format!("\r\n--{boundary}--\r\n"));
    out.into_bytes()
}

/// Sends each period's reports, every `interval`, until the process ends.
pub async fn run(
    reports: Arc<TlsReports>,
    dns: Arc<crate::dns::Dns>,
    queue: Queue,
    users: Arc<crate::auth::UserDirectory>,
    hostname: String,
    interval: Duration,
) {
    let mut sent = 0u64;
    loop {
        tokio::time::sleep(interval).await;
        let (start, end, domains) = reports.take();
        for (domain, policies) in domains {
            let to = match dns.txt(&format!("_smtp._tls.{domain}")).await {
                Ok(records) => rua(&records),
                Err(_) => Vec::new(),
            };
            for address in to {
                sent += 1;
                let report_id = format!("{start}.{sent}@{hostname}");
                let json = report_json(&hostname, &report_id, &domain, (start, end), &policies);
                let bytes = report_mail(
                    &hostname,
                    &report_id,
                    &domain,
                    &address,
                    (start, end),
                    &json,
                );
                let Some(route) = super::notice_route(&users, &address) else {
                    continue;
                };
                let envelope = Envelope {
                    id: queue.new_id(),
                    received_at: Utc::now().timestamp(),
                    // Reports come from the null sender, so they never bounce back (§5.3
                    // leaves it open; Postfix's and Stalwart's DSNs do the same).
                    sender: String::new(),
                    recipients: vec![Recipient::new(address.clone(), route)],
                    helo: hostname.clone(),
                    peer: "local".into(),
                    auth_user: None,
                    smtputf8: false,
                    message_len: bytes.len() as u64,
                    quarantine: None,
                    filtered: false,
                    dsn: Default::default(),
                    require_tls: false,
                };
                match queue.submit(envelope, Arc::new(bytes)).await {
                    Ok(()) => info!(%domain, to = %address, "TLS report queued"),
                    Err(err) => warn!(%domain, "cannot queue the TLS report: {err}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rua_takes_the_mailto_addresses_of_the_one_record() {
        let one = |r: &str| rua(&[r.to_string()]);
        assert_eq!(
            one("v=TLSRPTv1; rua=mailto:tls@example.net,https://r.example.net/x"),
            vec!["tls@example.net"]
        );
        assert_eq!(
            one("v=TLSRPTv1;rua=mailto:a@x.test, mailto:b@y.test"),
            vec!["a@x.test", "b@y.test"]
        );
        assert!(one("v=spf1 -all").is_empty());
        let two = [
            "v=TLSRPTv1; rua=mailto:a@x.test".to_string(),
            "v=TLSRPTv1; rua=mailto:b@x.test".to_string(),
        ];
        assert!(rua(&two).is_empty());
    }

    #[test]
    fn counts_make_the_report() {
        let reports = TlsReports::default();
        let sts = ReportPolicy {
            kind: "sts",
            strings: vec!["version: STSv1".into(), "mode: testing".into()],
            mx: vec!["mx.example.net".into()],
        };
        let ip = Some("192.0.2.1".parse().unwrap());
        reports.record(
            "Example.net",
            &sts,
            Some("mx.example.net"),
            ip,
            Result::Success,
        );
        reports.record(
            "example.net",
            &sts,
            Some("mx.example.net"),
            ip,
            Result::Success,
        );
        reports.record(
            "example.net",
            &sts,
            Some("mx2.example.net"),
            ip,
            Result::Failure("validation-failure"),
        );
        let (start, end, domains) = reports.take();
        assert!(reports.take().2.is_empty(), "a new period starts empty");
        let json = report_json(
            "mx.test",
            "R1",
            "example.net",
            (start, end),
            &domains["example.net"],
        );
        let policy = &json["policies"][0];
        assert_eq!(policy["policy"]["policy-type"], "sts");
        assert_eq!(policy["policy"]["mx-host"][0], "mx.example.net");
        assert_eq!(policy["summary"]["total-successful-session-count"], 2);
        assert_eq!(policy["summary"]["total-failure-session-count"], 1);
        assert_eq!(
            policy["failure-details"][0]["result-type"],
            "validation-failure"
        );
        assert_eq!(
            policy["failure-details"][0]["receiving-mx-hostname"],
            "mx2.example.net"
        );
        let mail = report_mail(
            "mx.test",
            "R1",
            "example.net",
            "tls@example.net",
            (start, end),
            &json,
        );
        let parsed = mail_parser::MessageParser::default().parse(&mail).unwrap();
        let attachment = parsed.attachment(0).expect("the gzipped report");
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut flate2::read::GzDecoder::new(attachment.contents()),
            &mut text,
        )
        .unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&text).unwrap(),
            json
        );
    }
}
