"""IMAP end to end with Python's imaplib against the real binary, on messages delivered by SMTP."""

import imaplib
import re
import smtplib
import socket
import subprocess
import ssl
import threading
import time
import zlib

import pytest


@pytest.fixture(params=["maildir", "mailbox-log", "postgres"])
def backend(request):
    """Every test here runs on the embedded Maildir, on the shipped Wasm backend and on
    PostgreSQL."""
    return request.param


ALICE = ("alice@example.test", "alicepass")

# imaplib knows only the commands of its time; these are sent through _simple_command.
for _name in ("ID", "MOVE", "ENABLE", "UNSELECT", "GETMETADATA", "SETMETADATA"):
    imaplib.Commands.setdefault(_name, ("NONAUTH", "AUTH", "SELECTED"))


def message(n, body=b"Hello Alice.\r\n", subject=None):
    subject = subject or b"imap test " + str(n).encode()
    return (
        b"From: Sender <sender@remote.test>\r\n"
        b"To: Alice <alice@example.test>\r\n"
        b"Subject: " + subject + b"\r\n"
        b"Date: Sun, 22 Nov 2026 09:00:00 +0000\r\n"
        b"Message-ID: <" + str(n).encode() + b"@remote.test>\r\n"
        b"\r\n" + body
    )


MULTIPART = (
    b"From: Sender <sender@remote.test>\r\n"
    b"To: alice@example.test\r\n"
    b"Subject: with attachment\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b1"\r\n'
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"See the attachment.\r\n"
    b"--b1\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b'Content-Disposition: attachment; filename="x.bin"\r\n'
    b"\r\n"
    b"AAECAwQ=\r\n"
    b"--b1--\r\n"
)


def deliver(server, messages, rcpt="alice@example.test"):
    user = rcpt.split("@")[0]
    before = len(server.maildir(user))
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
        for m in messages:
            assert s.sendmail("sender@remote.test", [rcpt], m) == {}
    assert len(server.wait_for_mail(user, before + len(messages))) == before + len(messages)


def stored(server, user="alice"):
    """Stored messages in arrival (UID) order, CRLF form."""
    mail = server.maildir(user)
    mail.sort(key=lambda item: (int(item[0].split(".")[0]), item[0]))
    return [content.replace(b"\n", b"\r\n") for _, content in mail]


def connect(server, login=True):
    m = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=10)
    m.starttls(ssl_context=ssl.create_default_context(cafile=server.cert))
    if login:
        m.login(*ALICE)
    return m


def ok(result):
    typ, data = result
    assert typ == "OK", data
    return data


def test_capabilities_starttls_and_login(server):
    m = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=10)
    caps = set(m.capabilities)
    assert {"IMAP4REV1", "IMAP4REV2", "STARTTLS", "LOGINDISABLED", "IDLE", "UIDPLUS", "MOVE",
            "LITERAL+", "SPECIAL-USE", "NAMESPACE", "ENABLE", "ID", "UNSELECT", "ESEARCH"} <= caps
    assert not any(c.startswith("AUTH=") for c in caps)
    with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
        m.login(*ALICE)
    m.starttls(ssl_context=ssl.create_default_context(cafile=server.cert))
    caps = set(m.capabilities)
    assert "STARTTLS" not in caps and "LOGINDISABLED" not in caps and "AUTH=PLAIN" in caps
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        m.login("alice@example.test", "wrong")
    ok(m.login(*ALICE))
    assert ok(m.namespace()) == [b'(("" "/")) NIL NIL']
    typ, data = m._simple_command("ID", "NIL")
    assert typ == "OK"
    assert b'"Postern"' in m.untagged_responses.pop("ID")[0]
    typ, data = m._simple_command("ENABLE", "IMAP4rev2")
    assert typ == "OK" and m.untagged_responses.pop("ENABLED") == [b"IMAP4rev2"]
    m.logout()


def test_imaps_with_authenticate_plain(server):
    ctx = ssl.create_default_context(cafile=server.cert)
    m = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=ctx, timeout=10)
    ok(m.authenticate("PLAIN", lambda _: b"\0alice@example.test\0alicepass"))
    ok(m.select("INBOX"))
    m.logout()


