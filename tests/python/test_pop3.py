"""POP3 end to end with Python's poplib, raw sockets, and fetchmail from Debian."""

import base64
import hashlib
import os
import poplib
import re
import shutil
import smtplib
import socket
import ssl
import subprocess

import pytest


@pytest.fixture(params=["maildir", "mailbox-log", "postgres"])
def backend(request):
    """Every test here runs on the embedded Maildir, on the shipped Wasm backend and on
    PostgreSQL."""
    return request.param


ALICE = ("alice@example.test", "alicepass")


def message(n, body=b"Hello Alice.\r\n"):
    return (
        b"From: Sender <sender@remote.test>\r\n"
        b"To: alice@example.test\r\n"
        b"Subject: pop3 test " + str(n).encode() + b"\r\n"
        b"Message-ID: <" + str(n).encode() + b"@remote.test>\r\n"
        b"\r\n" + body
    )


def deliver(server, messages, rcpt="alice@example.test"):
    """Sends messages over SMTP and waits until they are in the Maildir."""
    before = len(server.maildir(rcpt.split("@")[0]))
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
        for m in messages:
            assert s.sendmail("sender@remote.test", [rcpt], m) == {}
    stored = server.wait_for_mail(rcpt.split("@")[0], before + len(messages))
    assert len(stored) == before + len(messages)
    return stored


def crlf(stored):
    return stored.replace(b"\n", b"\r\n")


def stored_in_order(server, user="alice"):
    """Stored messages (CRLF form) in arrival order, which is POP3's numbering."""
    mail = server.maildir(user)
    mail.sort(key=lambda item: (int(item[0].split(".")[0]), item[0]))
    return [crlf(content) for _, content in mail]


def tls_context(server):
    return ssl.create_default_context(cafile=server.cert)


def login(server, user=ALICE):
    p = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)
    p.stls(context=tls_context(server))
    p.user(user[0])
    p.pass_(user[1])
    return p


def capa(p):
    return {k: v for k, v in p.capa().items()}


def test_stls_login_stat_list_uidl_top_retr_exact(server):
    sent = [message(1), message(2, b".dot line\r\n..two dots\r\nend\r\n"), message(3, b"".join(b"line %06d of a large message\r\n" % i for i in range(20_000)))]
    deliver(server, sent)
    expected = stored_in_order(server)
    for original, stored in zip(sent, expected):
        assert stored.endswith(original)
        assert stored.startswith(b"Return-Path: <sender@remote.test>\r\nDelivered-To: alice@example.test\r\nReceived: ")

    p = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)
    before = capa(p)
    assert "STLS" in before and "USER" not in before and "SASL" not in before
    assert "UIDL" in before and "TOP" in before and "PIPELINING" in before and "RESP-CODES" in before
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Plaintext authentication disallowed"):
        p.user(ALICE[0])
    p.stls(context=tls_context(server))
    after = capa(p)
    assert "STLS" not in after and "USER" in after and after["SASL"] == ["PLAIN", "LOGIN"]
    assert after["EXPIRE"] == ["NEVER"] and after["IMPLEMENTATION"] == ["Postern"]
    p.user(ALICE[0])
    assert p.pass_(ALICE[1]).startswith(b"+OK Logged in, 3 messages")

    sizes = [len(m) for m in expected]
    assert p.stat() == (3, sum(sizes))
    resp, listing, _ = p.list()
    assert resp.startswith(b"+OK")
    assert listing == [f"{i + 1} {size}".encode() for i, size in enumerate(sizes)]
    assert p.list(2) == f"+OK 2 {sizes[1]}".encode()

    resp, uidls, _ = p.uidl()
    uids = [line.split()[1].decode() for line in uidls]
    assert all(re.fullmatch(r"[0-9A-F]{16}", u) for u in uids) and len(set(uids)) == 3
    # The UIDL is the IMAP UID and UIDVALIDITY of the folder index (Dovecot's %08Xu%08Xv).
    validity, indexed = server.uid_index("alice")
    assert uids == [f"{uid:08X}{validity:08X}" for uid in indexed]

    resp, lines, octets = p.top(1, 0)
    header = expected[0].split(b"\r\n\r\n")[0]
    assert b"\r\n".join(lines) == header + b"\r\n"
    resp, lines, _ = p.top(2, 1)
    assert lines[-1] == b".dot line"  # poplib removes the stuffing we added

    for i, stored in enumerate(expected):
        resp, lines, octets = p.retr(i + 1)
        assert resp == f"+OK {sizes[i]} octets".encode()
        assert b"\r\n".join(lines) + b"\r\n" == stored
    with pytest.raises(poplib.error_proto, match="No such message"):
        p.retr(4)
    with pytest.raises(poplib.error_proto, match="No such message"):
        p.list(9)
    assert p.quit().startswith(b"+OK")

    # RETR marked the messages \Seen (moved to cur/ with the S flag), as Dovecot does.
    names = [name for name, _ in server.maildir("alice")]
    assert all(name.endswith(":2,S") for name in names), names

    # UIDLs are stable across sessions.
    p = login(server)
    assert [line.split()[1].decode() for line in p.uidl()[1]] == uids
    p.quit()


