//! IMAP session tests over an in-memory stream, replaying the example transcripts of RFC 9051
//! (section numbers in each test) against the real session state machine and a Maildir store in
//! a temporary directory.
//!
//! Transcript lines: `C: ` is sent by the client, `S: ` is the next line the server must send,
//! with `…` standing for any text (message texts, timestamps, UIDVALIDITY). `C2:`/`S2:` are a
//! second client on the same mailbox. `<MESSAGE>` sends the RFC's example message (the literal
//! announced as `{LEN}` on the line before); `{V}` in a client line is the UIDVALIDITY the
//! server last told. The RFC's mailbox contents differ from a fresh mailbox, so counts and
//! names are those of the state the transcript builds; the exchange, its order and its
//! response codes are the RFC's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use postern::auth::{LoginGate, UserDirectory};
use postern::config::{Config, ListenerConfig, ListenerProtocol, TlsMode};
use postern::imap::session::Session;
use postern::imap::ImapServer;
use postern::store::maildir::Maildir;
use postern::store::watched::Watched;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};
use tokio::sync::watch;

/// RFC 9051 §6.3.12's APPEND example message.
const MESSAGE: &str = "Date: Mon, 7 Feb 1994 21:52:25 -0800 (PST)\r\n\
From: Fred Foobar <foobar@Blurdybloop.example>\r\n\
Subject: afternoon meeting\r\n\
To: mooch@owatagu.siam.edu.example\r\n\
Message-Id: <B27397-0100000@Blurdybloop.example>\r\n\
MIME-Version: 1.0\r\n\
Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n\
\r\n\
Hello Joe, do you think we can meet at 3:30 tomorrow?\r\n";

struct Harness {
    server: Arc<ImapServer>,
    _dir: tempfile::TempDir,
    _shutdown: watch::Sender<bool>,
}

fn harness() -> Harness {
    harness_with(|_| {})
}

fn harness_with(edit: impl FnOnce(&mut Config)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::embedded_default();
    config.server.data_dir = dir.path().to_path_buf();
    edit(&mut config);
    let users = Arc::new(UserDirectory::from_config(&config));
    let maildir = Arc::new(Maildir::new(
        dir.path().join("mailboxes"),
        &config.server.hostname,
    ));
    let watched = Arc::new(Watched::new(maildir));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let gate = Arc::new(LoginGate::new(users.clone(), 10, Duration::from_secs(600)));
    let server = Arc::new(ImapServer::new(
        Arc::new(config),
        users,
        watched,
        None,
        gate,
        shutdown_rx,
        postern::budget::MemoryBudget::new(256 * 1024 * 1024),
    ));
    Harness {
        server,
        _dir: dir,
        _shutdown: shutdown_tx,
    }
}

struct Client {
    reader: BufReader<tokio::io::ReadHalf<DuplexStream>>,
    writer: tokio::io::WriteHalf<DuplexStream>,
}

impl Client {
    fn start(h: &Harness) -> Client {
        // A trusted listener: LOGIN without TLS, as the RFC's examples do.
        let listener = Arc::new(ListenerConfig {
            name: "test".into(),
            protocol: ListenerProtocol::Imap,
            address: "127.0.0.1:0".parse().unwrap(),
            tls: TlsMode::None,
            trusted: true,
        });
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        tokio::spawn(Session::new(h.server.clone(), listener, peer).run(theirs));
        let (r, w) = tokio::io::split(ours);
        Client {
            reader: BufReader::new(r),
            writer: w,
        }
    }

    async fn line(&mut self) -> String {
        let mut line = Vec::new();
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            self.reader.read_until(b'\n', &mut line),
        )
        .await
        .expect("the server said nothing for 10 s")
        .unwrap();
        assert!(read > 0, "connection closed");
        let line = String::from_utf8(line).expect("UTF-8 response");
        assert!(
            line.ends_with("\r\n"),
            "response line without CRLF: {line:?}"
        );
        line.trim_end_matches("\r\n").to_string()
    }
}

/// `…` matches any text; everything else literally.
fn matches(pattern: &str, line: &str) -> bool {
    let parts: Vec<&str> = pattern.split('…').collect();
    if parts.len() == 1 {
        return pattern == line;
    }
    let mut rest = line;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(part) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            let Some(at) = rest.find(part) else {
                return false;
            };
            rest = &rest[at + part.len()..];
        }
    }
    true
}

async fn replay(transcript: &str) {
    replay_in(harness(), transcript).await
}

async fn replay_in(h: Harness, transcript: &str) {
    let mut clients = [Client::start(&h), Client::start(&h)];
    let message_len = MESSAGE.len().to_string();
    let mut validity = String::new();
    for (number, raw) in transcript.lines().enumerate() {
        let raw = raw.trim_start();
        if raw.is_empty() {
            continue;
        }
        let (who, text) = raw.split_once(':').expect("C: or S: line");
        let text = text.strip_prefix(' ').unwrap_or(text);
        // Shown when a test fails: how far the transcript got.
        eprintln!("{:3} {raw}", number + 1);
        let client = &mut clients[if who.ends_with('2') { 1 } else { 0 }];
        match who.trim_end_matches('2') {
            "C" => {
                let bytes = if text == "<MESSAGE>" {
                    format!("{MESSAGE}\r\n")
                } else {
                    format!(
                        "{}\r\n",
                        text.replace("{LEN}", &format!("{{{message_len}}}"))
                            .replace("{V}", &validity)
                    )
                };
                client.writer.write_all(bytes.as_bytes()).await.unwrap();
            }
            "S" => {
                let got = client.line().await;
                if let Some((_, rest)) = got.split_once("[UIDVALIDITY ") {
                    validity = rest.chars().take_while(char::is_ascii_digit).collect();
                }
                assert!(
                    matches(text, &got),
                    "transcript line {}:\n  expected {text:?}\n  got      {got:?}",
                    number + 1
                );
            }
            other => panic!("unknown transcript prefix {other:?}"),
        }
    }
}

