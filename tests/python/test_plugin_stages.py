"""The stages of WIT 0.2.0, driven with real clients: the `login` hook sees every login that
passed, over SMTP AUTH, IMAP and POP3, and may refuse it."""

import imaplib
import poplib
import smtplib
import ssl
import time

import pytest

from conftest import ROOT, Server

TEST_HOOKS = ROOT / "plugins" / "target" / "wasm32-wasip2" / "release" / "test_hooks.wasm"


def with_hooks(**config):
    """The test-hooks plugin (a 0.2.0 component) with these stage actions."""
    lines = "".join(f'{key} = "{value}"\n' for key, value in config.items())

    def transform(text):
        return (text + f'\n[[plugin]]\nname = "hooks"\npath = "{TEST_HOOKS}"\n'
                'capabilities = ["config", "kv", "dns"]\n[plugin.config]\n' + lines)
    return transform


def tls(server):
    context = ssl.create_default_context(cafile=server.cert)
    context.check_hostname = False
    return context


def imap_login(server, user, password):
    with imaplib.IMAP4("127.0.0.1", server.ports["imap"]) as imap:
        imap.starttls(tls(server))
        try:
            imap.login(user, password)
        except imaplib.IMAP4.error as err:
            return str(err)
        imap.logout()
        return "OK"


def pop3_login(server, user, password):
    pop = poplib.POP3("127.0.0.1", server.ports["pop3"])
    pop.stls(tls(server))
    pop.user(user)
    try:
        pop.pass_(password)
    except poplib.error_proto as err:
        return err.args[0].decode()
    pop.quit()
    return "OK"


def smtp_login(server, user, password):
    with smtplib.SMTP("127.0.0.1", server.ports["submission"]) as s:
        s.starttls(context=tls(server))
        try:
            s.login(user, password)
        except smtplib.SMTPAuthenticationError as err:
            return f"{err.smtp_code} {err.smtp_error.decode()}"
        return "OK"


@pytest.fixture
def refusing_imap(tmp_path):
    server = Server(tmp_path, transform=with_hooks(**{
        "login-imap": "reject:550:5.7.1:IMAP is closed for maintenance"}))
    yield server
    server.stop()


def test_a_login_hook_refuses_an_imap_login_and_lets_pop3_and_smtp_in(refusing_imap):
    server = refusing_imap
    assert imap_login(server, "alice@example.test", "alicepass") == \
        "b'[AUTHENTICATIONFAILED] IMAP is closed for maintenance'"
    assert pop3_login(server, "alice@example.test", "alicepass") == "OK"
    assert smtp_login(server, "alice@example.test", "alicepass") == "OK"
    # A wrong password never reaches the plugin: the usual refusal.
    assert "Authentication failed" in imap_login(server, "alice@example.test", "wrong")
    log = server.log_text()
    assert "login refused by plugin" in log


def test_a_login_hook_refuses_one_user_over_every_protocol(tmp_path):
    server = Server(tmp_path, transform=with_hooks(login="reject-user:bob@example.test"))
    try:
        assert imap_login(server, "bob@example.test", "bobpass") == \
            "b'[AUTHENTICATIONFAILED] bob@example.test may not log in now'"
        assert pop3_login(server, "bob@example.test", "bobpass") == \
            "-ERR [AUTH] bob@example.test may not log in now"
        assert smtp_login(server, "bob@example.test", "bobpass") == \
            "550 5.7.1 bob@example.test may not log in now"
        assert imap_login(server, "alice@example.test", "alicepass") == "OK"
        assert pop3_login(server, "alice@example.test", "alicepass") == "OK"
        assert smtp_login(server, "alice@example.test", "alicepass") == "OK"
    finally:
        server.stop()


def test_a_temporary_refusal_says_unavailable_and_a_disconnect_closes(tmp_path):
    server = Server(tmp_path, transform=with_hooks(**{
        "login-imap": "tempfail:451:4.7.0:try again soon",
        "login-pop3": "disconnect:421:4.7.0:go away"}))
    try:
        assert imap_login(server, "alice@example.test", "alicepass") == \
            "b'[UNAVAILABLE] try again soon'"
        pop = poplib.POP3("127.0.0.1", server.ports["pop3"])
        pop.stls(tls(server))
        pop.user("alice@example.test")
        with pytest.raises(poplib.error_proto) as refused:
            pop.pass_("alicepass")
        assert refused.value.args[0] == b"-ERR [SYS/TEMP] go away"
        # The server closed the connection after the refusal.
        with pytest.raises((poplib.error_proto, OSError, EOFError)):
            pop.stat()
    finally:
        server.stop()


def events_logged(server, count, timeout=10):
    """The mailbox-event lines test-hooks printed, once there are `count` of them."""
    deadline = time.time() + timeout
    while True:
        # The log adds the plugin's name and stream after the line.
        lines = [line.split("mailbox-event ", 1)[1].split(" plugin=hooks")[0].strip()
                 for line in server.log_text().splitlines() if "mailbox-event " in line]
        if len(lines) >= count or time.time() > deadline:
            return lines
        time.sleep(0.05)