def test_special_use_folders_list_lsub_status_create_rename_delete(server):
    m = connect(server)
    lines = ok(m.list('""', "*"))
    listed = {re.search(rb'"/" "?([^"]*)"?$', l).group(1).decode(): l for l in lines}
    assert set(listed) == {"INBOX", "Sent", "Drafts", "Trash", "Junk", "Archive"}
    assert b"\\Sent" in listed["Sent"] and b"\\Trash" in listed["Trash"]
    assert b"\\HasNoChildren" in listed["INBOX"]
    subscribed = ok(m.lsub('""', "*"))
    assert len(subscribed) == 5
    # LIST-EXTENDED with LIST-STATUS, as Thunderbird and K-9 send it.
    typ, data = m._simple_command("LIST", '(SPECIAL-USE) "" "*" RETURN (SUBSCRIBED STATUS (MESSAGES UNSEEN))')
    assert typ == "OK"
    lists = m.untagged_responses.pop("LIST")
    assert len(lists) == 5 and all(b"\\Subscribed" in l for l in lists)
    assert len(m.untagged_responses.pop("STATUS")) == 5

    # CREATE makes the superior name a folder too (RFC 9051 §6.3.4).
    ok(m.create("Projects/2026"))
    lines = ok(m.list("Projects", "*"))
    assert lines == [b'(\\HasChildren) "/" Projects', b'(\\HasNoChildren) "/" Projects/2026'], lines
    typ, data = m.create("Projects/2026")
    assert typ == "NO" and b"ALREADYEXISTS" in data[0]
    ok(m.rename("Projects/2026", "Work"))
    typ, data = m.select("Projects/2026")
    assert typ == "NO" and b"NONEXISTENT" in data[0]
    ok(m.subscribe("Work"))
    assert ok(m.lsub('""', "W*")) == [b'() "/" Work']
    ok(m.unsubscribe("Work"))
    ok(m.delete("Work"))
    assert not any(l.endswith(b" Work") for l in ok(m.list('""', "*")))
    typ, data = m.delete("INBOX")
    assert typ == "NO"

    deliver(server, [message(1), message(2)])
    typ, data = m.status("INBOX", "(MESSAGES UIDNEXT UIDVALIDITY UNSEEN)")
    assert typ == "OK"
    status = data[0].decode()
    assert "MESSAGES 2" in status and "UIDNEXT 3" in status and "UNSEEN 2" in status
    m.logout()


def test_select_fetch_is_byte_exact_and_sets_seen(server):
    sent = [message(1), message(2, b".dot line\r\nline two\r\n"), MULTIPART]
    deliver(server, sent)
    expected = stored(server)
    m = connect(server)
    typ, data = m.select("INBOX")
    assert typ == "OK" and data == [b"3"]
    assert m.untagged_responses.get("UIDVALIDITY")
    # BODY.PEEK[] is the stored message byte for byte and does not set \Seen.
    for i, want in enumerate(expected, start=1):
        data = ok(m.fetch(str(i), "(UID RFC822.SIZE BODY.PEEK[])"))
        head, body = data[0]
        assert body == want
        assert f"RFC822.SIZE {len(want)}".encode() in head
    assert b"\\Seen" not in ok(m.fetch("1:3", "(FLAGS)"))[0]
    # Partial fetch.
    head, body = ok(m.fetch("1", "(BODY.PEEK[]<10.20>)"))[0]
    assert body == expected[0][10:30] and b"BODY[]<10>" in head
    # Header fields, text, MIME parts, BINARY.
    head, body = ok(m.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)])"))[0]
    assert body == b"From: Sender <sender@remote.test>\r\nSubject: imap test 1\r\n\r\n"
    head, body = ok(m.fetch("2", "(BODY.PEEK[TEXT])"))[0]
    assert body == b".dot line\r\nline two\r\n"
    head, body = ok(m.fetch("3", "(BODY.PEEK[1])"))[0]
    assert body == b"See the attachment."
    head, body = ok(m.fetch("3", "(BODY.PEEK[2.MIME])"))[0]
    assert body.startswith(b"Content-Type: application/octet-stream\r\n") and body.endswith(b"\r\n\r\n")
    head, body = ok(m.fetch("3", "(BINARY.PEEK[2])"))[0]
    assert body == b"\x00\x01\x02\x03\x04"
    # ENVELOPE and BODYSTRUCTURE.
    data = ok(m.fetch("1", "(ENVELOPE)"))[0]
    assert b'"imap test 1" (("Sender" NIL "sender" "remote.test"))' in data
    assert b'(("Alice" NIL "alice" "example.test"))' in data and b'"<1@remote.test>"' in data
    data = ok(m.fetch("3", "(BODYSTRUCTURE)"))[0]
    assert b'("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" 19 1' in data
    assert b'("APPLICATION" "OCTET-STREAM" NIL NIL NIL "BASE64" 8 NIL ("ATTACHMENT" ("FILENAME" "x.bin"))' in data
    assert b'"MIXED" ("BOUNDARY" "b1")' in data
    # BODY[] (not PEEK) sets \Seen and says so.
    data = ok(m.fetch("1", "(BODY[])"))
    assert b"\\Seen" in data[0][0] or b"\\Seen" in data[1]
    assert b"\\Seen" in ok(m.fetch("1", "(FLAGS)"))[0]
    assert server.maildir("alice")[0][0].endswith(":2,S") or any(
        n.endswith(":2,S") for n, _ in server.maildir("alice"))
    # UID FETCH answers with UIDs and takes UID ranges.
    data = ok(m.uid("FETCH", "2:*", "(FLAGS)"))
    assert [re.search(rb"UID (\d+)", l).group(1) for l in data] == [b"2", b"3"]
    with pytest.raises(imaplib.IMAP4.error, match="BAD.*Invalid message sequence number"):
        m.fetch("9", "(FLAGS)")
    m.logout()


