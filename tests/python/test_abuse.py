"""Abuse: what a hostile or broken peer can throw at the real binary. Each test asserts the
reply the server documents (README, "What a hostile client gets") and that a normal client is
served afterwards."""

import base64
import random
import re
import smtplib
import socket
import ssl
import threading
import time

import pytest

from test_smtp import MSG, raw_exchange, tls_context


def read_reply(sock, buf=b""):
    """Reads one whole SMTP reply (through its 'NNN ' line); returns (lines, rest)."""
    while True:
        m = re.search(rb"(?m)^\d{3} [^\r\n]*\r\n", buf)
        if m:
            head = buf[: m.end()]
            return head.decode(errors="replace").split("\r\n")[:-1], buf[m.end():]
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed; had {buf[-200:]!r}")
        buf += chunk


def read_until_closed(sock, timeout=30):
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def final_lines(data):
    return [l for l in data.decode(errors="replace").split("\r\n") if re.match(r"^\d{3} ", l)]


def still_serves(server, subject="after abuse"):
    """A normal client delivers a message to alice and it is stored."""
    before = len(server.maildir("alice"))
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
        s.ehlo("normal.client")
        s.sendmail("friend@remote.test", ["alice@example.test"],
                   MSG.replace(b"Subject: smtplib", b"Subject: " + subject.encode()))
    stored = server.wait_for_mail("alice", before + 1)
    assert any(subject.encode() in body for _, body in stored), stored


def test_slowloris_is_cut_off_at_the_command_timeout(make_server):
    # [limits] comes before [outbound], which has a command timeout of its own.
    server = make_server(transform=lambda text: re.sub(
        r"(?m)^command_timeout_secs = \d+$", "command_timeout_secs = 2", text, count=1))
    sockets = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=10)
        assert read_reply(s)[0][0].startswith("220 ")
        sockets.append(s)
    # One byte a second from every connection: each keeps sending, none finishes a line in time.
    started = time.time()
    closed = {}
    payload = b"EHLO slow.client.example\r\n"
    for i in range(len(payload)):
        for n, s in enumerate(sockets):
            if n in closed:
                continue
            try:
                s.sendall(payload[i:i + 1])
            except OSError:
                closed[n] = time.time() - started
        # A normal client is served while the slow ones hang on.
        if i == 1:
            still_serves(server, "during slowloris")
        time.sleep(1)
        if len(closed) == len(sockets):
            break
    for s in sockets:
        data = read_until_closed(s, timeout=10)
        assert final_lines(data)[-1].startswith("421 4.4.2"), data
        s.close()
    assert time.time() - started < 10, "slow clients held their sessions past the timeout"
    still_serves(server)


def test_a_ten_megabyte_line_is_refused_and_the_session_recovers(server):
    with socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=30) as s:
        read_reply(s)
        line = b"EHLO " + b"x" * (10 * 1024 * 1024) + b"\r\n"
        s.sendall(line + b"NOOP\r\n")
        reply, rest = read_reply(s)
        assert reply == ["500 5.5.2 Line too long"]
        reply, rest = read_reply(s, rest)
        assert reply[0].startswith("250 ")
        s.sendall(b"QUIT\r\n")
        assert read_reply(s, rest)[0][0].startswith("221 ")
    still_serves(server)


def test_ten_thousand_recipients(server):
    """RCPT past max_recipients (100) answers 452 4.5.3 (RFC 5321 §4.5.3.1.8); those count as
    errors, so the 20th ends the session with 421."""
    commands = b"EHLO many.rcpt\r\nMAIL FROM:<sender@remote.test>\r\n"
    commands += b"RCPT TO:<alice@example.test>\r\n" * 10000
    with socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=30) as s:
        read_reply(s)
        try:
            s.sendall(commands)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed after the 421; what it said is still readable
        lines = final_lines(read_until_closed(s))
    assert lines[0].startswith("250 ") and lines[1] == "250 2.1.0 Sender OK", lines[:3]
    rcpt = lines[2:]
    assert all(l.startswith("250 2.1.5") for l in rcpt[:100]), rcpt[:100]
    assert all(l.startswith("452 4.5.3") for l in rcpt[100:120]), rcpt[100:121]
    assert rcpt[120].startswith("421 4.7.0"), rcpt[120:]
    assert len(rcpt) == 121
    assert server.spooled() == []
    still_serves(server)