#[tokio::test]
async fn any_state_capability_noop_logout() {
    // RFC 9051 §6.1.1, §6.1.2, §6.1.3.
    replay(
        r"
        S: * OK …
        S2: * OK …
        C: abcd CAPABILITY
        S: * CAPABILITY IMAP4rev1 IMAP4rev2 …AUTH=PLAIN…
        S: abcd OK CAPABILITY completed
        C: a002 NOOP
        S: a002 OK NOOP completed
        C: A023 LOGOUT
        S: * BYE …
        S: A023 OK LOGOUT completed
        ",
    )
    .await;
}

#[tokio::test]
async fn login_enable_create_list_delete_rename() {
    // RFC 9051 §6.2.3 LOGIN, §6.3.1 ENABLE, §6.3.4 CREATE, §6.3.9 LIST, §6.3.5 DELETE,
    // §6.3.6 RENAME, §6.3.7/§6.3.8 SUBSCRIBE/UNSUBSCRIBE.
    replay(
        r#"
        S: * OK …
        S2: * OK …
        C: a001 LOGIN alice@example.test alicepass
        S: a001 OK [CAPABILITY …] …
        C: t2 ENABLE IMAP4rev2
        S: * ENABLED IMAP4rev2
        S: t2 OK …
        C: A003 CREATE owatagusiam/
        S: A003 OK CREATE completed
        C: A004 CREATE owatagusiam/blurdybloop
        S: A004 OK CREATE completed
        C: A101 LIST "" ""
        S: * LIST (\Noselect) "/" ""
        S: A101 OK LIST completed
        C: A102 LIST "owatagusiam/" "%"
        S: * LIST (\HasNoChildren) "/" owatagusiam/blurdybloop
        S: A102 OK LIST completed
        C: A683 DELETE owatagusiam/blurdybloop
        S: A683 OK DELETE completed
        C: A684 DELETE blurdybloop
        S: A684 NO [NONEXISTENT] …
        C: A685 CREATE sarasoop/bibimbap
        S: A685 OK CREATE completed
        C: A686 RENAME sarasoop zowie
        S: A686 OK RENAME completed
        C: A687 LIST "" "zowie*"
        S: * LIST (\HasChildren) "/" zowie
        S: * LIST (\HasNoChildren) "/" zowie/bibimbap
        S: A687 OK LIST completed
        C: A688 LIST "" "sarasoop*"
        S: A688 OK LIST completed
        C: A002 SUBSCRIBE zowie
        S: A002 OK SUBSCRIBE completed
        C: A003 UNSUBSCRIBE zowie
        S: A003 OK UNSUBSCRIBE completed
        C: A689 RENAME INBOX zowie
        S: A689 NO [ALREADYEXISTS] …
        C: A690 SELECT inbox
        S: * 0 EXISTS
        S: * FLAGS …
        S: * OK [PERMANENTFLAGS …] …
        S: * OK [UIDVALIDITY …] …
        S: * OK [UIDNEXT 1] …
        S: * OK [HIGHESTMODSEQ …] …
        S: * LIST () "/" INBOX
        S: A690 OK [READ-WRITE] SELECT completed
        "#,
    )
    .await;
}