def test_search_store_expunge_and_a_second_session_sees_it(server):
    deliver(server, [message(1, subject=b"lunch on friday"), message(2), message(3, b"The secret word is pineapple.\r\n")])
    a = connect(server)
    b = connect(server)
    ok(a.select("INBOX"))
    ok(b.select("INBOX"))
    assert ok(a.search(None, "SUBJECT", "friday")) == [b"1"]
    assert ok(a.search(None, "BODY", "PINEAPPLE")) == [b"3"]
    assert ok(a.search(None, "FROM", "sender", "NOT", "SUBJECT", "lunch")) == [b"2 3"]
    assert ok(a.search(None, "OR", "SUBJECT", "friday", "BODY", "pineapple")) == [b"1 3"]
    assert ok(a.uid("SEARCH", "UID", "2:*")) == [b"2 3"]
    assert ok(a.search(None, "UNSEEN", "LARGER", "10", "SENTON", "22-Nov-2026")) == [b"1 2 3"]
    typ, data = a._simple_command("SEARCH", "RETURN (MIN MAX COUNT) ALL")
    assert typ == "OK"
    esearch = a.untagged_responses.pop("ESEARCH")[0]
    assert b"MIN 1 MAX 3 COUNT 3" in esearch

    data = ok(a.store("2", "+FLAGS", "(\\Flagged \\Deleted)"))
    assert b"\\Flagged" in data[0] and b"\\Deleted" in data[0]
    assert ok(a.search(None, "FLAGGED")) == [b"2"]
    # The other session hears of the change at its next command.
    data = ok(b.noop())
    fetches = b.untagged_responses.pop("FETCH", [])
    assert any(b"2 (FLAGS" in f and b"\\Deleted" in f for f in fetches), fetches
    ok(a.store("2", "-FLAGS.SILENT", "(\\Flagged)"))
    assert a.untagged_responses.pop("FETCH", []) == []
    ok(a.expunge())
    ok(b.noop())
    assert b.untagged_responses.pop("EXPUNGE") == [b"2"]
    assert len(stored(server)) == 2
    # UID EXPUNGE removes only the named \Deleted messages.
    ok(a.store("1:2", "+FLAGS", "(\\Deleted)"))
    ok(a.uid("EXPUNGE", "3"))
    assert ok(a.search(None, "ALL")) == [b"1"]
    a.logout()
    b.logout()


