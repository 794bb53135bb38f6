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


# --- Resources a client can pin, and what an authenticated user may do (issue 15) ---

ALICE_LOGIN = ("alice@example.test", "alicepass")


def rss_kib(server):
    for line in open(f"/proc/{server.proc.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def imap_line(sock, buf=b""):
    """Reads one IMAP response line; returns (line, rest)."""
    while b"\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed; had {buf[-200:]!r}")
        buf += chunk
    line, rest = buf.split(b"\r\n", 1)
    return line.decode(errors="replace"), rest


def imap_tagged(sock, tag, buf=b""):
    """Reads lines until the one tagged `tag`; returns (untagged lines, tagged line, rest)."""
    lines = []
    while True:
        line, buf = imap_line(sock, buf)
        if line.startswith(tag + " "):
            return lines, line, buf
        lines.append(line)


def test_imap_literals_before_login_are_a_few_kib_at_most(make_server):
    """A client that has not logged in gets no continuation for a big literal (NO [TOOBIG] at
    once), a LITERAL+ one is read and dropped as it arrives, and a thousand such connections
    pin only a few MB."""
    server = make_server(
        transform=lambda text: re.sub(r"(?m)^max_connections = \d+$", "max_connections = 2000",
                                      text, count=1),
        max_connections_per_ip=2000)
    s = socket.create_connection(("127.0.0.1", server.ports["imap"]), timeout=10)
    greeting, rest = imap_line(s)
    assert greeting.startswith("* OK"), greeting
    s.sendall(b"a LOGIN {52428800}\r\n")
    lines, tagged, rest = imap_tagged(s, "a", rest)
    assert lines == [] and tagged.startswith("a NO [TOOBIG]"), (lines, tagged)
    # LITERAL+ past the limit: the client sends it anyway; it is dropped, the session goes on.
    s.sendall(b"b LOGIN {9000+}\r\n" + b"x" * 9000 + b" pass\r\nc NOOP\r\n")
    lines, tagged, rest = imap_tagged(s, "b", rest)
    assert tagged.startswith("b NO [TOOBIG]"), tagged
    lines, tagged, rest = imap_tagged(s, "c", rest)
    assert tagged.startswith("c OK"), tagged
    s.close()

    before = rss_kib(server)
    held = []
    # A thousand, or as many as the descriptor limit leaves room for (each needs one here and
    # one in the server).
    import resource
    count = min(1000, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 150)
    for n in range(count):
        c = socket.create_connection(("127.0.0.1", server.ports["imap"]), timeout=30)
        # Each announces 50 MiB of LITERAL+ and sends the first 64 KiB of it.
        c.sendall(b"x%d LOGIN {52428800+}\r\n" % n + b"y" * 65536)
        held.append(c)
    # Every connection was answered (read to the tagged NO) and is still open, still sending.
    for n, c in enumerate(held):
        line, rest = imap_line(c)
        while not line.startswith(f"x{n} "):
            line, rest = imap_line(c, rest)
        assert line.startswith(f"x{n} NO [TOOBIG]"), line
        c.sendall(b"y" * 65536)
    time.sleep(0.5)
    grown = rss_kib(server) - before
    print(f"\nRSS grown by {count} unauthenticated IMAP connections sending literals: {grown} KiB")
    assert count >= 500, f"only {count} descriptors"
    assert grown < 64 * count, f"{grown} KiB for {count} connections"
    for c in held:
        c.close()
    still_serves(server)


def test_list_patterns_cost_linear_time_and_are_capped(server):
    """2,000 wildcards took a backtracking matcher forever and stopped the server; now a long
    pattern is refused at once and a 1,000-wildcard one is answered in linear time, while SMTP
    goes on."""
    import imaplib
    m = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=30)
    m.starttls(ssl_context=ssl.create_default_context(cafile=server.cert))
    m.login(*ALICE_LOGIN)
    for name in ("Work", "Work/2026", "Lists/rust"):
        m.create(name)
    started = time.time()
    typ, data = m._simple_command("LIST", '""', '"' + "*" * 2000 + '"')
    assert typ == "NO" and b"[LIMIT]" in data[0], (typ, data)
    typ, data = m.list('""', '"' + "*%" * 500 + 'x"')
    assert typ == "OK" and data == [None], (typ, data)
    typ, data = m.list('""', '"' + "*" * 999 + '6"')
    assert typ == "OK" and data == [b'(\\HasNoChildren) "/" Work/2026'], (typ, data)
    elapsed = time.time() - started
    print(f"\nLIST with 1,000 and 2,000-character patterns: {elapsed * 1000:.0f} ms")
    still_serves(server)
    m.logout()