#[tokio::test]
async fn append_select_fetch_store_search_copy_expunge() {
    // RFC 9051 §6.3.12 APPEND, §6.3.2 SELECT, §6.3.11 STATUS, §6.4.5 FETCH, §6.4.6 STORE,
    // §6.4.4 SEARCH, §6.4.7 COPY, §6.4.3 EXPUNGE, §6.4.9 UID, §6.4.1 CLOSE. The internal date
    // keeps the instant APPEND gave and is told in UTC (as Dovecot tells it in server time).
    replay(
        r#"
        S: * OK …
        S2: * OK …
        C: a001 LOGIN alice@example.test alicepass
        S: a001 OK …
        C: A003 APPEND saved-messages (\Seen) {LEN}
        S: + …
        C: <MESSAGE>
        S: A003 NO [TRYCREATE] …
        C: A004 CREATE saved-messages
        S: A004 OK CREATE completed
        C: A005 APPEND saved-messages (\Seen) {LEN}
        S: + …
        C: <MESSAGE>
        S: A005 OK [APPENDUID … 1] APPEND completed
        C: A006 APPEND saved-messages () "07-Feb-1994 21:52:25 -0800" {LEN}
        S: + …
        C: <MESSAGE>
        S: A006 OK [APPENDUID … 2] APPEND completed
        C: A042 STATUS saved-messages (UIDNEXT MESSAGES)
        S: * STATUS saved-messages (UIDNEXT 3 MESSAGES 2)
        S: A042 OK STATUS completed
        C: A142 SELECT saved-messages
        S: * 2 EXISTS
        S: * 2 RECENT
        S: * OK [UNSEEN 2] …
        S: * FLAGS (\Answered \Flagged \Deleted \Seen \Draft…)
        S: * OK [PERMANENTFLAGS (\Answered \Flagged \Deleted \Seen \Draft…)] …
        S: * OK [UIDVALIDITY …] …
        S: * OK [UIDNEXT 3] …
        S: * OK [HIGHESTMODSEQ …] …
        S: A142 OK [READ-WRITE] SELECT completed
        C: A654 FETCH 2 (FLAGS INTERNALDATE RFC822.SIZE)
        S: * 2 FETCH (FLAGS (\Recent) INTERNALDATE "08-Feb-1994 05:52:25 +0000" RFC822.SIZE 326)
        S: A654 OK FETCH completed
        C: A655 FETCH 1 (ENVELOPE)
        S: * 1 FETCH (ENVELOPE ("Mon, 7 Feb 1994 21:52:25 -0800 (PST)" "afternoon meeting" (("Fred Foobar" NIL "foobar" "Blurdybloop.example")) (("Fred Foobar" NIL "foobar" "Blurdybloop.example")) (("Fred Foobar" NIL "foobar" "Blurdybloop.example")) ((NIL NIL "mooch" "owatagu.siam.edu.example")) NIL NIL NIL "<B27397-0100000@Blurdybloop.example>"))
        S: A655 OK FETCH completed
        C: A656 FETCH 1 (BODY[HEADER.FIELDS (SUBJECT)] BODY.PEEK[TEXT]<0.9>)
        S: * 1 FETCH (BODY[HEADER.FIELDS (SUBJECT)] {30}
        S: Subject: afternoon meeting
        S: 
        S:  BODY[TEXT]<0> {9}
        S: Hello Joe)
        S: A656 OK FETCH completed
        C: A657 FETCH 2 BODY[TEXT]
        S: * 2 FETCH (BODY[TEXT] {55}
        S: Hello Joe, do you think we can meet at 3:30 tomorrow?
        S:  FLAGS (\Recent \Seen))
        S: A657 OK FETCH completed
        C: A003 STORE 2 +FLAGS (\Deleted)
        S: * 2 FETCH (FLAGS (\Recent \Seen \Deleted))
        S: A003 OK STORE completed
        C: A282 SEARCH FLAGGED SINCE 1-Feb-1994 NOT FROM "Smith"
        S: * SEARCH
        S: A282 OK SEARCH completed
        C: A283 SEARCH TEXT "meet at 3:30" NOT DELETED
        S: * SEARCH 1
        S: A283 OK SEARCH completed
        C: A284 SEARCH CHARSET UTF-8 SUBJECT "afternoon"
        S: * SEARCH 1 2
        S: A284 OK SEARCH completed
        C: A003 COPY 1:2 INBOX
        S: A003 OK [COPYUID … 1:2 1:2] COPY completed
        C: A999 UID FETCH 1:* (FLAGS)
        S: * 1 FETCH (UID 1 FLAGS (\Recent \Seen))
        S: * 2 FETCH (UID 2 FLAGS (\Recent \Seen \Deleted))
        S: A999 OK …
        C: A202 EXPUNGE
        S: * 2 EXPUNGE
        S: A202 OK EXPUNGE completed
        C: A341 CLOSE
        S: A341 OK CLOSE completed
        C: A342 EXAMINE INBOX
        S: * 2 EXISTS
        S: * 2 RECENT
        S: * FLAGS …
        S: * OK [PERMANENTFLAGS ()] …
        S: * OK [UIDVALIDITY …] …
        S: * OK [UIDNEXT 3] …
        S: * OK [HIGHESTMODSEQ …] …
        S: A342 OK [READ-ONLY] EXAMINE completed
        "#,
    )
    .await;
}

#[tokio::test]
async fn idle_sees_another_sessions_append_and_flags() {
    // RFC 9051 §6.3.13 IDLE, and §7.5.1's rules for updates from other sessions: no EXPUNGE
    // during FETCH (the expunged message is answered from what the session last knew), then
    // the EXPUNGE at the next NOOP.
    replay(
        r#"
        S: * OK …
        S2: * OK …
        C: A001 LOGIN alice@example.test alicepass
        S: A001 OK …
        C2: B001 LOGIN alice@example.test alicepass
        S2: B001 OK …
        C: A002 SELECT INBOX
        S: * 0 EXISTS
        S: * 0 RECENT
        S: * FLAGS …
        S: * OK [PERMANENTFLAGS …] …
        S: * OK [UIDVALIDITY …] …
        S: * OK [UIDNEXT 1] …
        S: * OK [HIGHESTMODSEQ …] …
        S: A002 OK [READ-WRITE] SELECT completed
        C: A003 IDLE
        S: + idling
        C2: B002 APPEND INBOX {LEN}
        S2: + …
        C2: <MESSAGE>
        S2: B002 OK [APPENDUID … 1] APPEND completed
        S: * 1 EXISTS
        S: * 1 RECENT
        C: DONE
        S: A003 OK IDLE terminated
        C2: B003 SELECT INBOX
        S2: * 1 EXISTS
        S2: * 0 RECENT
        S2: * OK [UNSEEN 1] …
        S2: * FLAGS …
        S2: * OK [PERMANENTFLAGS …] …
        S2: * OK [UIDVALIDITY …] …
        S2: * OK [UIDNEXT 2] …
        S2: * OK [HIGHESTMODSEQ …] …
        S2: B003 OK [READ-WRITE] SELECT completed
        C2: B004 STORE 1 +FLAGS.SILENT (\Flagged)
        S2: B004 OK STORE completed
        C: A004 NOOP
        S: * 1 FETCH (FLAGS (\Recent \Flagged))
        S: A004 OK NOOP completed
        C2: B005 STORE 1 +FLAGS.SILENT (\Deleted)
        S2: B005 OK STORE completed
        C2: B006 EXPUNGE
        S2: * 1 EXPUNGE
        S2: B006 OK EXPUNGE completed
        C: A005 FETCH 1 (FLAGS)
        S: * 1 FETCH (FLAGS (\Recent \Flagged))
        S: A005 OK FETCH completed
        C: A006 NOOP
        S: * 1 EXPUNGE
        S: A006 OK NOOP completed
        "#,
    )
    .await;
}

