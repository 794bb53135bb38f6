//! Sender authentication with mail-auth: DKIM signing of mail our users send (RFC 6376), and for
//! mail that arrives from outside, SPF (RFC 7208), DKIM, DMARC (RFC 7489) and ARC (RFC 8617)
//! checks summed up in an Authentication-Results header (RFC 8601) and handed to the data hook.

use std::net::IpAddr;
use std::path::Path;

use mail_auth::common::crypto::{RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DkimResult, DmarcResult, MessageAuthenticator,
    SpfResult,
};

use crate::config::Config;
use crate::dns::Dns;

/// Header fields covered by our DKIM signatures (those a forwarder has no business changing).
const SIGNED_HEADERS: [&str; 12] = [
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "To",
    "Cc",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];

struct SigningKey {
    domain: String,
    /// User keys of other domains allowed to sign as this one.
    users: Vec<String>,
    signer: DkimSigner<RsaKey<Sha256>, Done>,
}

/// What the checks found, in RFC 8601 result words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub spf: String,
    pub dkim: String,
    pub dmarc: String,
    /// The DMARC policy the From domain publishes (`none`, `quarantine`, `reject`), or empty.
    pub dmarc_policy: String,
    pub arc: String,
    /// The RFC 5322 From domain the DMARC result is about.
    pub from_domain: String,
    /// The Authentication-Results field to add (name, value), when checks ran.
    pub header: Option<(String, String)>,
}

impl Default for Verification {
    fn default() -> Self {
        Verification {
            spf: "none".into(),
            dkim: "none".into(),
            dmarc: "none".into(),
            dmarc_policy: String::new(),
            arc: "none".into(),
            from_domain: String::new(),
            header: None,
        }
    }
}

pub struct MessageAuth {
    hostname: String,
    verifier: Option<MessageAuthenticator>,
    keys: Vec<SigningKey>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read DKIM key {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("DKIM key {path} is not an RSA private key in PEM (PKCS#1 or PKCS#8): {reason}")]
    Parse {
        path: std::path::PathBuf,
        reason: String,
    },
}

fn load_key(path: &Path) -> Result<RsaKey<Sha256>, KeyError> {
    let pem = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    use rustls_pki_types::pem::PemObject;
    let parse_error = |reason: String| KeyError::Parse {
        path: path.to_path_buf(),
        reason,
    };
    let der = rustls_pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|err| parse_error(err.to_string()))?;
    RsaKey::<Sha256>::from_key_der(der).map_err(|err| parse_error(err.to_string()))
}

impl MessageAuth {
    /// Loads the signing keys; verification uses the server's resolver (none: checks say
    /// `temperror`-free `none`, nothing is looked up).
    pub fn new(config: &Config, dns: Option<&Dns>) -> Result<MessageAuth, KeyError> {
        let mut keys = Vec::new();
        for key in &config.dkim {
            let signer = DkimSigner::from_key(load_key(&key.key)?)
                .domain(key.domain.to_ascii_lowercase())
                .selector(&key.selector)
                .headers(SIGNED_HEADERS)
                .header_canonicalization(Canonicalization::Relaxed)
                .body_canonicalization(Canonicalization::Relaxed);
            keys.push(SigningKey {
                domain: key.domain.to_ascii_lowercase(),
                users: key
                    .users
                    .iter()
                    .filter_map(|u| crate::address::Address::parse(u))
                    .map(|a| a.mailbox_key())
                    .collect(),
                signer,
            });
        }
        let verifier = match (config.mail_auth.verify_inbound, dns) {
            (true, Some(dns)) => Some(MessageAuthenticator(dns.resolver().clone())),
            _ => None,
        };
        Ok(MessageAuth {
            hostname: config.server.hostname.clone(),
            verifier,
            keys,
        })
    }

    pub fn verifies(&self) -> bool {
        self.verifier.is_some()
    }