def test_searchres_partial_and_a_search_kept_up_to_date(server):
    """RFC 5182 `$`, RFC 9394 PARTIAL and RFC 5267 UPDATE through imaplib, on SMTP-delivered mail."""
    deliver(server, [message(n, subject=b"report " + str(n).encode()) for n in range(1, 6)])
    a = connect(server)
    b = connect(server)
    assert "SEARCHRES" in a.capabilities and "CONTEXT=SEARCH" in a.capabilities
    ok(a.select("INBOX"))
    ok(b.select("INBOX"))
    # SAVE alone answers nothing; FETCH $ then fetches what it found.
    ok(a._simple_command("SEARCH", "RETURN (SAVE) OR SUBJECT \"report 2\" SUBJECT \"report 4\""))
    assert "ESEARCH" not in a.untagged_responses
    ok(a._simple_command("FETCH", "$", "(UID)"))
    fetches = a.untagged_responses.pop("FETCH")
    assert [f.split()[0] for f in fetches] == [b"2", b"4"], fetches
    ok(a._simple_command("STORE", "$", "+FLAGS.SILENT", "(\\Flagged)"))
    assert ok(a.search(None, "FLAGGED")) == [b"2 4"]
    # PARTIAL: the last two of all five.
    ok(a._simple_command("SEARCH", "RETURN (PARTIAL -1:-2) ALL"))
    assert a.untagged_responses.pop("ESEARCH")[0].endswith(b"PARTIAL (-2:-1 4:5)")
    # A search kept up to date hears of another session's changes at its next command.
    tag = a._command("SEARCH", "RETURN (UPDATE) SEEN")
    ok(a._command_complete("SEARCH", tag))
    assert a.untagged_responses.pop("ESEARCH") == [b'(TAG "' + tag + b'")']
    ok(b.store("1,3", "+FLAGS.SILENT", "(\\Seen)"))
    ok(a.noop())
    assert a.untagged_responses.pop("ESEARCH") == [b'(TAG "' + tag + b'") ADDTO (0 1,3)']
    a.logout()
    b.logout()


def test_quota_refuses_rcpt_and_append_and_is_reported(make_server):
    """A mailbox at its quota: RCPT gets 452 4.2.2, APPEND NO [OVERQUOTA]; GETQUOTAROOT tells the
    usage (RFC 9208); after an EXPUNGE there is room again."""
    server = make_server(default_quota_messages=3)
    deliver(server, [message(n) for n in range(1, 4)])
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
        s.ehlo()
        s.mail("sender@remote.test")
        code, text = s.rcpt("alice@example.test")
        assert (code, text[:5]) == (452, b"4.2.2"), (code, text)
    m = connect(server)
    assert "QUOTA" in m.capabilities
    typ, data = m.getquotaroot("INBOX")
    assert typ == "OK", data
    assert data == [[b'INBOX ""'], [b'"" (MESSAGE 3 3)']], data
    typ, data = m.append("INBOX", None, None, message(9))
    assert typ == "NO" and b"[OVERQUOTA]" in data[0], data
    ok(m.select("INBOX"))
    ok(m.store("1", "+FLAGS", "(\\Deleted)"))
    ok(m.expunge())
    ok(m.append("INBOX", None, None, message(9)))
    assert len(stored(server)) == 3
    m.logout()


def test_quota_at_delivery_keeps_the_message_spooled(make_server):
    """RCPT cannot know the size: a message accepted while there was room but too big for what
    is left stays in the spool, deferred with 4.2.2 (bounced after max_age like any deferral)."""
    server = make_server(default_quota_mb=1)
    big = message(1, body=b"x" * 76 + b"\r\n")
    big = big.replace(b"x" * 76 + b"\r\n", (b"x" * 76 + b"\r\n") * 11000)  # ~860 KB
    deliver(server, [big])
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
        assert s.sendmail("sender@remote.test", ["alice@example.test"], message(2, body=(b"y" * 76 + b"\r\n") * 3000)) == {}
    deadline = time.time() + 10
    while time.time() < deadline and "mailbox full" not in server.log_text():
        time.sleep(0.05)
    assert re.search(r"to=<alice@example\.test>, relay=local, delay=\d+, dsn=4\.2\.2, "
                     r"status=deferred \(alice@example\.test: mailbox full\)", server.log_text())
    assert len(server.maildir("alice")) == 1
    assert len(server.spooled()) >= 1


def test_metadata_survives_a_kill(tmp_path):
    """RFC 5464 through imaplib: an annotation set is there after a kill -9 and restart."""
    from conftest import Server

    server = Server(tmp_path / "run")
    m = connect(server)
    assert "METADATA" in m.capabilities
    ok(m._simple_command("SETMETADATA", "INBOX", '(/private/comment "Read me")'))
    server.stop()
    server = Server(tmp_path / "run")
    m = connect(server)
    ok(m._simple_command("GETMETADATA", "INBOX", "/private/comment"))
    assert m.untagged_responses.pop("METADATA") == [b'INBOX (/private/comment "Read me")']
    m.logout()
    server.stop()