#[tokio::test]
async fn literals_and_errors() {
    // RFC 9051 §4.3 synchronizing literals, §7.1 BAD for syntax and state errors, §2.2.1 tags.
    replay(
        r#"
        S: * OK …
        S2: * OK …
        C: a1 SELECT INBOX
        S: a1 BAD …
        C: a2 LOGIN {18}
        S: + …
        C: alice@example.test {9}
        S: + …
        C: alicepass
        S: a2 OK …
        C: a3 FETCH 1 (FLAGS)
        S: a3 BAD …
        C: a4 SELECT INBOX
        S: * 0 EXISTS
        S: * 0 RECENT
        S: * FLAGS …
        S: * OK [PERMANENTFLAGS …] …
        S: * OK [UIDVALIDITY …] …
        S: * OK [UIDNEXT 1] …
        S: * OK [HIGHESTMODSEQ …] …
        S: a4 OK [READ-WRITE] SELECT completed
        C: a5 FETCH 1 (FLAGS)
        S: a5 BAD …
        C: a6 FROBNICATE
        S: a6 BAD …
        C: a7 LOGOUT
        S: * BYE …
        S: a7 OK LOGOUT completed
        "#,
    )
    .await;
}

#[tokio::test]
async fn keywords_condstore_qresync() {
    // RFC 9051 §2.3.2 keywords (PERMANENTFLAGS \*), RFC 7162 §3.1 CONDSTORE (MODSEQ,
    // CHANGEDSINCE, UNCHANGEDSINCE with MODIFIED, SEARCH MODSEQ, STATUS HIGHESTMODSEQ) and §3.2
    // QRESYNC (SELECT with resync data, VANISHED (EARLIER), VANISHED instead of EXPUNGE), with
    // the RFC's exchanges on this folder's numbers: a fresh folder starts at HIGHESTMODSEQ 1.
    replay(
        r#"
        S: * OK …
        S2: * OK …
        C: A001 LOGIN alice@example.test alicepass
        S: A001 OK …
        C2: B001 LOGIN alice@example.test alicepass
        S2: B001 OK …
        C: A002 APPEND INBOX (\Seen $Junk) {LEN}
        S: + …
        C: <MESSAGE>
        S: A002 OK [APPENDUID … 1] APPEND completed
        C: A003 APPEND INBOX {LEN}
        S: + …
        C: <MESSAGE>
        S: A003 OK [APPENDUID … 2] APPEND completed
        C: A004 APPEND INBOX (Work $junk) {LEN}
        S: + …
        C: <MESSAGE>
        S: A004 OK [APPENDUID … 3] APPEND completed
        C: A005 SELECT INBOX (CONDSTORE)
        S: * 3 EXISTS
        S: * 3 RECENT
        S: * OK [UNSEEN 2] …
        S: * FLAGS (\Answered \Flagged \Deleted \Seen \Draft $Forwarded $Junk Work)
        S: * OK [PERMANENTFLAGS (\Answered \Flagged \Deleted \Seen \Draft $Forwarded $Junk Work \*)] …
        S: * OK [UIDVALIDITY …] …
        S: * OK [UIDNEXT 4] …
        S: * OK [HIGHESTMODSEQ 4] …
        S: A005 OK [READ-WRITE] SELECT completed
        C: A006 FETCH 1:* (FLAGS) (CHANGEDSINCE 2)
        S: * 2 FETCH (FLAGS (\Recent) MODSEQ (3))
        S: * 3 FETCH (FLAGS (\Recent $Junk Work) MODSEQ (4))
        S: A006 OK FETCH completed
        C: A007 STORE 1:3 (UNCHANGEDSINCE 3) +FLAGS.SILENT (\Flagged NewWord)
        S: * FLAGS (\Answered \Flagged \Deleted \Seen \Draft $Forwarded $Junk Work NewWord)
        S: * OK [PERMANENTFLAGS (\Answered \Flagged \Deleted \Seen \Draft $Forwarded $Junk Work NewWord \*)] …
        S: * 1 FETCH (UID 1 MODSEQ (5))
        S: * 2 FETCH (UID 2 MODSEQ (6))
        S: A007 OK [MODIFIED 3] Conditional STORE failed for some messages
        C: A008 SEARCH KEYWORD newword MODSEQ 6
        S: * SEARCH 2 (MODSEQ 6)
        S: A008 OK SEARCH completed
        C: A009 UID SEARCH UNKEYWORD $JUNK
        S: * SEARCH 2
        S: A009 OK SEARCH completed
        C2: B002 STATUS INBOX (HIGHESTMODSEQ MESSAGES)
        S2: * STATUS INBOX (HIGHESTMODSEQ 6 MESSAGES 3)
        S2: B002 OK STATUS completed
        C2: B003 ENABLE QRESYNC
        S2: * ENABLED QRESYNC
        S2: B003 OK ENABLE completed
        C2: B004 SELECT INBOX
        S2: * 3 EXISTS
        S2: * 0 RECENT
        S2: * OK [UNSEEN 2] …
        S2: * FLAGS …
        S2: * OK [PERMANENTFLAGS …] …
        S2: * OK [UIDVALIDITY …] …
        S2: * OK [UIDNEXT 4] …
        S2: * OK [HIGHESTMODSEQ 6] …
        S2: B004 OK [READ-WRITE] SELECT completed
        C2: B005 UID STORE 2 +FLAGS.SILENT (\Deleted)
        S2: * 2 FETCH (UID 2 MODSEQ (7))
        S2: B005 OK STORE completed
        C2: B006 EXPUNGE
        S2: * VANISHED 2
        S2: B006 OK EXPUNGE completed
        C: A010 NOOP
        S: * 2 EXPUNGE
        S: A010 OK NOOP completed
        C: A011 STORE 1 -FLAGS (NewWord)
        S: * 1 FETCH (UID 1 FLAGS (\Recent \Seen \Flagged $Junk) MODSEQ (9))
        S: A011 OK STORE completed
        C2: B007 UNSELECT
        S2: B007 OK UNSELECT completed
        C2: B008 SELECT INBOX (QRESYNC ({V} 6 1:3))
        S2: * 2 EXISTS
        S2: * 0 RECENT
        S2: * OK [UNSEEN 2] …
        S2: * FLAGS …
        S2: * OK [PERMANENTFLAGS …] …
        S2: * OK [UIDVALIDITY …] …
        S2: * OK [UIDNEXT 4] …
        S2: * OK [HIGHESTMODSEQ 9] …
        S2: * VANISHED (EARLIER) 2
        S2: * 1 FETCH (UID 1 FLAGS (\Seen \Flagged $Junk) MODSEQ (9))
        S2: B008 OK [READ-WRITE] SELECT completed
        C2: B009 UID FETCH 1:* (FLAGS) (CHANGEDSINCE 4 VANISHED)
        S2: * VANISHED (EARLIER) 2
        S2: * 1 FETCH (UID 1 FLAGS (\Seen \Flagged $Junk) MODSEQ (9))
        S2: B009 OK FETCH completed
        C2: B010 UID FETCH 1:* (FLAGS) (CHANGEDSINCE 9 VANISHED)
        S2: B010 OK FETCH completed
        C2: B011 FETCH 1 (FLAGS) (VANISHED)
        S2: B011 BAD …
        C: A012 SELECT INBOX (QRESYNC (1 1))
        S: A012 BAD …
        "#,
    )
    .await;
}

