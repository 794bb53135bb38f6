"""A mailbox backend that fails (traps, loops, sleeps, answers nonsense) is contained: SMTP keeps the
message queued, IMAP answers NO [UNAVAILABLE], POP3 -ERR [SYS/TEMP], the log names the backend
and the cause; once the backend's file is replaced by a working one it is reloaded without a
restart, and the queued message arrives."""

import imaplib
import os
import poplib
import shutil
import smtplib
import ssl
import time

import pytest

from conftest import MAILBOX_LOG, ROOT

TEST_MAILBOX = ROOT / "plugins" / "target" / "wasm32-wasip2" / "release" / "test_mailbox.wasm"
ALICE = ("alice@example.test", "alicepass")
MESSAGE = (
    b"From: Sender <sender@remote.test>\r\nTo: alice@example.test\r\n"
    b"Subject: held while the backend is broken\r\n\r\nStill here.\r\n"
)
# What the log says about each failure.
CAUSES = {
    "trap": "wasm trap",
    "loop": "ran past its deadline",
    "sleep": "ran past its deadline",
    "liar": "deliver answered 2 results for 1 deliveries",
}


def faulty(path, mode):
    def transform(text):
        return text + (
            '\n[[mailbox_backend]]\nname = "faulty"\n'
            f'path = "{path}"\ndomains = ["example.test"]\n'
            'timeout_ms = 300\ncapabilities = ["config"]\n'
            f'[mailbox_backend.config]\nmode = "{mode}"\n'
        )
    return transform


@pytest.mark.parametrize("mode", ["trap", "loop", "sleep", "liar"])
def test_a_failing_backend_is_contained_and_a_fixed_one_takes_over(make_server, tmp_path, mode):
    wasm = tmp_path / "backend.wasm"
    shutil.copy(TEST_MAILBOX, wasm)
    server = make_server(faulty(wasm, mode), retry_schedule='["1s"]')

    with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
        assert s.sendmail("sender@remote.test", ["alice@example.test"], MESSAGE) == {}
    # Delivery fails temporarily: the message stays in the spool.
    deadline = time.time() + 10
    while CAUSES[mode] not in server.log_text() and time.time() < deadline:
        time.sleep(0.05)
    log = server.log_text()
    assert "faulty" in log and CAUSES[mode] in log, log[-2000:]
    assert server.spooled(), "the message is kept queued"

    ctx = ssl.create_default_context(cafile=server.cert)
    m = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=10)
    m.starttls(ssl_context=ctx)
    m.login(*ALICE)
    typ, data = m.select("INBOX")
    assert typ == "NO" and data[0].startswith(b"[UNAVAILABLE]"), data
    # This session stays open across the reload below.
    kept = m

    p = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)
    p.stls(context=ctx)
    p.user(ALICE[0])
    with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\]"):
        p.pass_(ALICE[1])
    p.quit()

    # The backend is fixed: a working component replaces the file (write, then rename).
    fixed = tmp_path / "fixed.wasm"
    shutil.copy(MAILBOX_LOG, fixed)
    os.replace(fixed, wasm)
    deadline = time.time() + 20
    while server.spooled() and time.time() < deadline:
        time.sleep(0.1)
    assert not server.spooled(), "delivered after the reload"
    assert "mailbox backend reloaded" in server.log_text()
    # The session opened before the reload was not dropped, and now reads the fixed backend.
    typ, data = kept.select("INBOX")
    assert typ == "OK" and data == [b"1"], data
    kept.logout()

    m = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=10)
    m.starttls(ssl_context=ctx)
    m.login(*ALICE)
    typ, data = m.select("INBOX")
    assert typ == "OK" and data == [b"1"], data
    typ, data = m.fetch("1", "(BODY.PEEK[TEXT])")
    assert data[0][1] == b"Still here.\r\n"
    m.logout()