def test_pipelined_garbage_is_answered_then_disconnected(server):
    rng = random.Random(7)
    junk = b"".join(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))).replace(b"\n", b"") + b"\r\n"
                    for _ in range(200))
    with socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=30) as s:
        read_reply(s)
        try:
            s.sendall(junk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        lines = final_lines(read_until_closed(s))
    assert len(lines) == 21, lines
    assert all(l[0] == "5" for l in lines[:20]), lines
    assert lines[20] == "421 4.7.0 Too many errors, closing connection"
    still_serves(server)


def test_auth_brute_force_is_throttled_per_session_and_per_ip(server):
    """Three failures end a session (421 4.7.0); ten from one IP within the window make AUTH
    answer 454 4.7.0 even for the right password; mail without AUTH still flows."""
    port = server.ports["submissions"]
    ctx = tls_context(server)
    replies = []

    def session():
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            reply, rest = read_reply(s)
            s.sendall(b"EHLO brute\r\n")
            reply, rest = read_reply(s, rest)
            for attempt in range(5):
                token = base64.b64encode(f"\0alice@example.test\0guess{attempt}".encode())
                s.sendall(b"AUTH PLAIN " + token + b"\r\n")
                reply, rest = read_reply(s, rest)
                replies.append(reply[-1])
                if reply[-1][:3] in ("421", "454"):
                    break

    for _ in range(4):
        session()
    invalid = "535 5.7.8 Authentication credentials invalid"
    closing = "421 4.7.0 Too many failed authentications, closing connection"
    assert replies[:10] == [invalid, invalid, closing] * 3 + [invalid], replies
    assert replies[10].startswith("454 4.7.0 "), replies
    assert len(replies) == 11
    # The right password is refused while the IP is throttled.
    with smtplib.SMTP_SSL("127.0.0.1", port, context=ctx, timeout=10) as s:
        with pytest.raises(smtplib.SMTPAuthenticationError) as err:
            s.login("alice@example.test", "alicepass")
        assert err.value.smtp_code == 454
    still_serves(server)


def test_tls_handshake_garbage(server):
    rng = random.Random(11)
    # Implicit TLS listeners (SMTP, POP3, IMAP): garbage instead of a ClientHello.
    for name in ("submissions", "pop3s", "imaps"):
        for size in (1, 5, 300, 70000):
            with socket.create_connection(("127.0.0.1", server.ports[name]), timeout=10) as s:
                try:
                    s.sendall(bytes(rng.randrange(256) for _ in range(size)))
                except (BrokenPipeError, ConnectionResetError):
                    pass
                data = read_until_closed(s, timeout=10)
                # Nothing in the clear: at most a TLS alert record (content type 21).
                assert data == b"" or data[0] == 21, (name, data[:20])
    # STARTTLS accepted, then garbage.
    with socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=10) as s:
        reply, rest = read_reply(s)
        s.sendall(b"EHLO x\r\nSTARTTLS\r\n")
        reply, rest = read_reply(s, rest)
        reply, rest = read_reply(s, rest)
        assert reply == ["220 2.0.0 Ready to start TLS"]
        s.sendall(b"\x16\x03\x01\x00\x05hello" + b"\x00" * 50)
        data = read_until_closed(s, timeout=10)
        assert data == b"" or data[0] == 21
    # A real TLS client afterwards.
    with smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], context=tls_context(server), timeout=10) as s:
        s.login("alice@example.test", "alicepass")
        s.sendmail("alice@example.test", ["bob@example.test"], MSG)
    assert len(server.wait_for_mail("bob", 1)) == 1
    still_serves(server)