def test_append_copy_move_with_uidplus(server):
    deliver(server, [message(1), message(2)])
    m = connect(server)
    appended = message(9, b"Drafted.\r\n")
    typ, data = m.append("Drafts", "(\\Draft \\Seen)", imaplib.Time2Internaldate(1700000000), appended)
    assert typ == "OK"
    match = re.search(rb"APPENDUID (\d+) (\d+)", data[0])
    assert match and match.group(2) == b"1"
    ok(m.select("Drafts"))
    head, body = ok(m.fetch("1", "(FLAGS INTERNALDATE BODY.PEEK[])"))[0]
    assert body == appended
    assert b"\\Draft" in head and b"\\Seen" in head
    assert b'INTERNALDATE "14-Nov-2023 22:13:20 +0000"' in head
    typ, data = m.append("Nowhere", None, None, appended)
    assert typ == "NO" and b"TRYCREATE" in data[0]

    ok(m.select("INBOX"))
    first = stored(server)[0]
    typ, data = m.copy("1:2", "Archive")
    assert typ == "OK" and re.search(rb"COPYUID \d+ 1:2 1:2", data[0]), data
    typ, data = m._simple_command("MOVE", "1", "Trash")
    assert typ == "OK"
    assert m.untagged_responses.pop("EXPUNGE") == [b"1"]
    assert ok(m.search(None, "ALL")) == [b"1"]
    assert ok(m.status("Trash", "(MESSAGES)"))[0].endswith(b"(MESSAGES 1)")
    assert ok(m.status("Archive", "(MESSAGES)"))[0].endswith(b"(MESSAGES 2)")
    # The moved copy is byte-identical.
    ok(m.select("Trash"))
    assert ok(m.fetch("1", "(BODY.PEEK[])"))[0][1] == first
    m.logout()


def test_idle_wakes_on_smtp_delivery(server):
    m = connect(server)
    ok(m.select("INBOX"))
    tag = m._new_tag().decode()
    m.send(f"{tag} IDLE\r\n".encode())
    assert m.readline().startswith(b"+ ")
    started = time.time()
    threading.Thread(target=deliver, args=(server, [message(1)])).start()
    line = m.readline()
    assert line == b"* 1 EXISTS\r\n", line
    # RFC 3501 §7.3.2: this (IMAP4rev1, read-write) session is the first to see it: \Recent.
    assert m.readline() == b"* 1 RECENT\r\n"
    assert time.time() - started < 5
    m.send(b"DONE\r\n")
    assert m.readline() == f"{tag} OK IDLE terminated\r\n".encode()
    m.logout()


def test_examine_is_read_only_and_close_expunges(server):
    deliver(server, [message(1), message(2)])
    m = connect(server)
    typ, data = m.select("INBOX", readonly=True)
    assert typ == "OK"
    typ, data = m.store("1", "+FLAGS", "(\\Deleted)")
    assert typ == "NO"
    m.fetch("1", "(BODY[])")
    assert b"\\Seen" not in ok(m.fetch("1", "(FLAGS)"))[0], "EXAMINE never sets \\Seen"
    ok(m.select("INBOX"))
    ok(m.store("1", "+FLAGS", "(\\Deleted)"))
    ok(m.close())
    assert len(stored(server)) == 1
    m.state = "SELECTED"  # imaplib would not even send it
    with pytest.raises(imaplib.IMAP4.error, match="BAD.*No mailbox selected"):
        m.fetch("1", "(FLAGS)")
    ok(m.select("INBOX"))
    ok(m.unselect())
    m.logout()