#[tokio::test]
async fn sort_and_thread() {
    // RFC 5256 §3 SORT (ties by sequence number) and THREAD ORDEREDSUBJECT and REFERENCES (the
    // "Re:" message joins its base subject's thread), with §4's thread-list syntax; RFC 5267
    // ESORT (MIN first in sort order, ALL in sort order).
    replay(
        r#"
        S: * OK …
        S2: * OK …
        C: A001 LOGIN alice@example.test alicepass
        S: A001 OK …
        C: A002 APPEND INBOX {10+}
        C: Subject: b
        S: A002 OK [APPENDUID … 1] APPEND completed
        C: A003 APPEND INBOX {10+}
        C: Subject: a
        S: A003 OK [APPENDUID … 2] APPEND completed
        C: A004 APPEND INBOX {14+}
        C: Subject: Re: b
        S: A004 OK [APPENDUID … 3] APPEND completed
        C: A005 SELECT INBOX
        S: * 3 EXISTS
        S: * 3 RECENT
        S: * OK [UNSEEN 1] …
        S: * FLAGS …
        S: * OK [PERMANENTFLAGS …] …
        S: * OK [UIDVALIDITY …] …
        S: * OK [UIDNEXT 4] …
        S: * OK [HIGHESTMODSEQ …] …
        S: A005 OK [READ-WRITE] SELECT completed
        C: A006 SORT (SUBJECT) UTF-8 ALL
        S: * SORT 2 1 3
        S: A006 OK SORT completed
        C: A007 SORT (REVERSE SUBJECT) UTF-8 ALL
        S: * SORT 1 3 2
        S: A007 OK SORT completed
        C: A008 UID SORT (SIZE) US-ASCII NOT SUBJECT a
        S: * SORT 1 3
        S: A008 OK SORT completed
        C: A009 THREAD ORDEREDSUBJECT UTF-8 ALL
        S: * THREAD (1 3)(2)
        S: A009 OK THREAD completed
        C: A010 THREAD REFERENCES UTF-8 ALL
        S: * THREAD (1 3)(2)
        S: A010 OK THREAD completed
        C: A011 SORT (SUBJECT) KOI8-R ALL
        S: A011 NO [BADCHARSET (US-ASCII UTF-8)] …
        C: A012 SORT RETURN (MIN COUNT ALL) (SUBJECT) UTF-8 ALL
        S: * ESEARCH (TAG "A012") MIN 2 COUNT 3 ALL 2,1,3
        S: A012 OK SORT completed
        "#,
    )
    .await;
}

