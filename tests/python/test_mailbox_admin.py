"""`postern mailbox list|status|create|delete|rename|expunge|import|export` against a running
server: the results are read back with a real IMAP client (imaplib) and the files with Python's
own `mailbox` module (Maildir, mbox), so both sides of each operation are someone else's code."""

import imaplib
import json
import mailbox
import os
import smtplib
import ssl
import subprocess
import time

from conftest import Server, postern_bin

EDITS = {"trusted_networks": '["127.0.0.0/8"]'}


def cli(server, *args):
    return subprocess.run([postern_bin(), "mailbox", *args, "--config", str(server.config)],
                          capture_output=True, text=True, timeout=120)


def ok(server, *args):
    result = cli(server, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def status(server, user):
    folders = json.loads(ok(server, "status", user, "--json"))["folders"]
    return {f["name"]: f for f in folders}


def imap_login(server, user, password):
    context = ssl.create_default_context(cafile=server.cert)
    context.check_hostname = False
    imap = imaplib.IMAP4("127.0.0.1", server.ports["imap"])
    imap.starttls(context)
    imap.login(user, password)
    return imap


def listed(imap):
    typ, lines = imap.list()
    assert typ == "OK"
    return {line.decode().rsplit(' "/" ', 1)[1].strip('"') for line in lines}


def test_folders_status_expunge_and_exports(tmp_path):
    server = Server(tmp_path, EDITS)
    try:
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
            for n in range(3):
                s.sendmail("sender@remote.test", ["alice@example.test"],
                           f"Subject: message {n}\r\n\r\nFrom the body {n}\r\n".encode())
        server.wait_for_mail("alice", 3)
        imap = imap_login(server, "alice@example.test", "alicepass")
        imap.select("INBOX")
        imap.uid("STORE", "1", "+FLAGS", r"(\Seen \Flagged)")

        inbox = status(server, "alice@example.test")["INBOX"]
        assert (inbox["messages"], inbox["unseen"]) == (3, 2), inbox
        assert inbox["uid_next"] == 4 and inbox["uid_validity"] > 0 and inbox["highest_modseq"] > 0

        assert "Projects/2026: created" in ok(server, "create", "alice@example.test", "Projects/2026")
        assert "Projects/2026" in listed(imap)
        ok(server, "rename", "alice@example.test", "Projects/2026", "Archive/2026")
        names = listed(imap)
        assert "Archive/2026" in names and "Projects/2026" not in names, names
        typ, lsub = imap.lsub()
        assert any(b"Archive/2026" in line for line in lsub), lsub
        human = ok(server, "list", "alice@example.test")
        assert "INBOX" in human and "Archive/2026" in human, human

        # One folder as mbox, every folder as a Maildir++ tree.
        mbox_path = tmp_path / "inbox.mbox"
        out = ok(server, "export", "alice@example.test", "--mbox", str(mbox_path), "--folder", "INBOX")
        assert "INBOX: 3 messages exported" in out, out
        exported = mailbox.mbox(str(mbox_path))
        assert [m["Subject"] for m in exported] == ["message 0", "message 1", "message 2"]
        # mboxrd quoting: Python reads mbox as mboxo, which leaves the quote in place...
        assert exported[0].get_payload() == ">From the body 0\n"
        # ...and our own import takes it off again: the bytes come back as they were sent.
        ok(server, "import", "alice@example.test", "--mbox", str(mbox_path), "--folder", "Back")
        imap.select("Back")
        typ, data = imap.fetch("1", "(BODY.PEEK[])")
        assert data[0][1].endswith(b"Subject: message 0\r\n\r\nFrom the body 0\r\n"), data
        ok(server, "delete", "alice@example.test", "Back")
        imap.select("INBOX")
        tree = tmp_path / "tree"
        ok(server, "export", "alice@example.test", "--maildir", str(tree))
        md = mailbox.Maildir(str(tree), create=False)
        assert len(md) == 3
        flags = sorted(m.get_flags() for m in md)
        assert flags == ["", "", "FS"], flags
        assert "Archive.2026" in md.list_folders()
        assert cli(server, "export", "alice@example.test", "--mbox", str(mbox_path),
                   "--folder", "INBOX").returncode == 1, "an existing file is not overwritten"

        # Expunge by age: nothing is a day old yet.
        assert "0 messages removed" in ok(server, "expunge", "alice@example.test", "INBOX",
                                          "--older-than", "1d")
        assert "3 messages removed" in ok(server, "expunge", "alice@example.test", "INBOX",
                                          "--older-than", "0s")
        imap.noop()
        typ, data = imap.search(None, "ALL")
        assert data == [b""], data

        ok(server, "delete", "alice@example.test", "Archive/2026")
        assert "Archive/2026" not in listed(imap)
        assert cli(server, "delete", "alice@example.test", "INBOX").returncode == 1
        missing = cli(server, "status", "nobody@example.test")
        assert missing.returncode == 1 and "no such user" in missing.stderr, missing
        imap.logout()
    finally:
        server.stop()


def test_import_maildir_tree_and_mbox_with_flags_and_dates(tmp_path):
    server = Server(tmp_path, EDITS)
    try:
        source = mailbox.Maildir(str(tmp_path / "source"), create=True)
        old = mailbox.MaildirMessage(b"Subject: old\n\nwritten long ago\n")
        old.set_flags("S")
        old.set_subdir("cur")
        key = source.add(old)
        forty_days_ago = time.time() - 40 * 86400
        os.utime(os.path.join(source._path, source._lookup(key)), (forty_days_ago, forty_days_ago))
        new = mailbox.MaildirMessage(b"Subject: new\n\nwritten today\n")
        new.set_flags("FR")
        new.set_subdir("cur")
        source.add(new)
        sub = source.add_folder("Lists.Rust")
        sub.add(mailbox.MaildirMessage(b"Subject: list mail\n\nfrom a list\n"))

        boxfile = tmp_path / "old.mbox"
        box = mailbox.mbox(str(boxfile))
        box.add(mailbox.mboxMessage(b"Subject: from mbox\n\nFrom here on, quoted\nend\n"))
        box.add(mailbox.mboxMessage(b"Subject: second\n\nsecond body\n"))
        box.flush()
        box.close()

        # An open session on INBOX hears of the import as of any other client's change.
        imap = imap_login(server, "bob@example.test", "bobpass")
        imap.select("INBOX")
        out = ok(server, "import", "bob@example.test", "--maildir", str(tmp_path / "source"))
        assert "INBOX: 2 messages imported" in out and "Lists/Rust: 1 messages imported" in out, out
        imap.noop()
        assert imap.untagged_responses.get("EXISTS")[-1] == b"2", imap.untagged_responses
        typ, data = imap.uid("FETCH", "1:*", "(FLAGS INTERNALDATE BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        parts = [p for p in data if isinstance(p, tuple)]
        assert [p[1].strip() for p in parts] == [b"Subject: old", b"Subject: new"], parts
        first, second = parts[0][0].decode(), parts[1][0].decode()
        # The old one keeps its \Seen and its date (the file's time, forty days back).
        assert "\\Seen" in first, first
        assert time.mktime(imaplib.Internaldate2tuple(parts[0][0])) < time.time() - 39 * 86400
        assert "\\Flagged" in second and "\\Answered" in second, second
        assert imap.select("Lists/Rust")[1] == [b"1"]

        ok(server, "import", "bob@example.test", "--mbox", str(boxfile), "--folder", "Old")
        assert imap.select("Old")[1] == [b"2"]
        typ, data = imap.fetch("1", "(BODY.PEEK[])")
        assert data[0][1] == b"Subject: from mbox\r\n\r\nFrom here on, quoted\r\nend\r\n", data

        # The forty-day-old message goes, today's stays.
        assert "1 messages removed" in ok(server, "expunge", "bob@example.test", "INBOX",
                                          "--older-than", "30d")
        assert imap.select("INBOX")[1] == [b"1"]
        bad = cli(server, "import", "bob@example.test", "--mbox", str(tmp_path / "source"))
        assert bad.returncode == 1, bad
        imap.logout()
    finally:
        server.stop()