def test_mailbox_events_tell_appends_copies_moves_and_flag_changes(tmp_path):
    server = Server(tmp_path, transform=with_hooks())
    try:
        with imaplib.IMAP4("127.0.0.1", server.ports["imap"]) as imap:
            imap.starttls(tls(server))
            imap.login("alice@example.test", "alicepass")
            message = b"From: a@remote.test\r\nSubject: cheap pills\r\n\r\nbuy now\r\n"
            assert imap.append("INBOX", r"(\Seen)", None, message)[0] == "OK"
            imap.select("INBOX")
            assert imap.uid("COPY", "1", "Archive")[0] == "OK"
            assert imap.uid("STORE", "1", "+FLAGS", r"(\Flagged)")[0] == "OK"
            assert imap.uid("MOVE", "1", "Junk")[0] == "OK"
            imap.logout()
        lines = events_logged(server, 4)
        user = "user=alice@example.test"
        assert lines == [
            rf"appended - -> INBOX (none) [\Seen] subject=cheap pills {user}",
            rf"copied INBOX -> Archive (\Archive) [\Seen] subject=cheap pills {user}",
            rf"flags-changed - -> INBOX (none) [\Seen \Flagged] subject=cheap pills {user}",
            rf"moved INBOX -> Junk (\Junk) [\Seen \Flagged] subject=cheap pills {user}",
        ], lines
    finally:
        server.stop()


def test_deliveries_and_pop3_raise_no_mailbox_event(tmp_path):
    server = Server(tmp_path, transform=with_hooks())
    try:
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
            s.sendmail("a@remote.test", ["alice@example.test"], b"Subject: delivered\r\n\r\nhi\r\n")
        server.wait_for_mail("alice", 1)
        pop = poplib.POP3("127.0.0.1", server.ports["pop3"])
        pop.stls(tls(server))
        pop.user("alice@example.test")
        pop.pass_("alicepass")
        pop.retr(1)
        pop.dele(1)
        pop.quit()
        assert events_logged(server, 1, timeout=1) == []
    finally:
        server.stop()


SPAM_FILTER = ROOT / "plugins" / "target" / "wasm32-wasip2" / "release" / "spam_filter.wasm"


def spam_score(server, count):
    """X-Spam-Score of bob's `count`-th message (its X-Probe field says which it is)."""
    mail = server.wait_for_mail("bob", count)
    assert len(mail) >= count, "not delivered"
    for _, body in mail:
        if f"X-Probe: {count}\n".encode() in body:
            for line in body.split(b"\n"):
                if line.startswith(b"X-Spam-Score:"):
                    return float(line.split(b":", 1)[1])
            raise AssertionError(f"no X-Spam-Score in {body[:300]!r}")
    raise AssertionError(f"no probe {count}")


def test_moving_mail_into_and_out_of_junk_trains_the_spam_filter(tmp_path):
    def transform(text):
        return (text + f'\n[[plugin]]\nname = "spam-filter"\npath = "{SPAM_FILTER}"\n'
                'capabilities = ["config", "log", "dns", "kv"]\ntimeout_ms = 3000\n'
                '[plugin.config]\nquarantine_at = 100.0\nreject_at = 200.0\nbayes_weight = 10.0\n')
    server = Server(tmp_path, transform=transform)
    spam = b"From: a@remote.test\r\nSubject: cheap pills discount\r\n\r\nbuy cheap pills now, discount offer, limited pills\r\n"
    ham = b"From: c@remote.test\r\nSubject: meeting notes\r\n\r\nthe meeting is tomorrow at noon, agenda attached\r\n"

    def probe(subject, text, n):
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
            s.sendmail("x@remote.test", ["bob@example.test"],
                       f"From: x@remote.test\r\nX-Probe: {n}\r\nSubject: {subject}\r\n\r\n"
                       f"{text}\r\n".encode())
        return spam_score(server, n)
    try:
        # Untrained (no model configured): the classifier has nothing to say.
        assert probe("cheap pills", "discount pills now", 1) == 0.0
        with imaplib.IMAP4("127.0.0.1", server.ports["imap"]) as imap:
            imap.starttls(tls(server))
            imap.login("alice@example.test", "alicepass")
            assert imap.append("INBOX", None, None, spam)[0] == "OK"
            assert imap.append("Junk", None, None, ham)[0] == "OK"
            imap.select("INBOX")
            assert imap.uid("MOVE", "1", "Junk")[0] == "OK"     # learned as spam
            imap.select("Junk")
            typ, data = imap.uid("SEARCH", "SUBJECT", "meeting")
            assert imap.uid("MOVE", data[0].decode(), "INBOX")[0] == "OK"  # learned as ham
            imap.logout()
        # Lessons are learned after the OK, off the session: wait for both.
        deadline = time.time() + 10
        while server.log_text().count("learned a message of alice@example.test") < 2:
            assert time.time() < deadline, "no lessons learned"
            time.sleep(0.05)
        # The next similar messages score accordingly (each SMTP session reads the lessons).
        assert probe("cheap pills", "discount pills now", 2) > 5.0
        assert probe("meeting tomorrow", "agenda for the meeting at noon", 3) < -5.0
    finally:
        server.stop()
