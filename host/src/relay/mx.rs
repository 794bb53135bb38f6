//! Where mail for a domain goes (RFC 5321 §5.1): MX hosts in preference order (equal
//! preferences shuffled), the domain itself when it has no MX (implicit MX), nowhere for a null
//! MX (RFC 7505).

use crate::dns::{Dns, DnsError};

#[derive(Debug, PartialEq, Eq)]
pub enum Destination {
    /// Hosts to try, in order.
    Hosts(Vec<String>),
    /// The domain says it accepts no mail (`MX 0 .`): bounce at once (556 5.1.10).
    NullMx,
    /// The domain does not exist: bounce (550 5.1.2).
    NoSuchDomain,
}

/// Orders MX records: lowest preference first; hosts of equal preference in an order that
/// varies per call (`seed`), which spreads load as §5.1 asks.
pub fn order(mut records: Vec<(u16, String)>, seed: u64) -> Destination {
    if records.len() == 1 && records[0].0 == 0 && matches!(records[0].1.as_str(), "" | ".") {
        return Destination::NullMx;
    }
    // A null MX among others is a misconfiguration; ignore it (RFC 7505 §3).
    records.retain(|(_, host)| !matches!(host.as_str(), "" | "."));
    if records.is_empty() {
        return Destination::NullMx;
    }
    records.sort_by_key(|(preference, host)| (*preference, mix(seed, host)));
    let mut hosts: Vec<String> = Vec::with_capacity(records.len());
    for (_, host) in records {
        if !hosts.iter().any(|h| h.eq_ignore_ascii_case(&host)) {
            hosts.push(host);
        }
    }
    Destination::Hosts(hosts)
}

fn mix(seed: u64, host: &str) -> u64 {
    // FNV-1a over the name, salted: enough to vary the order of equals, no RNG needed.
    host.bytes().fold(0xcbf2_9ce4_8422_2325 ^ seed, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Where mail for `domain` goes. With `validate` (DANE, RFC 7672 §2.2.1) the MX records come
/// from the DNSSEC-validating resolver and the answer says whether they are secure; without,
/// they are never called secure.
pub async fn resolve(
    dns: &Dns,
    domain: &str,
    seed: u64,
    validate: bool,
) -> Result<(Destination, bool), DnsError> {
    let found = if validate {
        dns.mx_validated(domain).await.map(|v| (v.answer, v.secure))
    } else {
        dns.mx(domain).await.map(|records| (records, false))
    };
    match found {
        Ok((records, secure)) if records.is_empty() => {
            Ok((Destination::Hosts(vec![domain.to_string()]), secure))
        }
        Ok((records, secure)) => Ok((order(records, seed), secure)),
        Err(DnsError::NotFound) => Ok((Destination::NoSuchDomain, false)),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(d: Destination) -> Vec<String> {
        match d {
            Destination::Hosts(h) => h,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn preference_order_and_null_mx() {
        let records = vec![
            (20, "b.test".to_string()),
            (10, "a.test".to_string()),
            (30, "c.test".to_string()),
        ];
        assert_eq!(hosts(order(records, 7)), vec!["a.test", "b.test", "c.test"]);
        assert_eq!(order(vec![(0, ".".into())], 1), Destination::NullMx);
        assert_eq!(order(vec![(0, "".into())], 1), Destination::NullMx);
        assert_eq!(
            hosts(order(vec![(0, ".".into()), (5, "x.test".into())], 1)),
            vec!["x.test"]
        );
    }

    #[test]
    fn equal_preferences_vary_but_stay_after_better_ones() {
        let records: Vec<(u16, String)> = (0..6)
            .map(|i| (10, format!("mx{i}.test")))
            .chain([(5, "first.test".to_string())])
            .collect();
        let mut firsts = std::collections::HashSet::new();
        for seed in 0..32 {
            let order = hosts(order(records.clone(), seed));
            assert_eq!(order[0], "first.test");
            assert_eq!(order.len(), 7);
            firsts.insert(order[1].clone());
        }
        assert!(firsts.len() > 1, "equal preferences are shuffled");
    }
}
