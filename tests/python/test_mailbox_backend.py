"""A mailbox backend that fails (traps, loops, answers nonsense) is contained: SMTP keeps the
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


@pytest.mark.parametrize("mode", ["trap", "loop", "liar"])
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
    m.logout()

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

    m = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=10)
    m.starttls(ssl_context=ctx)
    m.login(*ALICE)
    typ, data = m.select("INBOX")
    assert typ == "OK" and data == [b"1"], data
    typ, data = m.fetch("1", "(BODY.PEEK[TEXT])")
    assert data[0][1] == b"Still here.\r\n"
    m.logout()
