"""The stages of WIT 0.2.0, driven with real clients: the `login` hook sees every login that
passed, over SMTP AUTH, IMAP and POP3, and may refuse it."""

import imaplib
import poplib
import smtplib
import ssl

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