#[tokio::test]
async fn multiappend_is_all_or_nothing() {
    // RFC 3502 §6.3.11: several messages in one APPEND, one APPENDUID set; a refused message
    // leaves none of them stored.
    replay(
        r#"
        S: * OK …
        S2: * OK …
        C: A001 LOGIN alice@example.test alicepass
        S: A001 OK …
        C: A002 APPEND INBOX {10+}
        C: Subject: a (\Seen) {10+}
        C: Subject: b
        S: A002 OK [APPENDUID … 1:2] APPEND completed
        C: A003 APPEND INBOX {10+}
        C: Subject: c {0+}
        C: 
        S: A003 NO …
        C: A004 STATUS INBOX (MESSAGES UIDNEXT)
        S: * STATUS INBOX (MESSAGES 2 UIDNEXT 3)
        S: A004 OK STATUS completed
        "#,
    )
    .await;
}

#[tokio::test]
async fn searchres_saves_a_result_for_later_commands() {
    // RFC 5182 §2: SAVE alone answers no ESEARCH; `$` then names the saved messages in FETCH,
    // STORE, COPY and SEARCH, in UID and non-UID forms alike; with MIN only the minimum is
    // saved; a failed SEARCH empties `$`.
    replay(
        r#"
        S: * OK …
        S2: * OK …
        C: A001 LOGIN alice@example.test alicepass
        S: A001 OK …
        C: A002 APPEND INBOX (\Flagged) {10+}
        C: Subject: a
        S: A002 OK [APPENDUID … 1] APPEND completed
        C: A003 APPEND INBOX {10+}
        C: Subject: b
        S: A003 OK [APPENDUID … 2] APPEND completed
        C: A004 APPEND INBOX (\Flagged) {10+}
        C: Subject: c
        S: A004 OK [APPENDUID … 3] APPEND completed
        C: A005 EXAMINE INBOX
        S: * 3 EXISTS
        S: * 3 RECENT
        S: * OK [UNSEEN 1] …
        S: * FLAGS …
        S: * OK [PERMANENTFLAGS …] …
        S: * OK [UIDVALIDITY …] …
        S: * OK [UIDNEXT 4] …
        S: * OK [HIGHESTMODSEQ …] …
        S: A005 OK [READ-ONLY] EXAMINE completed
        C: A006 SEARCH RETURN (SAVE) FLAGGED
        S: A006 OK SEARCH completed
        C: A007 FETCH $ (UID)
        S: * 1 FETCH (UID 1)
        S: * 3 FETCH (UID 3)
        S: A007 OK FETCH completed
        C: A008 UID SEARCH $ SUBJECT c
        S: * SEARCH 3
        S: A008 OK SEARCH completed
        C: A009 UID COPY $ Archive
        S: A009 OK [COPYUID … 1,3 1:2] COPY completed
        C: A010 SEARCH RETURN (SAVE MIN) FLAGGED
        S: * ESEARCH (TAG "A010") MIN 1
        S: A010 OK SEARCH completed
        C: A011 UID FETCH $ (FLAGS)
        S: * 1 FETCH (UID 1 FLAGS (\Recent \Flagged))
        S: A011 OK FETCH completed
        C: A012 SEARCH RETURN (SAVE BOGUS) ALL
        S: A012 BAD …
        C: A013 FETCH $ (UID)
        S: A013 OK FETCH completed
        "#,
    )
    .await;
}