def test_dele_quit_removes_and_dropped_connection_keeps(server):
    deliver(server, [message(1), message(2), message(3)])
    p = login(server)
    uid_of_3 = p.uidl(3).split()[2]
    p.dele(1)
    with pytest.raises(poplib.error_proto, match="deleted"):
        p.retr(1)
    assert p.stat()[0] == 2
    p.rset()
    assert p.stat()[0] == 3
    p.dele(1)
    p.dele(2)
    # Drop the connection without QUIT: nothing is deleted (RFC 1939 §6).
    p.sock.close()
    p.file.close()
    p = login(server)
    assert p.stat()[0] == 3
    p.dele(1)
    p.dele(2)
    assert p.quit() == b"+OK Logging out (2 messages removed)"
    assert len(server.maildir("alice")) == 1
    p = login(server)
    assert p.stat()[0] == 1
    assert p.uidl(1).split()[2] == uid_of_3
    p.quit()


def test_second_session_gets_in_use(server):
    deliver(server, [message(1)])
    first = login(server)
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        login(server)
    first.quit()
    second = login(server)
    assert second.stat()[0] == 1
    second.quit()


def test_pop3s_and_sasl_plain_and_login(server):
    deliver(server, [message(1)])
    p = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=tls_context(server), timeout=10)
    token = base64.b64encode(b"\0alice@example.test\0alicepass").decode()
    assert p._shortcmd("AUTH PLAIN " + token).startswith(b"+OK Logged in, 1 messages")
    p.quit()

    p = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=tls_context(server), timeout=10)
    assert p._shortcmd("AUTH LOGIN") == b"+ VXNlcm5hbWU6"
    assert p._shortcmd(base64.b64encode(b"alice@example.test").decode()) == b"+ UGFzc3dvcmQ6"
    assert p._shortcmd(base64.b64encode(b"alicepass").decode()).startswith(b"+OK Logged in")
    p.quit()

    p = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=tls_context(server), timeout=10)
    assert p._shortcmd("AUTH PLAIN") == b"+ "
    with pytest.raises(poplib.error_proto, match="cancelled"):
        p._shortcmd("*")
    resp, mechanisms, _ = p._longcmd("AUTH")
    assert mechanisms == [b"PLAIN", b"LOGIN"]
    p.quit()


def test_apop_with_a_shared_secret(make_server):
    def with_secret(text):
        return re.sub(r'(?m)^(address = "alice@example.test"\npassword = .*)$', r'\1\napop_secret = "tanstaaf"', text)

    server = make_server(transform=with_secret)
    deliver(server, [message(1)])
    p = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)
    assert re.match(rb"\+OK Postern POP3 ready <\d+\.\d+\.\d+@localhost>$", p.getwelcome())
    assert p.apop("alice@example.test", "tanstaaf").startswith(b"+OK Logged in, 1 messages")
    p.quit()
    p = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        p.apop("alice@example.test", "wrong")
    p.quit()
    # Bob has no APOP secret: APOP cannot log him in even with his password.
    p = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        p.apop("bob@example.test", "bobpass")
    p.quit()


def test_no_apop_timestamp_without_secrets(server):
    p = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)
    assert p.getwelcome() == b"+OK Postern POP3 ready"
    with pytest.raises(poplib.error_proto, match="APOP is not available"):
        p._shortcmd("APOP alice@example.test " + hashlib.md5(b"x").hexdigest())
    p.quit()