def backend_block(domains):
    return (
        '\n[[mailbox_backend]]\nname = "mailbox-log"\n'
        f'path = "{MAILBOX_LOG}"\ndomains = {domains}\n'
    )


def imap_view(server):
    """(UIDVALIDITY, [(UID, FLAGS, body)]) of alice's INBOX over IMAP."""
    ctx = ssl.create_default_context(cafile=server.cert)
    m = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=10)
    m.starttls(ssl_context=ctx)
    m.login(*ALICE)
    typ, _ = m.select("INBOX", readonly=True)
    assert typ == "OK"
    validity = int(m.untagged_responses["UIDVALIDITY"][0])
    typ, data = m.uid("FETCH", "1:*", "(FLAGS INTERNALDATE BODY.PEEK[])")
    view = [(item[0], item[1]) for item in data if isinstance(item, tuple)]
    m.logout()
    return validity, view


def test_migrate_maildir_to_the_backend_and_back(tmp_path):
    """`postern mailbox migrate` moves a Maildir into the mailbox-log backend and back; clients
    see the same UIDVALIDITY, UIDs, flags, keywords, dates and bytes on either side."""
    import subprocess
    from conftest import Server, postern_bin

    started = []

    def start(domains):
        # The same directory each time: same data, the config written anew.
        s = Server(tmp_path / "run", transform=lambda t: t + backend_block(domains))
        started.append(s)
        return s

    def migrate(config, src, dst):
        out = subprocess.run([postern_bin(), "mailbox", "migrate", "--config", str(config),
                              "--from", src, "--to", dst],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout

    try:
        server = start("[]")
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
            for n in range(3):
                s.sendmail("sender@remote.test", ["alice@example.test"],
                           MESSAGE.replace(b"Still here.", f"Message {n}.".encode()))
        deadline = time.time() + 10
        while len(server.maildir("alice")) < 3 and time.time() < deadline:
            time.sleep(0.05)
        m = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=10)
        m.starttls(ssl_context=ssl.create_default_context(cafile=server.cert))
        m.login(*ALICE)
        m.select("INBOX")
        assert m.store("1", "+FLAGS", "(\\Flagged $Work)")[0] == "OK"
        assert m.store("3", "+FLAGS", "(\\Seen)")[0] == "OK"
        m.create("Archive")
        m.subscribe("Archive")
        m.logout()
        before = imap_view(server)
        server.stop()
        out = migrate(server.config, "maildir", "mailbox-log")
        assert "migrated 2 mailboxes from maildir to mailbox-log" in out and ", 3 messages," in out, out

        server = start('["example.test"]')
        assert imap_view(server) == before, "same UIDVALIDITY, UIDs, flags, dates and bytes"
        m = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=10)
        m.starttls(ssl_context=ssl.create_default_context(cafile=server.cert))
        m.login(*ALICE)
        typ, data = m.lsub()
        assert any(b"Archive" in line for line in data), data
        m.logout()
        # While a server runs on the data directory, a migration refuses.
        running = subprocess.run([postern_bin(), "mailbox", "migrate", "--config", str(server.config),
                                  "--from", "mailbox-log", "--to", "maildir"],
                                 capture_output=True, text=True, timeout=60)
        assert running.returncode != 0 and "stop it first" in running.stderr, running.stderr
        # A message that arrives on the backend goes back to Maildir with the rest.
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
            s.sendmail("sender@remote.test", ["alice@example.test"], MESSAGE)
        deadline = time.time() + 10
        while len(imap_view(server)[1]) < 4 and time.time() < deadline:
            time.sleep(0.1)
        on_backend = imap_view(server)
        assert len(on_backend[1]) == 4
        server.stop()
        out = migrate(server.config, "mailbox-log", "maildir")
        assert ", 4 messages," in out, out

        server = start("[]")
        assert imap_view(server) == on_backend, "and back, the fourth message with its UID"
        server.stop()
    finally:
        for s in started:
            s.stop()