def test_parallel_auth_from_one_address_gets_no_more_checks_than_the_limit(server):
    """30 connections from one address guessing at once: at most max_auth_failures_per_ip (10)
    passwords are checked, the rest are told 454 4.7.0 without a check."""
    port = server.ports["submissions"]
    ctx = tls_context(server)
    socks = []
    for _ in range(30):
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        s = ctx.wrap_socket(raw, server_hostname="localhost")
        read_reply(s)
        s.sendall(b"EHLO flood\r\n")
        read_reply(s)
        socks.append(s)
    token = base64.b64encode(b"\0alice@example.test\0wrong")
    for s in socks:
        s.sendall(b"AUTH PLAIN " + token + b"\r\n")
    codes = [read_reply(s)[0][-1][:3] for s in socks]
    assert codes.count("535") <= 10, codes
    assert codes.count("535") + codes.count("454") == 30, codes
    for s in socks:
        s.close()
    still_serves(server)


def test_an_auth_flood_from_many_addresses_keeps_memory_bounded_and_mail_flowing(make_server):
    """Wrong passwords from 30 addresses at once, over and over: password checks run a core at
    a time, so RSS stays bounded (each argon2 check takes 19 MiB) and mail is still accepted."""
    server = make_server(max_auth_failures_per_ip=1000000)
    port = server.ports["submissions"]
    ctx = tls_context(server)
    stop = time.time() + 6
    errors = []

    def flood(n):
        try:
            while time.time() < stop:
                raw = socket.socket()
                raw.bind((f"127.0.0.{10 + n}", 0))
                raw.settimeout(30)
                raw.connect(("127.0.0.1", port))
                with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                    read_reply(s)
                    s.sendall(b"EHLO flood\r\n")
                    read_reply(s)
                    token = base64.b64encode(f"\0user{n}@example.test\0wrong".encode())
                    for _ in range(3):
                        s.sendall(b"AUTH PLAIN " + token + b"\r\n")
                        if read_reply(s)[0][-1][:3] != "535":
                            break
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(repr(err))

    threads = [threading.Thread(target=flood, args=(n,)) for n in range(30)]
    baseline = rss_kib(server)
    for t in threads:
        t.start()
    peak = 0
    delivered = 0
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss_kib(server))
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=20) as s:
            s.sendmail("friend@remote.test", ["alice@example.test"], MSG)
            delivered += 1
        time.sleep(0.1)
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    print(f"\nAUTH flood from 30 addresses: RSS {baseline // 1024} MiB before, peak {peak // 1024} MiB,"
          f" {delivered} messages accepted meanwhile")
    assert delivered >= 10
    # Password checks hold at most one argon2 working memory (19 MiB) per core.
    assert peak - baseline < 100 * 1024, f"RSS {baseline} KiB before, peak {peak} KiB"


def test_duplicate_recipients_are_stored_once(server):
    """RCPT TO the same mailbox fifty times, in other cases, and through an alias: every RCPT
    gets 250, and the message is stored once."""
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
        s.ehlo("dup.client")
        s.mail("friend@remote.test")
        rcpts = ["alice@example.test"] * 50 + ["ALICE@Example.TEST", "postmaster@example.test"]
        for rcpt in rcpts:
            code, _ = s.rcpt(rcpt)
            assert code == 250, rcpt
        code, _ = s.data(MSG.replace(b"Subject: smtplib", b"Subject: dup"))
        assert code == 250
    mail = server.wait_for_mail("alice", 1)
    time.sleep(0.5)
    mail = server.maildir("alice")
    assert len(mail) == 1, [name for name, _ in mail]


def test_bare_cr_in_data_is_normalized(server):
    """A CR without LF inside DATA (<CR>.<CR> included) becomes a line end: nothing that a next
    hop could read as the end of data is stored or relayed."""
    payload = (b"EHLO cr.client\r\nMAIL FROM:<friend@remote.test>\r\n"
               b"RCPT TO:<alice@example.test>\r\nDATA\r\n")
    body = (b"Subject: bare cr\r\n\r\nfirst\r.\rMAIL FROM:<evil@remote.test>\rlast\r\n.\r\n"
            b"QUIT\r\n")
    lines = raw_exchange(server.ports["smtp"], payload + body, 6)
    assert lines[-2].startswith("250 2.0.0"), lines
    (_, stored), = server.wait_for_mail("alice", 1)
    assert b"\r" not in stored, stored
    assert b"first\n.\nMAIL FROM:<evil@remote.test>\nlast\n" in stored, stored