def test_failed_logins_are_refused_then_disconnected(server):
    p = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)
    p.stls(context=tls_context(server))
    for _ in range(2):
        p.user("alice@example.test")
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Authentication failed"):
            p.pass_("guess")
    p.user("alice@example.test")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Too many failed logins"):
        p.pass_("guess")
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        p.noop()


def raw_pop3(server, payload, until, tls=True):
    """Logs in over STLS on a raw socket, sends payload in one write, reads until `until`."""
    sock = socket.create_connection(("127.0.0.1", server.ports["pop3"]), timeout=10)
    f = sock.makefile("rb")
    assert f.readline().startswith(b"+OK")
    sock.sendall(b"STLS\r\n")
    assert f.readline().startswith(b"+OK")
    s = tls_context(server).wrap_socket(sock, server_hostname="127.0.0.1")
    s.sendall(b"USER alice@example.test\r\nPASS alicepass\r\n" + payload)
    data = b""
    while not data.endswith(until):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return data


def test_pipelined_commands_and_garbage(server):
    deliver(server, [message(1), message(2)])
    data = raw_pop3(
        server,
        b"STAT\r\nLIST\r\nUIDL 2\r\nRETR 0\r\nFROB\r\n" + b"A" * 5000 + b"\r\nTOP 1 0\r\nNOOP\r\nQUIT\r\n",
        b"Logging out (0 messages removed)\r\n",
    )
    lines = data.split(b"\r\n")
    assert lines[0] == b"+OK Send your password"
    assert lines[1].startswith(b"+OK Logged in, 2 messages")
    assert re.match(rb"\+OK 2 \d+$", lines[2])
    text = data.decode("latin-1")
    assert "-ERR Invalid message number\r\n-ERR Unknown command\r\n-ERR Line too long\r\n+OK Top of message follows" in text
    assert text.endswith("+OK \r\n+OK Logging out (0 messages removed)\r\n")


def test_login_delay_and_expire_zero(make_server):
    server = make_server(
        login_delay_secs=3600,
        transform=lambda text: text.replace("# expire_days = 30", "expire_days = 0"),
    )
    deliver(server, [message(1), message(2)])
    p = login(server)
    caps = capa(p)
    assert caps["EXPIRE"] == ["0"] and caps["LOGIN-DELAY"] == ["3600"]
    p.retr(1)
    assert p.quit() == b"+OK Logging out (1 messages removed)"
    assert len(server.maildir("alice")) == 1
    with pytest.raises(poplib.error_proto, match=r"\[LOGIN-DELAY\]"):
        login(server)
    # Another user is not delayed by alice's login.
    p = login(server, ("bob@example.test", "bobpass"))
    assert p.stat() == (0, 0)
    p.quit()


def test_fetchmail_retrieves_over_stls_into_mbox(server, tmp_path):
    assert shutil.which("fetchmail"), "fetchmail is installed by scripts/setup"
    sent = [message(1), message(2, b".leading dot\r\nbody\r\n")]
    deliver(server, sent)
    expected = stored_in_order(server)
    mbox = tmp_path / "mbox"
    mda = tmp_path / "mda.sh"
    mda.write_text(f'#!/bin/sh\n{{ echo "From fetchmail  $(date)"; cat; echo; }} >> "{mbox}"\n')
    mda.chmod(0o755)
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        f'poll localhost service {server.ports["pop3"]} protocol POP3 uidl\n'
        f'  user "alice@example.test" password "alicepass"\n'
        f'  sslproto "tls1.2+" sslcertck sslcertfile "{server.cert}"\n'
        f'  mda "{mda}"\n'
    )
    rc.chmod(0o600)
    env = dict(os.environ, HOME=str(tmp_path), FETCHMAILHOME=str(tmp_path))
    result = subprocess.run(
        ["fetchmail", "-f", str(rc), "--nodetach", "--nosyslog", "-v"],
        env=env, capture_output=True, timeout=60,
    )
    log = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, log
    assert "STLS" in log, log
    assert "2 messages" in log, log
    content = mbox.read_bytes()
    assert content.count(b"From fetchmail") == 2
    for stored in expected:
        # fetchmail hands the MDA LF line ends and adds nothing but its own Received header.
        assert stored.replace(b"\r\n", b"\n").split(b"\n", 2)[2] in content
    assert b"\n.leading dot\nbody\n" in content
    # fetchmail deletes what it retrieved (no --keep): the maildrop is empty now.
    assert server.maildir("alice") == []
