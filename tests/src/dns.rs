//! A small authoritative DNS server on a loopback UDP port, answering from a fixed table (A, TXT,
//! MX and TLSA records). Names it does not know get NXDOMAIN; known names without the asked type
//! get an empty NOERROR answer. Enough for DNSBL and MX tests, with no system resolver involved.
//!
//! Signed (`TestDns::signed`), it is the whole DNS tree as one root zone signed with one Ed25519
//! key made for the test, whose DNSKEY is the trust anchor the server under test is given: every
//! RRset comes with its RRSIG (RFC 4034 §3), the root's DNSKEY and SOA are served, and a denial
//! is a NODATA with an NSEC at the asked name whose next name is its immediate successor and
//! whose bitmap leaves the asked type out (the "minimally covering" denial of RFC 4470). Names
//! marked bogus get their signatures corrupted.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::dnssec::crypto::Ed25519SigningKey;
use hickory_proto::dnssec::rdata::{DNSSECRData, DNSKEY, NSEC, RRSIG};
use hickory_proto::dnssec::{DnssecSigner, SigningKey};
use hickory_proto::op::{Edns, Message, OpCode};
use hickory_proto::rr::rdata::{MX, NS, SOA, TLSA, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordSet, RecordType};

#[derive(Debug, Clone)]
pub enum Rr {
    A(Ipv4Addr),
    Txt(String),
    Mx(u16, String),
    /// Usage, selector, matching type, data (RFC 6698 §2.1).
    Tlsa(u8, u8, u8, Vec<u8>),
}

impl Rr {
    fn rtype(&self) -> u16 {
        match self {
            Rr::A(_) => 1,
            Rr::Mx(..) => 15,
            Rr::Txt(_) => 16,
            Rr::Tlsa(..) => 52,
        }
    }

    fn rdata(&self) -> Vec<u8> {
        match self {
            Rr::A(ip) => ip.octets().to_vec(),
            Rr::Txt(text) => {
                let mut out = Vec::new();
                for chunk in text.as_bytes().chunks(255) {
                    out.push(chunk.len() as u8);
                    out.extend_from_slice(chunk);
                }
                out
            }
            Rr::Mx(preference, host) => {
                let mut out = preference.to_be_bytes().to_vec();
                out.extend(encode_name(host));
                out
            }
            Rr::Tlsa(usage, selector, matching, data) => {
                let mut out = vec![*usage, *selector, *matching];
                out.extend_from_slice(data);
                out
            }
        }
    }

    fn rdata_of(&self) -> RData {
        match self {
            Rr::A(ip) => RData::A((*ip).into()),
            Rr::Txt(text) => RData::TXT(TXT::new(vec![text.clone()])),
            Rr::Mx(preference, host) => RData::MX(MX::new(*preference, absolute(host))),
            Rr::Tlsa(usage, selector, matching, data) => RData::TLSA(TLSA::new(
                (*usage).into(),
                (*selector).into(),
                (*matching).into(),
                data.clone(),
            )),
        }
    }
}

fn absolute(name: &str) -> Name {
    let mut name = Name::from_ascii(name).expect("a test DNS name");
    name.set_fqdn(true);
    name
}

fn encode_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

pub struct TestDns {
    pub addr: SocketAddr,
    /// Signed: the trust anchor, a DNSKEY line of zone-file text.
    pub anchor: Option<String>,
    stop: Arc<AtomicBool>,
}

/// The key that signs the one zone, and the names whose signatures are broken.
struct Zone {
    signer: DnssecSigner,
    dnskey: DNSKEY,
    bogus: Vec<Name>,
}

impl TestDns {
    /// Serves `records` (name, record) on 127.0.0.1 at a free port.
    pub fn start(records: Vec<(&str, Rr)>) -> TestDns {
        TestDns::serve(records, None)
    }

    /// Serves `records` signed with a new key; RRsets at the names in `bogus` carry signatures
    /// that do not verify. `anchor` is the key for the server's trust anchor file.
    pub fn signed(records: Vec<(&str, Rr)>, bogus: &[&str]) -> TestDns {
        let pkcs8 = Ed25519SigningKey::generate_pkcs8().expect("an Ed25519 key");
        let key = Ed25519SigningKey::from_pkcs8(&pkcs8).expect("the key");
        let public = key.to_public_key().expect("its public key");
        let dnskey = DNSKEY::from_key(&public);
        let signer = DnssecSigner::new(
            dnskey.clone(),
            Box::new(key),
            Name::root(),
            Duration::from_secs(2 * 86_400),
        );
        let zone = Zone {
            signer,
            dnskey,
            bogus: bogus.iter().map(|n| absolute(n)).collect(),
        };
        TestDns::serve(records, Some(zone))
    }

