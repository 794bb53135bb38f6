//! Delivery status notifications (RFC 3464, carried in RFC 6522 multipart/report): the bounce
//! for recipients that failed for good, the one-time notice that delivery is delayed, and the
//! success report a sender asked for with `NOTIFY=SUCCESS` (RFC 3461 §6).

use chrono::{TimeZone, Utc};

/// What the notice reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    Failed,
    /// Still trying, until the given Unix time.
    Delayed {
        until: i64,
    },
    /// Delivered, or relayed to a server that cannot report further (RFC 3461 §6.2.1).
    Succeeded,
}

/// RFC 3464 §2.3.3 Action of one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Failed,
    Delayed,
    Delivered,
    /// Handed to a server that does not offer DSN: no further report will come.
    Relayed,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Delivered => "delivered",
            Action::Relayed => "relayed",
        }
    }
}

/// One recipient the notice is about.
#[derive(Debug, Clone)]
pub struct Entry {
    pub recipient: String,
    /// The sender's ORCPT for it (RFC 3461 §4.2), reported as Original-Recipient.
    pub original: Option<String>,
    pub action: Action,
    /// RFC 3463 status (`5.1.1`).
    pub status: String,
    /// The host that answered, when one did.
    pub remote_mta: Option<String>,
    /// What it answered (`550 5.1.1 No such user`), or why we gave up.
    pub diagnostic: String,
}

pub struct Original<'a> {
    pub queue_id: &'a str,
    pub sender: &'a str,
    pub received_at: i64,
    /// The sender's ENVID (RFC 3461 §4.4), reported as Original-Envelope-Id.
    pub envid: Option<&'a str>,
    /// RET=FULL: a failure report returns the whole message; otherwise only its header section
    /// (RFC 3461 §4.3 leaves the default to the MTA; Postfix returns headers too).
    pub full: bool,
    /// The message as queued (CRLF).
    pub message: &'a [u8],
}

fn rfc2822(ts: i64) -> String {
    Utc.timestamp_opt(ts, 0)
        .single()
        .unwrap_or_default()
        .to_rfc2822()
}

/// The header section of a message (without the blank line).
fn header_section(message: &[u8]) -> &[u8] {
    match memchr::memmem::find(message, b"\r\n\r\n") {
        Some(pos) => &message[..pos + 2],
        None => message,
    }
}

/// A header field value as one line: control characters (CR, LF) become spaces.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Builds the notice, addressed to the original sender, from `MAILER-DAEMON@<hostname>`.
pub fn build(
    hostname: &str,
    notice: Notice,
    original: &Original<'_>,
    entries: &[Entry],
    now: i64,
) -> Vec<u8> {
    let boundary = format!("{}/{}", original.queue_id, hostname);
    let (subject, intro) = match notice {
        Notice::Failed => (
            "Undelivered Mail Returned to Sender",
            if original.full {
                "Your message could not be delivered to one or more recipients. It has been given up\r\n\
                 on; the reasons are below. Your message is attached."
            } else {
                "Your message could not be delivered to one or more recipients. It has been given up\r\n\
                 on; the reasons are below. The headers of your message are attached."
            },
        ),
        Notice::Delayed { .. } => (
            "Delayed Mail (still being retried)",
            "Your message has not been delivered to one or more recipients yet. No action is\r\n\
             needed: delivery will be retried, and you will be told if it finally fails.",
        ),
        Notice::Succeeded => (
            "Successful Mail Delivery Report",
            "Your message was delivered to the recipients below, as you asked to be told.",
        ),
    };
    let mut out = String::new();
    out.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n\
         To: <{}>\r\n\
         Subject: {subject}\r\n\
         Date: {}\r\n\
         Message-ID: <{}.{now}.dsn@{hostname}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\
         \r\n\
         This is a MIME-encapsulated delivery status notification.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\
         \r\n\
         This is the mail system at {hostname}.\r\n\
         \r\n\
         {intro}\r\n\
         \r\n",
        original.sender,
        rfc2822(now),
        original.queue_id,
    ));
    for entry in entries {
        out.push_str(&format!(
            "<{}>: {}\r\n",
            entry.recipient,
            match &entry.remote_mta {
                Some(mta) => format!("host {mta} said: {}", entry.diagnostic),
                None => entry.diagnostic.clone(),
            }
        ));
    }
    out.push_str(&format!(
        "\r\n--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
    ));
    // RFC 3464 §2.2: Original-Envelope-Id comes first among the per-message fields.
    if let Some(envid) = original.envid {
        out.push_str(&format!("Original-Envelope-Id: {}\r\n", one_line(envid)));
    }
    out.push_str(&format!(
        "Reporting-MTA: dns; {hostname}\r\n\
         X-Postern-Queue-ID: {}\r\n\
         Arrival-Date: {}\r\n",
        original.queue_id,
        rfc2822(original.received_at),
    ));
    for entry in entries {
        out.push_str("\r\n");
        if let Some(orcpt) = &entry.original {
            out.push_str(&format!(
                "Original-Recipient: rfc822;{}\r\n",
                one_line(orcpt)
            ));
        }
        out.push_str(&format!(
            "Final-Recipient: rfc822; {}\r\nAction: {}\r\nStatus: {}\r\n",
            entry.recipient,
            entry.action.as_str(),
            entry.status
        ));
        if let Some(mta) = &entry.remote_mta {
            out.push_str(&format!("Remote-MTA: dns; {mta}\r\n"));
        }
        out.push_str(&format!(
            "Diagnostic-Code: smtp; {}\r\n",
            one_line(&entry.diagnostic)
        ));
        if let Notice::Delayed { until } = notice {
            out.push_str(&format!("Will-Retry-Until: {}\r\n", rfc2822(until)));
        }
    }
    let full = original.full && notice == Notice::Failed;
    let part_type = if full {
        "message/rfc822"
    } else {
        "text/rfc822-headers"
    };
    out.push_str(&format!(
        "\r\n--{boundary}\r\nContent-Type: {part_type}\r\n\r\n"
    ));
    let mut bytes = out.into_bytes();
    if full {
        bytes.extend_from_slice(original.message);
        if !original.message.ends_with(b"\r\n") {
            bytes.extend_from_slice(b"\r\n");
        }
    } else {
        bytes.extend_from_slice(header_section(original.message));
    }
    bytes.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    bytes
}