def test_an_authenticated_sender_uses_only_its_own_addresses_on_port_25(server):
    """AUTH on the port-25 listener is no way around the sender rule; the Received field of
    authenticated mail names the user."""
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
        s.starttls(context=tls_context(server))
        s.login("bob@example.test", "bobpass")
        code, text = s.mail("alice@example.test")
        assert (code, text[:5]) == (553, b"5.7.1"), (code, text)
        s.rset()
        assert s.mail("bob@example.test")[0] == 250
        assert s.rcpt("alice@example.test")[0] == 250
        assert s.data(MSG.replace(b"Subject: smtplib", b"Subject: from bob"))[0] == 250
    (_, stored), = server.wait_for_mail("alice", 1)
    assert b"(Authenticated sender: bob@example.test)" in stored, stored


def test_forged_authentication_results_are_removed_with_checks_off(server):
    """Origin checks are off in these tests: results claiming our authserv-id still go, other
    hosts' stay."""
    msg = (b"Authentication-Results: localhost; dkim=pass header.d=bank.test\r\n"
           b"Authentication-Results: mx.other.test; spf=pass\r\n" + MSG)
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
        s.sendmail("friend@remote.test", ["alice@example.test"], msg)
    (_, stored), = server.wait_for_mail("alice", 1)
    assert b"localhost; dkim=pass" not in stored, stored
    assert b"Authentication-Results: mx.other.test; spf=pass" in stored, stored


def test_a_second_server_on_the_same_data_directory_is_refused(server):
    """Two servers would deliver one spool twice: the second exits, naming the first's pid."""
    from conftest import postern_bin
    import subprocess
    out = subprocess.run([postern_bin(), "serve", "--config", str(server.config)],
                         capture_output=True, timeout=30)
    assert out.returncode != 0
    text = (out.stdout + out.stderr).decode()
    assert "in use by another postern" in text and f"pid {server.proc.pid}" in text, text
    still_serves(server)


def test_sigterm_stops_the_server_within_the_grace_period(make_server):
    """Sessions that stay open (IMAP IDLE, an SMTP session mid-DATA) cannot keep the server
    running past shutdown_grace_secs."""
    import signal
    server = make_server(shutdown_grace_secs=2)
    smtp = socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=10)
    read_reply(smtp)
    smtp.sendall(b"EHLO x\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
                 b"DATA\r\npart of a message\r\n")
    imap = socket.create_connection(("127.0.0.1", server.ports["imap"]), timeout=10)
    imap_line(imap)
    started = time.time()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=20)
    assert time.time() - started < 2 + 4, time.time() - started
    smtp.close()
    imap.close()


def test_a_restart_never_brings_back_a_local_copy_the_user_deleted(tmp_path):
    """A message with a local and a remote recipient stays spooled while the remote one waits.
    The local copy is recorded as delivered when it is stored: after the user deleted it (POP3,
    which also drops it from the UID index) and a kill -9 and restart, it is not delivered again."""
    import poplib
    from conftest import Server
    server = Server(tmp_path / "node")
    with smtplib.SMTP("127.0.0.1", server.ports["submission"], timeout=10) as s:
        s.starttls(context=tls_context(server))
        s.login("bob@example.test", "bobpass")
        s.sendmail("bob@example.test", ["alice@example.test", "friend@elsewhere.test"],
                   MSG.replace(b"Subject: smtplib", b"Subject: keep deleted"))
    assert len(server.wait_for_mail("alice", 1)) == 1
    assert len(server.spooled()) == 1, "the remote recipient is still pending"
    pop = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=10)
    pop.stls(context=tls_context(server))
    pop.user("alice@example.test")
    pop.pass_("alicepass")
    pop.dele(1)
    pop.quit()
    assert server.maildir("alice") == []
    server.stop()  # kill -9
    server = Server(tmp_path / "node")
    try:
        time.sleep(2)
        assert len(server.spooled()) == 1, "still waiting for the remote recipient"
        assert server.maildir("alice") == [], "the deleted copy came back"
        still_serves(server)
    finally:
        server.stop()


