//! DANE for SMTP (RFC 7672, RFC 6698): an MX host whose DNSSEC-validated TLSA records are
//! usable gets STARTTLS required and its certificate matched against them, instead of the
//! WebPKI (which SMTP's MX indirection leaves unauthenticated, §1.3).
//!
//! Which records count (§3.1.3, RFC 7671 §4): DANE-EE(3) matches the server's own certificate
//! or key, with names and dates not checked (§3.1.1); DANE-TA(2) names a trust anchor the
//! server sends in its chain, from which the chain must verify for the MX host name (§3.1.2,
//! §3.2.2). PKIX-TA(0), PKIX-EE(1) and unknown parameters are unusable in SMTP.

use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::{CertificateError, RootCertStore};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256, Sha512};
use tokio_rustls::TlsConnector;

use super::client::{connector_with, CertificateCheck};
use crate::dns::{Dns, DnsError, Tlsa};

/// What DANE says of one MX host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dane {
    /// No secure TLSA records: the domain's other policy applies.
    None,
    /// Secure TLSA records, none usable (§2.2): TLS is still mandatory, unauthenticated.
    Unusable,
    /// Usable records: STARTTLS required and the certificate must match one of them.
    Records(Vec<Tlsa>),
}

/// The TLSA records of `host` on `port` (§2.2.3). Only a secure answer counts; a bogus one
/// is an error, and the host is skipped for now (§2.2: "the client MUST NOT deliver").
pub async fn lookup(dns: &Dns, host: &str, port: u16) -> Result<Dane, DnsError> {
    let found = dns.tlsa(host, port).await?;
    if !found.secure || found.answer.is_empty() {
        return Ok(Dane::None);
    }
    let usable: Vec<Tlsa> = found.answer.into_iter().filter(usable).collect();
    Ok(if usable.is_empty() {
        Dane::Unusable
    } else {
        Dane::Records(usable)
    })
}

fn usable(record: &Tlsa) -> bool {
    matches!(record.usage, 2 | 3) && record.selector <= 1 && record.matching <= 2
}

/// A connector that accepts only a certificate chain that matches `records`.
pub fn connector(records: Vec<Tlsa>) -> TlsConnector {
    connector_with(Matcher {
        records,
        provider: Arc::new(rustls::crypto::ring::default_provider()),
    })
}

#[derive(Debug)]
struct Matcher {
    records: Vec<Tlsa>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl CertificateCheck for Matcher {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let of_usage = |usage| self.records.iter().filter(move |r| r.usage == usage);
        if of_usage(3).any(|r| matches(r, end_entity)) {
            return Ok(());
        }
        for (i, anchor) in intermediates.iter().enumerate() {
            if !of_usage(2).any(|r| matches(r, anchor)) {
                continue;
            }
            let mut roots = RootCertStore::empty();
            if roots.add(anchor.clone()).is_err() {
                continue;
            }
            let verifier =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                    .build()
                    .map_err(|e| rustls::Error::General(e.to_string()))?;
            // The chain below the anchor, in the order the server sent it.
            let below = &intermediates[..i];
            if verifier
                .verify_server_cert(end_entity, below, name, &[], now)
                .is_ok()
            {
                return Ok(());
            }
        }
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(NoMatch)),
        )))
    }
}

/// The chain matched none of the host's TLSA records.
#[derive(Debug, thiserror::Error)]
#[error("no TLSA record matches the certificate chain (DANE, RFC 7672 §3)")]
struct NoMatch;

/// Whether a certificate matches a record: the selected part (the whole certificate or its
/// SubjectPublicKeyInfo) exactly, or its SHA-256 or SHA-512 digest (RFC 6698 §2.1.2, §2.1.3).
fn matches(record: &Tlsa, cert: &CertificateDer<'_>) -> bool {
    let selected = match record.selector {
        0 => cert.to_vec(),
        1 => match webpki::EndEntityCert::try_from(cert) {
            Ok(parsed) => parsed.subject_public_key_info().to_vec(),
            Err(_) => return false,
        },
        _ => return false,
    };
    match record.matching {
        0 => selected == record.data,
        1 => Sha256::digest(&selected).as_slice() == record.data,
        2 => Sha512::digest(&selected).as_slice() == record.data,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(usage: u8, selector: u8, matching: u8, data: Vec<u8>) -> Tlsa {
        Tlsa {
            usage,
            selector,
            matching,
            data,
        }
    }

    /// A CA, an intermediate and a leaf for mx.test.
    fn chain() -> (CertificateDer<'static>, CertificateDer<'static>, Vec<u8>) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["mx.test".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &ca, &ca_key)
            .unwrap();
        let spki = leaf_key.public_key_der();
        (leaf.der().clone(), ca.der().clone(), spki)
    }

    fn name(host: &str) -> ServerName<'static> {
        ServerName::try_from(host.to_string()).unwrap()
    }

    fn check(
        records: Vec<Tlsa>,
        leaf: &CertificateDer<'_>,
        chain: &[CertificateDer<'_>],
        host: &str,
    ) -> bool {
        let matcher = Matcher {
            records,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        };
        matcher
            .check(leaf, chain, &name(host), UnixTime::now())
            .is_ok()
    }

    #[test]
    fn dane_ee_matches_the_key_and_ignores_the_name() {
        let (leaf, ca, spki) = chain();
        let digest = Sha256::digest(&spki).to_vec();
        assert!(check(
            vec![record(3, 1, 1, digest.clone())],
            &leaf,
            &[],
            "other.test"
        ));
        let whole = Sha512::digest(leaf.as_ref()).to_vec();
        assert!(check(vec![record(3, 0, 2, whole)], &leaf, &[], "mx.test"));
        let mut wrong = digest;
        wrong[0] ^= 1;
        assert!(!check(
            vec![record(3, 1, 1, wrong)],
            &leaf,
            &[ca],
            "mx.test"
        ));
    }

    #[test]
    fn dane_ta_needs_the_anchor_in_the_chain_and_the_mx_name() {
        let (leaf, ca, _) = chain();
        let anchor = record(2, 0, 1, Sha256::digest(ca.as_ref()).to_vec());
        assert!(check(
            vec![anchor.clone()],
            &leaf,
            std::slice::from_ref(&ca),
            "mx.test"
        ));
        assert!(!check(
            vec![anchor.clone()],
            &leaf,
            std::slice::from_ref(&ca),
            "other.test"
        ));
        assert!(!check(vec![anchor], &leaf, &[], "mx.test"));
        // The leaf's own digest is no trust anchor.
        let leaf_as_ta = record(2, 0, 1, Sha256::digest(leaf.as_ref()).to_vec());
        assert!(!check(vec![leaf_as_ta], &leaf, &[ca], "mx.test"));
    }

    #[test]
    fn pkix_usages_and_unknown_parameters_are_unusable() {
        assert!(!usable(&record(0, 0, 1, vec![])));
        assert!(!usable(&record(1, 1, 1, vec![])));
        assert!(!usable(&record(3, 2, 1, vec![])));
        assert!(!usable(&record(3, 1, 3, vec![])));
        assert!(usable(&record(2, 1, 2, vec![])));
    }
}