    fn serve(records: Vec<(&str, Rr)>, zone: Option<Zone>) -> TestDns {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind DNS port");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let records: Vec<(String, Rr)> = records
            .into_iter()
            .map(|(n, r)| (n.trim_end_matches('.').to_ascii_lowercase(), r))
            .collect();
        let flag = stop.clone();
        let anchor = zone.as_ref().map(|zone| {
            let record = Record::from_rdata(
                Name::root(),
                3600,
                RData::DNSSEC(DNSSECRData::DNSKEY(zone.dnskey.clone())),
            );
            format!("{record}\n")
        });
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !flag.load(Ordering::Relaxed) {
                let Ok((len, peer)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let reply = match &zone {
                    Some(zone) => signed_answer(&buf[..len], &records, zone),
                    None => answer(&buf[..len], &records),
                };
                if let Some(reply) = reply {
                    let _ = socket.send_to(&reply, peer);
                }
            }
        });
        TestDns { addr, anchor, stop }
    }
}

/// The signed answer to one query, or None for garbage.
fn signed_answer(query: &[u8], records: &[(String, Rr)], zone: &Zone) -> Option<Vec<u8>> {
    let query = Message::from_vec(query).ok()?;
    let question = query.queries.first()?.clone();
    let name = question.name().clone();
    let qtype = question.query_type();
    let key = name.to_ascii().trim_end_matches('.').to_ascii_lowercase();
    let here: Vec<RData> = records
        .iter()
        .filter(|(n, _)| *n == key)
        .map(|(_, r)| r.rdata_of())
        .collect();
    let root_ns = RData::NS(NS(absolute("ns.test")));
    let mut present: Vec<RData> = here.clone();
    if name.is_root() {
        present.push(RData::DNSSEC(DNSSECRData::DNSKEY(zone.dnskey.clone())));
        present.push(soa());
        present.push(root_ns);
    }
    let answers: Vec<RData> = present
        .iter()
        .filter(|r| r.record_type() == qtype)
        .cloned()
        .collect();
    let mut reply = Message::response(query.metadata.id, OpCode::Query);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.add_query(question);
    if let Some(edns) = &query.edns {
        let mut ours = Edns::new();
        ours.set_max_payload(1232);
        ours.set_dnssec_ok(edns.flags().dnssec_ok);
        reply.set_edns(ours);
    }
    if !answers.is_empty() {
        reply.add_answers(zone.rrset(&name, answers));
    } else {
        // NODATA, proved: the root's SOA, and an NSEC at the name covering nothing but itself.
        reply.add_authorities(zone.rrset(&Name::root(), vec![soa()]));
        let mut types: Vec<RecordType> = present.iter().map(|r| r.record_type()).collect();
        types.extend([RecordType::RRSIG, RecordType::NSEC]);
        types.retain(|t| *t != qtype);
        let next = name.prepend_label(&[0u8][..]).ok()?;
        let nsec = NSEC::new(next, types);
        reply.add_authorities(zone.rrset(&name, vec![RData::DNSSEC(DNSSECRData::NSEC(nsec))]));
    }
    reply.to_vec().ok()
}

fn soa() -> RData {
    RData::SOA(SOA::new(
        absolute("ns.test"),
        absolute("hostmaster.test"),
        1,
        3600,
        600,
        86400,
        60,
    ))
}

impl Zone {
    /// An RRset of `rdata` at `name` and its RRSIG.
    fn rrset(&self, name: &Name, rdata: Vec<RData>) -> Vec<Record> {
        let rtype = rdata[0].record_type();
        let mut set = RecordSet::with_ttl(name.clone(), rtype, 60);
        for r in rdata {
            set.add_rdata(r);
        }
        let inception = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        let rrsig = RRSIG::from_rrset(&set, DNSClass::IN, inception, &self.signer)
            .expect("the RRset signs");
        let rrsig = if self.bogus.contains(name) {
            let (input, mut sig) = (rrsig.input().clone(), rrsig.sig().to_vec());
            sig[0] ^= 0xff;
            RRSIG::from_sig(input, sig)
        } else {
            rrsig
        };
        let mut records: Vec<Record> = set.records_without_rrsigs().cloned().collect();
        records.push(Record::from_rdata(
            name.clone(),
            60,
            RData::DNSSEC(DNSSECRData::RRSIG(rrsig)),
        ));
        records
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Builds the response to one query, or None for garbage.
fn answer(query: &[u8], records: &[(String, Rr)]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    // Question: labels, then type and class.
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = *query.get(pos)? as usize;
        pos += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(pos..pos + len)?).to_ascii_lowercase());
        pos += len;
    }
    let qtype = u16::from_be_bytes([*query.get(pos)?, *query.get(pos + 1)?]);
    let question = &query[12..pos + 4];
    let name = labels.join(".");
    let known: Vec<&Rr> = records
        .iter()
        .filter(|(n, _)| *n == name)
        .map(|(_, r)| r)
        .collect();
    let answers: Vec<&Rr> = known
        .iter()
        .copied()
        .filter(|r| r.rtype() == qtype)
        .collect();
    let rcode = if known.is_empty() { 3 } else { 0 };
    let rd = query[2] & 0x01;
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&query[0..2]);
    out.push(0x84 | rd); // QR, AA, RD copied
    out.push(rcode);
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(question);
    for rr in answers {
        out.extend_from_slice(&[0xC0, 0x0C]); // the question's name
        out.extend_from_slice(&rr.rtype().to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&60u32.to_be_bytes());
        let rdata = rr.rdata();
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(&rdata);
    }
    Some(out)
}