    /// A `DKIM-Signature` field (with CRLF) for a message `user` sent, when we hold a key for
    /// its From domain and that domain is the user's own or one it is listed for: a signature
    /// vouches for the domain, so no user may have it put on another domain's mail.
    pub fn sign(&self, message: &[u8], user: &str) -> Option<String> {
        let domain = from_domain(message)?;
        let key = self.keys.iter().find(|k| k.domain == domain)?;
        let own_domain = user
            .rsplit_once('@')
            .is_some_and(|(_, d)| d.eq_ignore_ascii_case(&domain));
        if !own_domain && !key.users.iter().any(|u| u.eq_ignore_ascii_case(user)) {
            tracing::info!(%domain, %user, "not signed: the From domain is not the user's");
            return None;
        }
        match key.signer.sign(message) {
            Ok(signature) => Some(signature.to_header()),
            Err(err) => {
                tracing::warn!(%domain, "DKIM signing failed: {err}");
                None
            }
        }
    }

    /// Checks a message from outside: SPF for the client and MAIL FROM (or HELO for a null
    /// sender), DKIM signatures, ARC chain, and DMARC for the From domain.
    pub async fn verify(
        &self,
        message: &[u8],
        ip: IpAddr,
        helo: &str,
        mail_from: &str,
    ) -> Verification {
        let Some(verifier) = &self.verifier else {
            return Verification::default();
        };
        let Some(parsed) = AuthenticatedMessage::parse(message) else {
            return Verification::default();
        };
        let helo_domain = if helo.is_empty() { "unknown" } else { helo };
        let spf = if mail_from.is_empty() {
            verifier
                .verify_spf(SpfParameters::verify_ehlo(ip, helo_domain, &self.hostname))
                .await
        } else {
            verifier
                .verify_spf(SpfParameters::verify_mail_from(
                    ip,
                    helo_domain,
                    &self.hostname,
                    mail_from,
                ))
                .await
        };
        let dkim = verifier.verify_dkim(&parsed).await;
        let arc = verifier.verify_arc(&parsed).await;
        let mail_from_domain = mail_from
            .rsplit_once('@')
            .map(|(_, d)| d)
            .unwrap_or(helo_domain);
        let dmarc = verifier
            .verify_dmarc(DmarcParameters::new(&parsed, &dkim, mail_from_domain, &spf))
            .await;
        let from = parsed.from.first().map(String::as_str).unwrap_or_default();
        let results = AuthenticationResults::new(&self.hostname)
            .with_spf_mailfrom_result(&spf, ip, mail_from, helo_domain)
            .with_dkim_results(&dkim, from);
        let header = results.to_header();
        let mut value = header
            .strip_prefix("Authentication-Results:")
            .unwrap_or(&header)
            .trim()
            .to_string();
        let dkim_summary = if dkim.iter().any(|d| d.result() == &DkimResult::Pass) {
            "pass"
        } else {
            dkim.first()
                .map(|d| dkim_word(d.result()))
                .unwrap_or("none")
        };
        // mail-auth leaves both results at None when a record exists but neither SPF nor DKIM
        // produced an aligned pass; RFC 7489 §6.6.2 calls that a failure.
        let dmarc_word = match (dmarc.dkim_result(), dmarc.spf_result()) {
            (DmarcResult::Pass, _) | (_, DmarcResult::Pass) => "pass",
            (DmarcResult::TempError(_), _) | (_, DmarcResult::TempError(_)) => "temperror",
            (DmarcResult::PermError(_), _) | (_, DmarcResult::PermError(_)) => "permerror",
            _ if dmarc.dmarc_record().is_none() => "none",
            _ => "fail",
        };
        let policy = match dmarc.dmarc_record() {
            None => "",
            Some(_) => match dmarc.policy() {
                mail_auth::dmarc::Policy::Reject => "reject",
                mail_auth::dmarc::Policy::Quarantine => "quarantine",
                _ => "none",
            },
        };
        if dkim.is_empty() {
            value.push_str(";\r\n\tdkim=none");
        }
        // Written here, not by mail-auth: it reports a broken body hash as `neutral`, which
        // RFC 8617 §7 does not know for ARC (none, pass or fail).
        let arc_result = arc_word(arc.result());
        value.push_str(&format!(";\r\n\tarc={arc_result} smtp.remote-ip={ip}"));
        value.push_str(&format!(";\r\n\tdmarc={dmarc_word}"));
        if !dmarc.domain().is_empty() {
            value.push_str(&format!(" header.from={}", dmarc.domain()));
        }
        if !policy.is_empty() {
            value.push_str(&format!(" policy.dmarc={policy}"));
        }
        Verification {
            spf: spf_word(spf.result()).into(),
            dkim: dkim_summary.into(),
            dmarc: dmarc_word.into(),
            dmarc_policy: policy.into(),
            arc: arc_result.into(),
            from_domain: dmarc.domain().to_string(),
            header: Some(("Authentication-Results".into(), value)),
        }
    }
}