def raw_imap(server, payload, until=b"\r\n", port="imap"):
    with socket.create_connection(("127.0.0.1", server.ports[port]), timeout=10) as s:
        s.recv(4096)
        s.sendall(payload)
        got = b""
        while until not in got:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def test_garbage_literals_and_errors(make_server):
    server = make_server(transform=lambda t: t.replace('name = "imap"\nprotocol = "imap"\naddress = "127.0.0.1:0"\ntls = "starttls"', 'name = "imap"\nprotocol = "imap"\naddress = "127.0.0.1:0"\ntls = "starttls"\ntrusted = true'))
    got = raw_imap(
        server,
        b"a1 FROBNICATE\r\n)(*&\r\na2 LOGIN alice@example.test alicepass\r\n"
        b"a3 APPEND INBOX {999999999}\r\n"
        b"a4 SELECT INBOX\r\na5 LOGOUT\r\n",
        until=b"a5 OK",
    )
    assert b"a1 BAD" in got and b"* BAD" in got
    assert b"a2 OK" in got
    assert b"a3 NO [TOOBIG]" in got
    assert b"a4 OK [READ-WRITE]" in got
    assert b"* BYE" in got
    # A pipelined APPEND with LITERAL+ and a long line.
    got = raw_imap(
        server,
        b"b1 LOGIN alice@example.test alicepass\r\nb2 APPEND INBOX {12+}\r\nSubject: x\r\n\r\n"
        b"b3 NOOP " + b"x" * 70000 + b"\r\nb4 LOGOUT\r\n",
        until=b"b4 OK",
    )
    assert re.search(rb"b2 OK \[APPENDUID \d+ \d+\]", got), got
    assert b"b3 NO [TOOBIG]" in got or b"b3 BAD" in got or b"* BAD" in got or b"NO [TOOBIG]" in got
    assert b"b4 OK" in got


