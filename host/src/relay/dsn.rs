//! Delivery status notifications (RFC 3464, carried in RFC 6522 multipart/report): the bounce
//! for recipients that failed for good, and the one-time notice that delivery is delayed.

use chrono::{TimeZone, Utc};

/// Whether the notice reports a final failure or a delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    Failed,
    /// Still trying, until the given Unix time.
    Delayed {
        until: i64,
    },
}

/// One recipient the notice is about.
#[derive(Debug, Clone)]
pub struct Failure {
    pub recipient: String,
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
    /// The message as queued (CRLF); its header section is returned.
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

/// Builds the notice, addressed to the original sender, from `MAILER-DAEMON@<hostname>`.
pub fn build(
    hostname: &str,
    notice: Notice,
    original: &Original<'_>,
    failures: &[Failure],
    now: i64,
) -> Vec<u8> {
    let boundary = format!("{}/{}", original.queue_id, hostname);
    let (subject, intro, action) = match notice {
        Notice::Failed => (
            "Undelivered Mail Returned to Sender",
            "Your message could not be delivered to one or more recipients. It has been given up\r\n\
             on; the reasons are below. The headers of your message are attached.",
            "failed",
        ),
        Notice::Delayed { .. } => (
            "Delayed Mail (still being retried)",
            "Your message has not been delivered to one or more recipients yet. No action is\r\n\
             needed: delivery will be retried, and you will be told if it finally fails.",
            "delayed",
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
    for failure in failures {
        out.push_str(&format!(
            "<{}>: {}\r\n",
            failure.recipient,
            match &failure.remote_mta {
                Some(mta) => format!("host {mta} said: {}", failure.diagnostic),
                None => failure.diagnostic.clone(),
            }
        ));
    }
    out.push_str(&format!(
        "\r\n--{boundary}\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {hostname}\r\n\
         X-Postern-Queue-ID: {}\r\n\
         Arrival-Date: {}\r\n",
        original.queue_id,
        rfc2822(original.received_at),
    ));
    for failure in failures {
        out.push_str(&format!(
            "\r\nFinal-Recipient: rfc822; {}\r\nAction: {action}\r\nStatus: {}\r\n",
            failure.recipient, failure.status
        ));
        if let Some(mta) = &failure.remote_mta {
            out.push_str(&format!("Remote-MTA: dns; {mta}\r\n"));
        }
        // Diagnostic-Code is one header field: fold nothing, but keep it on one line.
        let diagnostic: String = failure
            .diagnostic
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        out.push_str(&format!("Diagnostic-Code: smtp; {diagnostic}\r\n"));
        if let Notice::Delayed { until } = notice {
            out.push_str(&format!("Will-Retry-Until: {}\r\n", rfc2822(until)));
        }
    }
    out.push_str(&format!(
        "\r\n--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
    ));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(header_section(original.message));
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
        let original = Original {
            queue_id: "Q1",
            sender: "a@x.test",
            received_at: 1_700_000_000,
            message,
        };
        let failures = [Failure {
            recipient: "b@y.test".into(),
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
    }

    #[test]
    fn statuses() {
        assert_eq!(status_of(550, Some("5.7.1")), "5.7.1");
        assert_eq!(status_of(550, None), "5.0.0");
        assert_eq!(status_of(451, None), "4.0.0");
    }
}