fn spf_word(result: SpfResult) -> &'static str {
    match result {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
        SpfResult::None => "none",
    }
}

fn dkim_word(result: &DkimResult) -> &'static str {
    match result {
        DkimResult::Pass => "pass",
        DkimResult::Neutral(_) => "neutral",
        DkimResult::Fail(_) => "fail",
        DkimResult::PermError(_) => "permerror",
        DkimResult::TempError(_) => "temperror",
        DkimResult::None => "none",
    }
}

fn arc_word(result: &DkimResult) -> &'static str {
    match result {
        DkimResult::Pass => "pass",
        DkimResult::None => "none",
        DkimResult::TempError(_) => "temperror",
        DkimResult::Neutral(_) | DkimResult::Fail(_) | DkimResult::PermError(_) => "fail",
    }
}

/// The domain of the first address in the From field, lower-cased.
pub fn from_domain(message: &[u8]) -> Option<String> {
    let from = crate::message::header_values(message, "From")
        .into_iter()
        .next()?;
    let address = match (from.rfind('<'), from.rfind('>')) {
        (Some(start), Some(end)) if start < end => &from[start + 1..end],
        _ => from.trim(),
    };
    let domain = address.rsplit_once('@')?.1.trim().trim_end_matches('>');
    (!domain.is_empty()).then(|| domain.to_ascii_lowercase())
}

/// Makes an RSA-2048 key for `postern dkim generate`: the private key as PKCS#1 PEM and the DNS
/// TXT record to publish at `<selector>._domainkey.<domain>`.
pub fn generate_key(domain: &str, selector: &str) -> Result<(String, String), String> {
    use base64::Engine as _;
    let pair =
        mail_auth::dkim::generate::DkimKeyPair::generate_rsa(2048).map_err(|e| e.to_string())?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(pair.private_key());
    let mut pem = String::from("-----BEGIN RSA PRIVATE KEY-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END RSA PRIVATE KEY-----\n");
    let public = base64::engine::general_purpose::STANDARD.encode(pair.public_key());
    // TXT strings are at most 255 bytes: split the record for zone files.
    let record = format!("v=DKIM1; k=rsa; p={public}");
    let quoted: Vec<String> = record
        .as_bytes()
        .chunks(250)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    let txt = format!(
        "{selector}._domainkey.{domain}. IN TXT ( {} )",
        quoted.join(" ")
    );
    Ok((pem, txt))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_domain_forms() {
        assert_eq!(
            from_domain(b"From: Alice <alice@Example.TEST>\r\n\r\n"),
            Some("example.test".into())
        );
        assert_eq!(
            from_domain(b"From: bob@x.test\r\n\r\n"),
            Some("x.test".into())
        );
        assert_eq!(from_domain(b"Subject: none\r\n\r\n"), None);
    }

    #[test]
    fn signs_only_the_users_own_domains_or_those_it_is_listed_for() {
        let dir = tempfile::tempdir().unwrap();
        let (pem, _) = generate_key("example.test", "s").unwrap();
        let key = dir.path().join("k.pem");
        std::fs::write(&key, pem).unwrap();
        let mut config = Config::embedded_default();
        config.mail_auth.verify_inbound = false;
        config.dkim = vec![crate::config::DkimConfig {
            domain: "example.test".into(),
            selector: "s".into(),
            key,
            users: vec!["carol@other.test".into()],
        }];
        let auth = MessageAuth::new(&config, None).unwrap();
        let message = b"From: Alice <alice@example.test>\r\nSubject: x\r\n\r\nbody\r\n";
        assert!(
            auth.sign(message, "alice@example.test").is_some(),
            "own domain"
        );
        assert!(
            auth.sign(message, "carol@other.test").is_some(),
            "listed for it"
        );
        assert!(
            auth.sign(message, "bob@other.test").is_none(),
            "a user of another domain gets no signature for example.test"
        );
        let elsewhere = b"From: x@nokey.test\r\n\r\nbody\r\n";
        assert!(auth.sign(elsewhere, "x@nokey.test").is_none(), "no key");
    }
}