def test_long_sequence_sets_cost_their_size_not_its_product_with_the_folder(server):
    """A 50 KB sequence set of 7,000 overlapping ranges (a command line may have 64 KiB), in
    FETCH, STORE and SEARCH, over a folder of 300 messages: answered at once, and the server
    goes on serving."""
    import imaplib
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as s:
        for n in range(300):
            s.sendmail("friend@remote.test", ["alice@example.test"],
                       MSG.replace(b"Subject: smtplib", b"Subject: n%d" % n))
    assert len(server.wait_for_mail("alice", 300)) == 300
    m = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=30)
    m.starttls(ssl_context=ssl.create_default_context(cafile=server.cert))
    m.login(*ALICE_LOGIN)
    m.select("INBOX")
    ranges = ",".join(f"{n % 290 + 1}:{n % 290 + 11}" for n in range(7000))
    assert 50000 < len(ranges) < 64000, len(ranges)
    started = time.time()
    typ, data = m.fetch(ranges, "(FLAGS)")
    assert typ == "OK" and len(data) == 300, (typ, len(data))
    typ, data = m.uid("STORE", ranges, "+FLAGS", "(\\Flagged)")
    assert typ == "OK"
    typ, data = m.search(None, ranges)
    assert typ == "OK" and len(data[0].split()) == 300
    elapsed = time.time() - started
    print(f"\nFETCH, STORE and SEARCH over a 7,000-range set: {elapsed * 1000:.0f} ms")
    m.logout()
    still_serves(server)


def test_literals_past_the_memory_budget_get_no_limit_after_login(make_server):
    """After login literals take their memory from the budget SMTP bodies use: one that does
    not fit is refused with NO [LIMIT] before the client sends it, and the session goes on."""
    import imaplib
    server = make_server(max_message_size=1048576, body_memory_budget=1048576)
    m = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=30)
    m.starttls(ssl_context=ssl.create_default_context(cafile=server.cert))
    m.login(*ALICE_LOGIN)
    tag = m._new_tag().decode()
    m.send(f"{tag} APPEND INBOX {{2000000}}\r\n".encode())
    line = m.readline()
    assert line.startswith(f"{tag} NO [LIMIT]".encode()), line
    assert m.noop()[0] == "OK"
    m.logout()
    still_serves(server)


def test_imap_extension_state_is_bounded(make_server):
    """What a client can make the server keep through this stop's IMAP extensions is bounded:
    NOTIFY and CANCELUPDATE before login are BAD; a 6th kept search is answered once with
    NOUPDATE; a METADATA value over 64 KiB and a 101st entry are refused; a CATENATE repeating a
    URL past APPENDLIMIT is NO [TOOBIG] and stores nothing; the server still serves."""
    import imaplib
    for name in ("SETMETADATA", "GETMETADATA"):
        imaplib.Commands.setdefault(name, ("AUTH", "SELECTED"))
    server = make_server(append_limit=200000)
    m = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=30)
    for line in (b"n1 NOTIFY SET (PERSONAL (MessageNew MessageExpunge))",
                 b'n2 CANCELUPDATE "x"'):
        m.send(line + b"\r\n")
        answer = m.readline()
        assert answer.startswith(line[:3] + b"BAD"), answer
    m.starttls(ssl_context=ssl.create_default_context(cafile=server.cert))
    m.login(*ALICE_LOGIN)
    body = b"Subject: part\r\n\r\n" + b"x" * 60000 + b"\r\n"
    typ, data = m.append("INBOX", None, None, body)
    assert typ == "OK", data
    m.select("INBOX")
    codes = []
    for n in range(6):
        tag = m._command("SEARCH", "RETURN (UPDATE) UNSEEN")
        typ, data = m._command_complete("SEARCH", tag)
        codes.append(b"[NOUPDATE" in data[0])
    assert codes == [False] * 5 + [True], codes
    m.untagged_responses.clear()
    typ, data = m._simple_command("SETMETADATA", "INBOX", "(/private/big {70000+}\r\n" + "v" * 70000 + ")")
    assert typ == "NO" and b"[METADATA MAXSIZE 65536]" in data[0], (typ, data)
    for n in range(100):
        ok_typ, _ = m._simple_command("SETMETADATA", "INBOX", f'(/private/e{n} "1")')
        assert ok_typ == "OK"
    typ, data = m._simple_command("SETMETADATA", "INBOX", '(/private/one-more "1")')
    assert typ == "NO" and b"[METADATA TOOMANY]" in data[0], (typ, data)
    url = '"/INBOX/;UID=1"'
    typ, data = m._simple_command("APPEND", "INBOX", "CATENATE (" + " ".join(["URL " + url] * 4) + ")")
    assert typ == "NO" and b"[TOOBIG]" in data[0], (typ, data)
    typ, data = m.status("INBOX", "(MESSAGES)")
    assert b"MESSAGES 1" in data[0], data
    m.logout()
    still_serves(server)


