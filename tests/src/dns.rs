//! A small authoritative DNS server on a loopback UDP port, answering from a fixed table (A, TXT
//! and MX records). Names it does not know get NXDOMAIN; known names without the asked type get
//! an empty NOERROR answer. Enough for DNSBL and MX tests, with no system resolver involved.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone)]
pub enum Rr {
    A(Ipv4Addr),
    Txt(String),
    Mx(u16, String),
}

impl Rr {
    fn rtype(&self) -> u16 {
        match self {
            Rr::A(_) => 1,
            Rr::Mx(..) => 15,
            Rr::Txt(_) => 16,
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
        }
    }
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
    stop: Arc<AtomicBool>,
}

impl TestDns {
    /// Serves `records` (name, record) on 127.0.0.1 at a free port.
    pub fn start(records: Vec<(&str, Rr)>) -> TestDns {
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
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !flag.load(Ordering::Relaxed) {
                let Ok((len, peer)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(reply) = answer(&buf[..len], &records) {
                    let _ = socket.send_to(&reply, peer);
                }
            }
        });
        TestDns { addr, stop }
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