/// The status to report for a reply: its enhanced code when it has one, else the class default.
pub fn status_of(code: u16, enhanced: Option<&str>) -> String {
    match enhanced {
        Some(status) => status.to_string(),
        None if code >= 500 => "5.0.0".into(),
        None => "4.0.0".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounce_is_a_multipart_report_with_original_headers() {
        let message = b"From: a@x.test\r\nSubject: hi\r\n\r\nsecret body\r\n";
        let mut original = Original {
            queue_id: "Q1",
            sender: "a@x.test",
            received_at: 1_700_000_000,
            envid: None,
            full: false,
            message,
        };
        let failures = [Entry {
            recipient: "b@y.test".into(),
            original: None,
            action: Action::Failed,
            status: "5.1.1".into(),
            remote_mta: Some("mx.y.test".into()),
            diagnostic: "550 5.1.1 No such user".into(),
        }];
        let dsn = build(
            "mx.x.test",
            Notice::Failed,
            &original,
            &failures,
            1_700_000_100,
        );
        let text = String::from_utf8(dsn).unwrap();
        assert!(text.contains("Content-Type: multipart/report; report-type=delivery-status;"));
        assert!(text.contains("To: <a@x.test>\r\n"));
        assert!(text.contains("Final-Recipient: rfc822; b@y.test\r\nAction: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; mx.y.test\r\nDiagnostic-Code: smtp; 550 5.1.1 No such user\r\n"));
        assert!(text.contains(
            "Content-Type: text/rfc822-headers\r\n\r\nFrom: a@x.test\r\nSubject: hi\r\n"
        ));
        assert!(!text.contains("secret body"), "only the headers come back");
        assert!(text.ends_with("--Q1/mx.x.test--\r\n"));
        let parsed = mail_parser::MessageParser::default()
            .parse(text.as_bytes())
            .unwrap();
        assert_eq!(parsed.parts.len(), 4, "report + three parts");

        // RET=FULL, ENVID and ORCPT (RFC 3461 §4.2-4.4).
        original.full = true;
        original.envid = Some("env-42");
        let mut entries = failures.to_vec();
        entries[0].original = Some("robert@old.test".into());
        let text =
            String::from_utf8(build("mx.x.test", Notice::Failed, &original, &entries, 1)).unwrap();
        assert!(text.contains("message/delivery-status\r\n\r\nOriginal-Envelope-Id: env-42\r\nReporting-MTA: dns; mx.x.test\r\n"));
        assert!(text.contains("\r\nOriginal-Recipient: rfc822;robert@old.test\r\nFinal-Recipient: rfc822; b@y.test\r\n"));
        assert!(text.contains("Content-Type: message/rfc822\r\n\r\nFrom: a@x.test\r\nSubject: hi\r\n\r\nsecret body\r\n"));
        // A success report never returns the body, whatever RET says.
        entries[0].action = Action::Delivered;
        let text = String::from_utf8(build(
            "mx.x.test",
            Notice::Succeeded,
            &original,
            &entries,
            1,
        ))
        .unwrap();
        assert!(text.contains("Action: delivered\r\n"));
        assert!(!text.contains("secret body"));
    }

    #[test]
    fn statuses() {
        assert_eq!(status_of(550, Some("5.7.1")), "5.7.1");
        assert_eq!(status_of(550, None), "5.0.0");
        assert_eq!(status_of(451, None), "4.0.0");
    }
}