def test_the_http_endpoints_bound_what_an_unknown_client_can_hold(make_server, tmp_path):
    """/metrics and the HTTPS admin API before any token: a request head that never ends is
    cut off, an admin request without the token gets 401 before its body is read (a huge
    Content-Length changes nothing), and one with the token but an oversize body gets 413."""
    token = "k" * 40
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")

    def endpoints(text):
        return text + ('\n[metrics]\naddress = "127.0.0.1:0"\n'
                       f'\n[admin]\naddress = "127.0.0.1:0"\ntoken_file = "{token_file}"\n')

    server = make_server(transform=endpoints)
    # A head that never ends: closed within the 10 s allowed for it.
    slow = socket.create_connection(("127.0.0.1", server.ports["metrics"]), timeout=20)
    slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    started = time.time()
    rest = b""
    while True:
        chunk = slow.recv(4096)
        if not chunk:
            break
        rest += chunk
    assert time.time() - started < 15, "a slow head held the connection"
    assert rest == b"" or b"408" in rest.split(b"\r\n")[0], rest
    slow.close()

    context = ssl.create_default_context(cafile=server.cert)
    context.check_hostname = False

    def admin(head, body=b""):
        raw = socket.create_connection(("127.0.0.1", server.ports["admin"]), timeout=20)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(head + body)
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                answer += chunk
            return answer.split(b"\r\n")[0]

    # 1 GB announced, nothing sent: refused at once on the missing token.
    assert b" 401 " in admin(b"POST /v1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
    big = b"x" * (70 * 1024)
    status = admin(b"POST /v1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token.encode() +
                   b"\r\nContent-Length: " + str(len(big)).encode() + b"\r\n\r\n", big)
    assert b" 413 " in status, status
    still_serves(server)


def test_a_slow_mailbox_event_plugin_never_slows_the_mailbox_and_its_queue_is_bounded(tmp_path):
    """A `mailbox-event` plugin taking 50 ms an event cannot keep up with a client changing flags
    as fast as it can: every STORE is answered at once (2,000 of them would take the plugin 100
    seconds), at most 1,024 events and 64 MiB of messages wait, the rest are dropped and logged,
    and the server's memory stays bounded."""
    import imaplib
    from conftest import Server
    from test_plugin_stages import with_hooks
    server = Server(tmp_path, transform=with_hooks(**{"mailbox-event": "sleep:50"}))
    try:
        m = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=60)
        m.starttls(ssl_context=ssl.create_default_context(cafile=server.cert))
        m.login(*ALICE_LOGIN)
        # Each event carries this 300 KB message: 64 MiB hold about 220 of them.
        big = b"Subject: heavy\r\n\r\n" + (b"y" * 998 + b"\r\n") * 300
        assert m.append("INBOX", None, None, big)[0] == "OK"
        m.select("INBOX")
        before = rss_kib(server)
        count = 2000
        started = time.monotonic()
        m.send(b"".join(f"s{i} STORE 1 {'+-'[i % 2]}FLAGS (\\Flagged)\r\n".encode()
                        for i in range(count)))
        done = 0
        while done < count:
            line = m.readline()
            assert line, "connection closed"
            if line.startswith(b"s"):
                assert line.split()[1] == b"OK", line
                done += 1
        took = time.monotonic() - started
        assert took < 20, f"{count} STOREs took {took:.1f} s"
        grown = rss_kib(server) - before
        assert grown < 200 * 1024, f"RSS grew by {grown} KiB"
        log = server.log_text()
        assert "mailbox-event queue full; events were dropped" in log, log[-2000:]
        m.logout()
        still_serves(server)
        told = server.log_text().count("mailbox-event flags-changed")
        assert told < count, told
    finally:
        server.stop()