def test_connection_flood_beyond_the_limits(make_server):
    server = make_server(max_connections_per_ip=30, transform=lambda text: re.sub(
        r"(?m)^max_connections = \d+$", "max_connections = 40", text, count=1))
    held = []
    # Per IP: the 31st connection from 127.0.0.1 is refused, on every protocol.
    for _ in range(30):
        s = socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=10)
        assert read_reply(s)[0][0].startswith("220 ")
        held.append(s)
    for name, expected in (
        ("smtp", b"421 4.7.0 "),
        ("pop3", b"-ERR [SYS/TEMP] "),
        ("imap", b"* BYE [UNAVAILABLE] "),
    ):
        with socket.create_connection(("127.0.0.1", server.ports[name]), timeout=10) as s:
            data = read_until_closed(s, timeout=10)
            assert data.startswith(expected), (name, data)
    # In total: other loopback addresses fill the remaining 10, then even they are refused.
    for n in range(10):
        s = socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=10,
                                     source_address=(f"127.0.1.{n + 1}", 0))
        assert read_reply(s)[0][0].startswith("220 ")
        held.append(s)
    with socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=10,
                                  source_address=("127.0.2.1", 0)) as s:
        assert read_until_closed(s, timeout=10).startswith(b"421 4.7.0 ")
    # A burst of a thousand connect-and-drop attempts while full.
    def burst():
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=10) as s:
                    s.recv(100)
            except OSError:
                pass
    threads = [threading.Thread(target=burst) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in held:
        s.close()
    # The slots come back once the connections are gone.
    deadline = time.time() + 10
    while True:
        try:
            still_serves(server)
            break
        except (smtplib.SMTPException, ConnectionError):
            assert time.time() < deadline
            time.sleep(0.2)


NO_USER = "550 5.1.1"
DENIED = "550 5.7.1"
INVALID = "501 5.1.3"
NEEDS_UTF8 = "553 5.6.7"


@pytest.mark.parametrize(
    "rcpt, utf8, expected",
    [
        # The percent hack and bang paths name a local part, never a route.
        ("victim%remote.test@example.test", False, NO_USER),
        ('"victim%remote.test"@example.test', False, NO_USER),
        ("victim!remote.test@example.test", False, NO_USER),
        ("remote.test!victim@example.test", False, NO_USER),
        # Source routes (RFC 5321 §4.1.2: ignored; the mailbox decides).
        ("@example.test:victim@remote.test", False, DENIED),
        ("@example.test,@relay.test:victim@remote.test", False, DENIED),
        # Quoted local parts are local parts.
        ('"victim@remote.test"@example.test', False, NO_USER),
        # Address literals are not accepted at all.
        ("victim@[127.0.0.1]", False, INVALID),
        ("victim@[IPv6:::1]", False, INVALID),
        ("alice@[127.0.0.1]", False, INVALID),
        # Case, trailing dot, local domains as prefixes or suffixes of a remote one.
        ("victim@REMOTE.TEST", False, DENIED),
        ("victim@remote.test.", False, DENIED),
        ("victim@example.test.remote.test", False, DENIED),
        ("victim@localhost.remote.test", False, DENIED),
        ("postmaster@remote.test", False, DENIED),
        # Two at-signs.
        ("victim@remote.test@example.test", False, INVALID),
        ("victim@example.test@remote.test", False, INVALID),
        # Look-alike domains: without SMTPUTF8 refused as such, with it never folded into ours.
        ("victim@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.test", False, NEEDS_UTF8),
        ("victim@ex\u0430mple.test", False, NEEDS_UTF8),
        ("victim@example.test\u00a0", False, NEEDS_UTF8),
        ("victim@\uff45\uff58\uff41\uff4d\uff50\uff4c\uff45.test", True, DENIED),
        ("victim@ex\u0430mple.test", True, DENIED),
        ("victim@EXAMPLE.TEST\u0130", True, DENIED),
        ("v\u00edctim@remote.test", True, DENIED),
    ],
)
def test_open_relay_probes(server, rcpt, utf8, expected):
    with socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=10) as s:
        reply, rest = read_reply(s)
        mail = b"MAIL FROM:<spammer@remote.test>" + (b" SMTPUTF8" if utf8 else b"")
        s.sendall(b"EHLO prober\r\n" + mail + b"\r\n")
        reply, rest = read_reply(s, rest)
        reply, rest = read_reply(s, rest)
        assert reply == ["250 2.1.0 Sender OK"]
        s.sendall(b"RCPT TO:<" + rcpt.encode() + b">\r\n")
        reply, rest = read_reply(s, rest)
        assert reply[-1].startswith(expected + " "), (rcpt, reply)
        s.sendall(b"DATA\r\n")
        reply, rest = read_reply(s, rest)
        # 554 when RCPTs were tried and all refused (RFC 2920 §3.1); 503 when none parsed.
        assert reply[-1][:9] in ("554 5.5.1", "503 5.5.1"), reply
        s.sendall(b"QUIT\r\n")
    assert server.spooled() == []
    still_serves(server)