#[tokio::test]
async fn context_search_partial_and_updates() {
    // RFC 9394 PARTIAL (positive and negative ranges, NIL past the end); RFC 5267 §4: a
    // search with UPDATE is told ADDTO and REMOVEFROM as the folder changes, REMOVEFROM before
    // the EXPUNGE of a message that leaves by being expunged, until CANCELUPDATE.
    replay(
        r#"
        S: * OK …
        S2: * OK …
        C: A001 LOGIN alice@example.test alicepass
        S: A001 OK …
        C: A002 APPEND INBOX {10+}
        C: Subject: a
        S: A002 OK [APPENDUID … 1] APPEND completed
        C: A003 APPEND INBOX {10+}
        C: Subject: b
        S: A003 OK [APPENDUID … 2] APPEND completed
        C: A004 APPEND INBOX {10+}
        C: Subject: c
        S: A004 OK [APPENDUID … 3] APPEND completed
        C: A005 SELECT INBOX
        S: * 3 EXISTS
        S: * 3 RECENT
        S: * OK [UNSEEN 1] …
        S: * FLAGS …
        S: * OK [PERMANENTFLAGS …] …
        S: * OK [UIDVALIDITY …] …
        S: * OK [UIDNEXT 4] …
        S: * OK [HIGHESTMODSEQ …] …
        S: A005 OK [READ-WRITE] SELECT completed
        C: A006 SEARCH RETURN (PARTIAL 2:3) ALL
        S: * ESEARCH (TAG "A006") PARTIAL (2:3 2:3)
        S: A006 OK SEARCH completed
        C: A007 UID SEARCH RETURN (PARTIAL -1:-2) ALL
        S: * ESEARCH (TAG "A007") UID PARTIAL (-2:-1 2:3)
        S: A007 OK SEARCH completed
        C: A008 SEARCH RETURN (PARTIAL 5:9) ALL
        S: * ESEARCH (TAG "A008") PARTIAL (5:9 NIL)
        S: A008 OK SEARCH completed
        C: A009 SEARCH RETURN (PARTIAL 1:*) ALL
        S: A009 BAD …
        C: A010 SEARCH RETURN (UPDATE) SEEN
        S: * ESEARCH (TAG "A010")
        S: A010 OK SEARCH completed
        C: A011 STORE 1:2 +FLAGS.SILENT (\Seen)
        S: * ESEARCH (TAG "A010") ADDTO (0 1:2)
        S: A011 OK STORE completed
        C: A012 STORE 2 +FLAGS.SILENT (\Deleted)
        S: A012 OK STORE completed
        C: A013 EXPUNGE
        S: * ESEARCH (TAG "A010") REMOVEFROM (0 2)
        S: * 2 EXPUNGE
        S: A013 OK EXPUNGE completed
        C: A014 CANCELUPDATE "A010"
        S: A014 OK CANCELUPDATE completed
        C: A015 STORE 2 +FLAGS.SILENT (\Seen)
        S: A015 OK STORE completed
        "#,
    )
    .await;
}

#[tokio::test]
async fn catenate_builds_a_message_from_urls_and_text() {
    // RFC 4469 §5: a new message from a part of a stored one (by IMAP URL) and new text;
    // §6: a URL naming nothing is NO [BADURL], a missing target NO [TRYCREATE] first.
    replay(
        r#"
        S: * OK …
        S2: * OK …
        C: A001 LOGIN alice@example.test alicepass
        S: A001 OK …
        C: A002 APPEND INBOX {25+}
        C: Subject: base
        C: 
        C: old body
        S: A002 OK [APPENDUID … 1] APPEND completed
        C: A003 APPEND Drafts CATENATE (URL "/INBOX/;UID=1/;SECTION=HEADER" TEXT {8+}
        C: new body) CATENATE (TEXT {5+}
        C: Hello URL "/INBOX/;uid=1/;section=TEXT")
        S: A003 OK [APPENDUID … 1:2] APPEND completed
        C: A004 APPEND Drafts CATENATE (URL "/INBOX;UIDVALIDITY=1/;UID=1/;SECTION=HEADER")
        S: A004 NO [BADURL "/INBOX;UIDVALIDITY=1/;UID=1/;SECTION=HEADER"] …
        C: A005 APPEND Nowhere CATENATE (URL "/INBOX/;UID=9")
        S: A005 NO [TRYCREATE] …
        C: A006 EXAMINE Drafts
        S: * 2 EXISTS
        S: * 2 RECENT
        S: * OK [UNSEEN 1] …
        S: * FLAGS …
        S: * OK [PERMANENTFLAGS …] …
        S: * OK [UIDVALIDITY …] …
        S: * OK [UIDNEXT 3] …
        S: * OK [HIGHESTMODSEQ …] …
        S: A006 OK [READ-ONLY] EXAMINE completed
        C: A007 FETCH 1:2 RFC822.SIZE
        S: * 1 FETCH (RFC822.SIZE 25)
        S: * 2 FETCH (RFC822.SIZE 13)
        S: A007 OK FETCH completed
        "#,
    )
    .await;
}

#[tokio::test]
async fn notify_tells_changes_between_commands() {
    // RFC 5465: with NOTIFY SET, another session's changes reach this one while it sends
    // nothing: the selected folder's as EXISTS and EXPUNGE (SELECTED), other folders' as
    // STATUS, a new folder as LIST (MailboxName); STATUS asks for the initial state at once;
    // unsupported events are NO [BADEVENT]; NOTIFY NONE stops it.
    replay(
        r#"
        S: * OK …
        S2: * OK …
        C: A001 LOGIN alice@example.test alicepass
        S: A001 OK …
        C2: B001 LOGIN alice@example.test alicepass
        S2: B001 OK …
        C: A002 SELECT INBOX
        S: * 0 EXISTS
        S: * 0 RECENT
        S: * FLAGS …
        S: * OK [PERMANENTFLAGS …] …
        S: * OK [UIDVALIDITY …] …
        S: * OK [UIDNEXT 1] …
        S: * OK [HIGHESTMODSEQ …] …
        S: A002 OK [READ-WRITE] SELECT completed
        C: A003 NOTIFY SET (SELECTED (MessageNew MessageExpunge)) (PERSONAL (ServerMetadataChange))
        S: A003 NO [BADEVENT (MessageNew MessageExpunge FlagChange MailboxName SubscriptionChange)] …
        C: A004 NOTIFY SET STATUS (SELECTED (MessageNew MessageExpunge)) (MAILBOXES Drafts (MessageNew MessageExpunge)) (PERSONAL (MailboxName))
        S: * STATUS Drafts (MESSAGES 0 UIDNEXT 1 UIDVALIDITY …)
        S: A004 OK NOTIFY completed
        C2: B002 APPEND INBOX {10+}
        C2: Subject: a
        S2: B002 OK [APPENDUID … 1] APPEND completed
        S: * 1 EXISTS
        S: * 1 RECENT
        C2: B003 APPEND Drafts {10+}
        C2: Subject: d
        S2: B003 OK [APPENDUID … 1] APPEND completed
        S: * STATUS Drafts (MESSAGES 1 UIDNEXT 2 UIDVALIDITY …)
        C2: B004 CREATE Projects
        S2: B004 OK CREATE completed
        S: * LIST () "/" Projects
        C: A005 NOTIFY NONE
        S: A005 OK NOTIFY completed
        C2: B005 APPEND INBOX {10+}
        C2: Subject: b
        S2: B005 OK [APPENDUID … 2] APPEND completed
        C: A006 NOOP
        S: * 2 EXISTS
        S: * 2 RECENT
        S: A006 OK NOOP completed
        "#,
    )
    .await;
}