def test_dsn_and_requiretls_parameters_from_a_stranger_are_bounded(server):
    """Before any login, on port 25: REQUIRETLS is neither offered nor taken in plaintext
    (RFC 8689 §2), ENVID is at most 100 characters (RFC 3461 §4.4), NOTIFY=NEVER stands alone
    (§4.1), an ORCPT longer than any address is refused, and a hundred
    recipients each asking for reports keep one stored copy and the session's usual bounds."""
    port = server.ports["smtp"]
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.ehlo("stranger.test")
        assert s.has_extn("dsn") and not s.has_extn("requiretls")
    long_orcpt = "x" * 2000 + "@old.test"
    payload = (
        b"EHLO stranger.test\r\n"
        b"MAIL FROM:<sender@remote.test> REQUIRETLS\r\n"
        + b"MAIL FROM:<sender@remote.test> ENVID=" + b"e" * 101 + b"\r\n"
        + b"MAIL FROM:<> RET=FULL ENVID=" + b"e" * 100 + b"\r\n"
        + b"RCPT TO:<alice@example.test> NOTIFY=NEVER,SUCCESS\r\n"
        + f"RCPT TO:<alice@example.test> ORCPT=rfc822;{long_orcpt}\r\n".encode()
        + b"".join(
            f"RCPT TO:<alice@example.test> NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=rfc822;r{i}@old.test\r\n".encode()
            for i in range(100)
        )
        + b"DATA\r\n"
    )
    replies = raw_exchange(port, payload, 1 + 3 + 2 + 100 + 1, timeout=30)
    assert replies[0].startswith("250 "), replies[:2]
    assert replies[1].startswith("530 5.7.10"), replies[1]
    assert replies[2].startswith("501 "), replies[2]
    assert replies[3].startswith("250 2.1.0"), replies[3]
    assert replies[4].startswith("501 5.5.4"), replies[4]
    assert replies[5].startswith("501 5.5.4") and "ORCPT" in replies[5], replies[5]
    rcpts = replies[6:106]
    assert all(r.startswith("250 2.1.5") for r in rcpts), rcpts
    assert replies[106].startswith("354"), replies[106]
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.ehlo("stranger.test")
        code, _ = s.mail("<>", ["RET=HDRS", "ENVID=abc"])
        assert code == 250
        code, _ = s.rcpt("alice@example.test", ["NOTIFY=SUCCESS", "ORCPT=rfc822;al@old.test"])
        assert code == 250
        s.data(MSG)
    mail = server.wait_for_mail("alice", 1)
    assert len(mail) == 1, "one stored copy"
    # The null sender asked for a success report: none is owed to nobody, the spool empties.
    deadline = time.time() + 10
    while server.spooled() and time.time() < deadline:
        time.sleep(0.05)
    assert server.spooled() == []
    still_serves(server)


def test_a_search_past_the_short_read_bounds_leaves_the_async_threads_to_other_sessions(server):
    """Small reads run on the server's async threads (README, IMAP stress); a SEARCH TEXT over
    1,000 messages of 30 KB opens more files than a short read may (200) and reads more bytes
    (1 MiB), so it runs on a blocking thread. While four sessions search at once (the server
    has an async thread per core: on two cores, four searches run on them would hold them
    all), another user's session is answered: its NOOPs and a SELECT come back before the
    first search does, and every search answers OK."""
    import imaplib
    base = server.data_dir / "mailboxes" / "example.test" / "alice"
    for sub in ("tmp", "new", "cur"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    line = b"The quick brown fox jumps over the lazy dog, again and again.\n"
    for n in range(1000):
        body = b"Subject: m%d\nFrom: friend@remote.test\n\n" % n + line * 480
        name = "1700000000.M%dP1.test,S=%d,W=%d" % (n, len(body), len(body) + body.count(b"\n"))
        (base / "new" / name).write_bytes(body)

    def login(user, password):
        m = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=120)
        m.starttls(ssl_context=ssl.create_default_context(cafile=server.cert))
        m.login(user, password)
        return m

    searchers = [login(*ALICE_LOGIN) for _ in range(4)]
    for m in searchers:
        assert m.select("INBOX") == ("OK", [b"1000"])
    other = login("bob@example.test", "bobpass")
    done = {}

    def search(i, m):
        typ, data = m.search(None, "TEXT", '"not in any message"')
        done[i] = (time.monotonic(), typ, data)

    threads = [threading.Thread(target=search, args=(i, m)) for i, m in enumerate(searchers)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    for _ in range(5):
        assert other.noop()[0] == "OK"
    assert other.select("INBOX")[0] == "OK"
    answered = time.monotonic()
    for t in threads:
        t.join()
    assert all(typ == "OK" and data == [b""] for _, typ, data in done.values()), done
    first_search = min(at for at, _, _ in done.values())
    print(f"\nthe other session was answered {(first_search - answered) * 1000:.0f} ms "
          "before the first search")
    assert answered < first_search
    for m in searchers + [other]:
        m.logout()
