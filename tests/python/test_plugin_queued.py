"""The after-queue filter (WIT 0.2.0 `queued`), driven with smtplib against the real binary: a
slow filter runs after the 250, on the spooled message, and decides what is delivered."""

import email
import json
import smtplib
import time

import pytest

from conftest import ROOT, Server

TEST_HOOKS = ROOT / "plugins" / "target" / "wasm32-wasip2" / "release" / "test_hooks.wasm"


def with_filter(plugins="", **config):
    """The test-hooks plugin with these stage actions (lists become TOML arrays), and `plugins`
    as the `[plugins]` table's lines."""
    lines = "".join(f"{key} = {json.dumps(value)}\n" for key, value in config.items())

    def transform(text):
        return (text + f"\n[plugins]\n{plugins}\n"
                f'[[plugin]]\nname = "hooks"\npath = "{TEST_HOOKS}"\n'
                'capabilities = ["config", "kv", "dns"]\n[plugin.config]\n' + lines)
    return transform


def send(server, subject, sender="sender@remote.test", rcpts=("alice@example.test",)):
    """Sends a message; returns the seconds until the 250."""
    body = (f"From: <{sender or 'mailer-daemon@remote.test'}>\r\nTo: <{rcpts[0]}>\r\n"
            f"Subject: {subject}\r\n\r\nhello\r\n")
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
        s.sendmail(sender, list(rcpts), body)
    return time.monotonic() - started


def eventually(check, seconds=20):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def only(messages):
    assert len(messages) == 1, messages
    return email.message_from_bytes(messages[0][1])


@pytest.fixture
def make(tmp_path):
    servers = []

    def start(where="server", plugins="", **config):
        """A server with its data under tmp_path/WHERE (the same WHERE: a restart)."""
        server = Server(tmp_path / where, transform=with_filter(plugins, **config))
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.stop()


def test_a_slow_filter_runs_after_the_250_and_its_change_is_delivered(make):
    server = make(**{"queued": "sleep:3000:continue",
                     "queued-modifications": ["add-header:X-Filtered:yes"]})
    waited = send(server, "slow one")
    # The 250 came while the filter was still asleep: nothing is delivered yet.
    assert server.maildir("alice") == []
    assert waited < 2.5, waited
    assert eventually(lambda: server.maildir("alice"))
    stored = only(server.maildir("alice"))
    assert stored["X-Filtered"] == "yes"
    assert stored["Subject"] == "slow one"
    assert stored.get_all("Received")[0].startswith("from ")
    log = server.log_text()
    assert "message changed by the after-queue filter" in log
    assert eventually(lambda: server.spooled() == [])


def test_quarantine_discard_and_bounce(make):
    server = make(**{"queued": "quarantine:looks odd", "queued-only-subject": "odd"})
    send(server, "an odd one")
    send(server, "a plain one")
    assert eventually(lambda: server.maildir("alice", folder="Quarantine")
                      and server.maildir("alice"))
    assert only(server.maildir("alice", folder="Quarantine"))["X-Postern-Quarantine"] == "looks odd"
    assert only(server.maildir("alice"))["Subject"] == "a plain one"
    server.stop()

    server = make("discard", **{"queued": "discard:virus found", "queued-only-subject": "EICAR"})
    send(server, "EICAR test")
    send(server, "after it")
    assert eventually(lambda: server.maildir("alice"))
    assert eventually(lambda: "message discarded by the after-queue filter: virus found"
                      in server.log_text())
    assert eventually(lambda: server.spooled() == [])
    assert only(server.maildir("alice"))["Subject"] == "after it"
    server.stop()

    # A bounce goes back to the sender as an RFC 3464 report; the recipient gets nothing. The
    # report itself passes the filter (its subject does not match).
    server = make("bounce", **{"queued": "bounce:attachment type refused", "queued-only-subject": "EICAR"})
    send(server, "EICAR again", sender="bob@example.test")
    assert eventually(lambda: server.maildir("bob"))
    report = only(server.maildir("bob"))
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    text = status.as_string()
    assert "Status: 5.7.1" in text, text
    assert "Final-Recipient: rfc822; alice@example.test" in text, text
    assert "attachment type refused" in text, text
    assert server.maildir("alice") == []
    assert eventually(lambda: server.spooled() == [])


def test_a_deferred_message_is_filtered_again_until_the_filter_takes_it(make):
    server = make(plugins="queued_retry_secs = 1",
                  **{"queued": "defer-until:3",
                     "queued-modifications": ["add-header:X-Scanned:third try"]})
    send(server, "scan me")
    assert eventually(lambda: server.maildir("alice"))
    stored = only(server.maildir("alice"))
    assert stored.get_all("X-Scanned") == ["third try"]
    log = server.log_text()
    assert log.count("after-queue filter deferred the message: try") == 2, log


def test_a_crash_while_filtering_loses_nothing_and_delivers_once(make):
    server = make(**{"queued": "sleep:60000:continue"})
    send(server, "survive me")
    assert len(server.spooled()) == 1
    time.sleep(0.5)  # the filter is asleep by now
    server.stop()  # kill -9, the filter asleep
    server = make(**{"queued": "continue", "queued-modifications": ["add-header:X-Filtered:after restart"]})
    assert eventually(lambda: server.maildir("alice"))
    time.sleep(0.5)
    stored = only(server.maildir("alice"))
    assert stored["Subject"] == "survive me"
    assert stored.get_all("X-Filtered") == ["after restart"]
    assert eventually(lambda: server.spooled() == [])
    server.stop()
    # Once more from the same spool: nothing comes back.
    server = make(**{"queued": "continue"})
    time.sleep(1)
    assert len(server.maildir("alice")) == 1