#[tokio::test]
async fn quota_is_reported_and_enforced() {
    // RFC 9208 §4.2-4.3: one quota root ("") for all folders, STORAGE in KiB and MESSAGE;
    // §4.1: an APPEND or COPY past it is NO [OVERQUOTA]; SETQUOTA is not offered.
    let h = harness_with(|config| {
        config.limits.default_quota_messages = 2;
        config.limits.default_quota_mb = 1;
    });
    replay_in(
        h,
        r#"
        S: * OK …
        S2: * OK …
        C: A001 LOGIN alice@example.test alicepass
        S: A001 OK …
        C: A002 APPEND INBOX {10+}
        C: Subject: a
        S: A002 OK [APPENDUID … 1] APPEND completed
        C: A003 GETQUOTAROOT INBOX
        S: * QUOTAROOT INBOX ""
        S: * QUOTA "" (STORAGE 1 1024 MESSAGE 1 2)
        S: A003 OK GETQUOTAROOT completed
        C: A004 APPEND Drafts {10+}
        C: Subject: b
        S: A004 OK [APPENDUID … 1] APPEND completed
        C: A005 APPEND INBOX {10+}
        C: Subject: c
        S: A005 NO [OVERQUOTA] Quota exceeded
        C: A006 SELECT INBOX
        S: * 1 EXISTS
        S: * 1 RECENT
        S: * OK [UNSEEN 1] …
        S: * FLAGS …
        S: * OK [PERMANENTFLAGS …] …
        S: * OK [UIDVALIDITY …] …
        S: * OK [UIDNEXT 2] …
        S: * OK [HIGHESTMODSEQ …] …
        S: A006 OK [READ-WRITE] SELECT completed
        C: A007 COPY 1 Archive
        S: A007 NO [OVERQUOTA] Quota exceeded
        C: A008 GETQUOTA ""
        S: * QUOTA "" (STORAGE 1 1024 MESSAGE 2 2)
        S: A008 OK GETQUOTA completed
        C: A009 GETQUOTA "other"
        S: A009 NO [NONEXISTENT] …
        C: A010 SETQUOTA "" (STORAGE 512)
        S: A010 NO [CANNOT] …
        "#,
    )
    .await;
}

#[tokio::test]
async fn metadata_on_folders_and_the_server() {
    // RFC 5464 §4.2-4.3 (examples adapted): SETMETADATA sets and NIL removes; GETMETADATA
    // returns what exists, DEPTH reaches below, MAXSIZE leaves out with LONGENTRIES; "" is
    // the server; bad names are BAD; a missing folder is NONEXISTENT.
    replay(
        r#"
        S: * OK …
        S2: * OK …
        C: A001 LOGIN alice@example.test alicepass
        S: A001 OK …
        C: A002 SETMETADATA INBOX (/private/comment "My own comment" /shared/vendor/x/a "1")
        S: A002 OK SETMETADATA completed
        C: A003 GETMETADATA INBOX /private/comment
        S: * METADATA INBOX (/private/comment "My own comment")
        S: A003 OK GETMETADATA completed
        C: A004 GETMETADATA (DEPTH infinity) INBOX (/shared/vendor /private/comment)
        S: * METADATA INBOX (/private/comment "My own comment" /shared/vendor/x/a "1")
        S: A004 OK GETMETADATA completed
        C: A005 GETMETADATA (MAXSIZE 5) INBOX /private/comment
        S: A005 OK [METADATA LONGENTRIES 14] GETMETADATA completed
        C: A006 SETMETADATA "" (/shared/admin "mailto:admin@example.test")
        S: A006 OK SETMETADATA completed
        C: A007 GETMETADATA "" /shared/admin
        S: * METADATA "" (/shared/admin "mailto:admin@example.test")
        S: A007 OK GETMETADATA completed
        C: A008 SETMETADATA INBOX (/private/comment NIL)
        S: A008 OK SETMETADATA completed
        C: A009 GETMETADATA INBOX /private/comment
        S: A009 OK GETMETADATA completed
        C: A010 SETMETADATA INBOX (/nowhere/x "1")
        S: A010 BAD …
        C: A011 GETMETADATA Missing /private/comment
        S: A011 NO [NONEXISTENT] …
        "#,
    )
    .await;
}