def test_mbsync_syncs_both_ways(server, tmp_path):
    """isync's mbsync (from Debian) mirrors the mailbox into a local Maildir over STARTTLS, then
    uploads a locally written message and a local flag change."""
    deliver(server, [message(1), message(2)])
    local = tmp_path / "local"
    local.mkdir()
    rc = tmp_path / "mbsyncrc"
    rc.write_text(f"""
IMAPAccount postern
Host 127.0.0.1
Port {server.ports["imap"]}
User alice@example.test
Pass alicepass
SSLType STARTTLS
CertificateFile {server.cert}

IMAPStore far
Account postern

MaildirStore near
Path {local}/
Inbox {local}/INBOX
SubFolders Verbatim

Channel sync
Far :far:
Near :near:
Patterns *
Create Both
Expunge Both
SyncState *
""")

    def mbsync():
        run = subprocess.run(["mbsync", "-c", str(rc), "-a"], capture_output=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr

    mbsync()
    inbox = local / "INBOX"
    pulled = sorted((p for sub in ("new", "cur") for p in (inbox / sub).iterdir()), key=lambda p: p.name)
    assert len(pulled) == 2
    remote = stored(server)
    # mbsync marks what it copies with its own X-TUID field; everything else is our bytes.
    untagged = [re.sub(rb"(?m)^X-TUID: .*\n", b"", p.read_bytes()) for p in pulled]
    assert sorted(untagged) == sorted(
        m.replace(b"\r\n", b"\n") for m in remote)
    for folder in ("Sent", "Drafts", "Trash", "Junk", "Archive"):
        assert (local / folder / "cur").is_dir(), folder

    # Locally: mark the first message seen, and write a new one.
    first = next(p for p in pulled if b"imap test 1" in p.read_bytes())
    name = first.name.split(":2,")[0]
    first.rename(inbox / "cur" / (name + ":2,S"))
    written = message(3, b"Written offline.\r\n").replace(b"\r\n", b"\n")
    (inbox / "new" / "1700000000.local1.host").write_bytes(written)
    mbsync()

    remote = server.maildir("alice")
    assert len(remote) == 3, [n for n, _ in remote]
    assert any(content.endswith(b"Written offline.\n") for _, content in remote)
    seen = [n for n, content in remote if b"imap test 1" in content]
    assert len(seen) == 1 and seen[0].endswith(":2,S"), seen
    # A second run changes nothing.
    mbsync()
    assert len(server.maildir("alice")) == 3


def test_mutt_reads_files_and_deletes(server, tmp_path):
    """mutt (from Debian) in a pseudo-terminal over STARTTLS: opens INBOX, pipes both messages
    out (byte-identical to what SMTP delivered), saves one to Archive (COPY), deletes it and
    syncs (STORE \\Deleted + EXPUNGE), then quits. The server's Maildir shows each step."""
    deliver(server, [message(1), message(2, b"Second body.\r\n")])
    delivered = {b"imap test 1" in c: c for _, c in server.maildir("alice")}
    out = tmp_path / "out"
    out.mkdir()
    base = f"imap://alice%40example.test@127.0.0.1:{server.ports['imap']}"
    muttrc = tmp_path / "muttrc"
    muttrc.write_text(f"""
set imap_pass = "alicepass"
set ssl_starttls = yes
set ssl_force_tls = yes
set certificate_file = "{server.cert}"
set folder = "{base}/"
set spoolfile = "{base}/INBOX"
set sort = date-sent
set wait_key = no
set confirmappend = no
set delete = yes
set pipe_decode = no
set header_cache = ""
set message_cachedir = ""
set imap_check_subscribed = no
set mail_check = 1000
""")
    keys = (
        f"<pipe-message>cat > {out}/1<enter>"
        "<next-entry>"
        f"<pipe-message>cat > {out}/2<enter>"
        "<first-entry><save-message>=Archive<enter>"
        "<sync-mailbox><quit>"
    )
    # mutt needs a terminal: script(1) gives it one; TERM keeps curses quiet.
    run = subprocess.run(
        ["script", "-qec", f"mutt -n -F {muttrc} -e 'push \"{keys}\"'", "/dev/null"],
        capture_output=True, timeout=60, env={"TERM": "dumb", "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stdout[-2000:]
    piped = [(out / n).read_bytes() for n in ("1", "2")]
    # What mutt read is what was stored (our trace fields included), byte for byte.
    assert piped[0] == delivered[True]
    assert piped[1] == delivered[False]
    # Saved to Archive (COPY) and deleted (mutt's save deletes) then expunged: INBOX keeps 2.
    inbox = server.maildir("alice")
    assert [c for _, c in inbox] == [delivered[False]]
    archived = [c for _, c in server.maildir("alice", folder="Archive")]
    assert archived == [delivered[True]]


def test_compress_deflate(server):
    """COMPRESS=DEFLATE (RFC 4978) over IMAPS with zlib as the client: the OK comes plain, then
    both directions are raw deflate; a FETCH through it is byte-exact; a second COMPRESS is NO."""
    deliver(server, [message(1, b"Compressed body line.\r\n" * 200)])
    ctx = ssl.create_default_context(cafile=server.cert)
    raw = socket.create_connection(("127.0.0.1", server.ports["imaps"]), timeout=10)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    buf = b""

    def plain_line():
        nonlocal buf
        while b"\r\n" not in buf:
            buf += s.recv(4096)
        line, buf = buf.split(b"\r\n", 1)
        return line

    assert plain_line().startswith(b"* OK")
    s.sendall(b"a1 LOGIN alice@example.test alicepass\r\n")
    while not (line := plain_line()).startswith(b"a1 "):
        pass
    assert line.startswith(b"a1 OK") and b"COMPRESS=DEFLATE" in line, line
    s.sendall(b"a2 COMPRESS DEFLATE\r\n")
    assert plain_line() == b"a2 OK DEFLATE active"
    assert buf == b""
    out = zlib.compressobj(wbits=-15)
    inflate = zlib.decompressobj(wbits=-15)

    def send(text):
        s.sendall(out.compress(text) + out.flush(zlib.Z_SYNC_FLUSH))

    def until_tagged(tag):
        data = b""
        while not re.search(rb"(?m)^" + tag + rb" ", data):
            data += inflate.decompress(s.recv(65536))
        return data

    send(b"a3 SELECT INBOX\r\n")
    assert b"* 1 EXISTS" in until_tagged(b"a3")
    send(b"a4 FETCH 1 BODY.PEEK[]\r\na5 COMPRESS DEFLATE\r\n")
    data = until_tagged(b"a5")
    stored_message = stored(server)[0]
    assert b"{%d}\r\n" % len(stored_message) + stored_message + b")\r\na4 OK" in data
    assert re.search(rb"(?m)^a5 NO \[COMPRESSIONACTIVE\]", data)
    send(b"a6 LOGOUT\r\n")
    assert b"a6 OK" in until_tagged(b"a6")
    s.close()


def untagged(m, name):
    return [d.decode() if isinstance(d, bytes) else d for d in m.untagged_responses.pop(name, [])]


def qresync_select(m, arguments):
    typ, data = m._simple_command("SELECT", arguments)
    assert typ == "OK", data
    m.state = "SELECTED"  # imaplib only tracks its own select()


def test_keywords_condstore_qresync_across_a_kill(tmp_path):
    from conftest import Server

    server = Server(tmp_path / "run")
    try:
        deliver(server, [message(1), message(2), message(3)])
        a = connect(server)
        typ, _ = a._simple_command("ENABLE", "QRESYNC")
        assert typ == "OK" and untagged(a, "ENABLED") == ["QRESYNC"]
        qresync_select(a, "INBOX")
        validity = int(untagged(a, "UIDVALIDITY")[0])
        h0 = int(untagged(a, "HIGHESTMODSEQ")[0])
        assert any("\\*" in p for p in untagged(a, "PERMANENTFLAGS"))

        # Keywords: Maildir letters, named in Dovecot's keyword file, told with MODSEQ. This
        # IMAP4rev1 session was the first to select the folder: the messages are \Recent to it.
        data = ok(a.store("1", "+FLAGS", "($Junk Work)"))
        assert re.fullmatch(r"1 \(UID 1 FLAGS \(\\Recent \$Junk Work\) MODSEQ \((\d+)\)\)",
                            data[0].decode()), data
        assert "$Junk Work" in untagged(a, "FLAGS")[-1]  # the table grew: FLAGS again
        inbox = server.data_dir / "mailboxes" / "example.test" / "alice"
        assert (inbox / "dovecot-keywords").read_text() == "0 $Junk\n1 Work\n"
        names = sorted(p.name for p in (inbox / "cur").iterdir())
        assert sum(n.endswith(":2,ab") for n in names) == 1, names
        assert ok(a.search(None, "KEYWORD", "work")) == [b"1"]

        # QRESYNC: an expunge is told as VANISHED; HIGHESTMODSEQ moves on.
        ok(a.uid("STORE", "2", "+FLAGS.SILENT", "(\\Deleted)"))
        ok(a.expunge())
        assert untagged(a, "VANISHED") == ["2"]
        s = connect(server)
        status = ok(s.status("INBOX", "(HIGHESTMODSEQ)"))[0].decode()
        h1 = int(re.search(r"HIGHESTMODSEQ (\d+)", status).group(1))
        assert h1 > h0
        s.logout()
    finally:
        server.stop()  # kill -9: nothing is flushed on the way out

    server = Server(tmp_path / "run")
    try:
        b = connect(server)
        ok(b._simple_command("ENABLE", "QRESYNC"))
        qresync_select(b, f"INBOX (QRESYNC ({validity} {h0} 1:3))")
        assert int(untagged(b, "HIGHESTMODSEQ")[0]) >= h1, "never back, not even after kill -9"
        assert untagged(b, "VANISHED") == ["(EARLIER) 2"]
        fetches = untagged(b, "FETCH")
        assert len(fetches) == 1 and re.fullmatch(
            r"1 \(UID 1 FLAGS \(\$Junk Work\) MODSEQ \(\d+\)\)", fetches[0]
        ), fetches
        data = ok(b.store("2", "+FLAGS", "(\\Seen)"))  # UID 3 is message 2 now
        h2 = int(re.search(r"MODSEQ \((\d+)\)", data[0].decode()).group(1))
        assert h2 > h1

        # Another Maildir tool flags UID 3 by renaming its file: found and given a new MODSEQ.
        (path,) = [p for p in (inbox / "cur").iterdir() if p.name.endswith(":2,S")]
        path.rename(path.with_name(path.name[: -len("S")] + "FS"))
        c = connect(server)
        ok(c._simple_command("ENABLE", "QRESYNC"))
        qresync_select(c, f"INBOX (QRESYNC ({validity} {h2}))")
        fetches = untagged(c, "FETCH")
        assert len(fetches) == 1 and "UID 3 FLAGS (\\Seen \\Flagged)" in fetches[0], fetches
        assert int(re.search(r"MODSEQ \((\d+)\)", fetches[0]).group(1)) > h2
        # CONDSTORE's conditional STORE: refused for a message changed since.
        tag = c._command("UID", "STORE", "1,3", f"(UNCHANGEDSINCE {h2})", "+FLAGS.SILENT", "(\\Answered)")
        typ, data = c._command_complete("UID", tag)
        assert typ == "OK" and data[0].startswith(b"[MODIFIED 3]"), data
        assert untagged(c, "FETCH") == ["1 (UID 1 MODSEQ (%d))" % (h2 + 2)], "UID 1 did change"
        c.logout()
        b.logout()
    finally:
        server.stop()
