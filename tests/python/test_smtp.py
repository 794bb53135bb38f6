"""SMTP end to end with Python's smtplib (and raw sockets where smtplib cannot go)."""

import base64
import re
import smtplib
import socket
import ssl

import pytest

MSG = (
    b"From: Sender <sender@remote.test>\r\n"
    b"To: alice@example.test\r\n"
    b"Subject: smtplib\r\n"
    b"Message-ID: <1@remote.test>\r\n"
    b"\r\n"
    b"Hello Alice.\r\n"
    b".a line that starts with a dot\r\n"
)


def strip_received(stored):
    """Returns (received header, everything else) of a stored LF message."""
    m = re.search(rb"Received: .*?\n(?:\t.*\n)*", stored)
    assert m, stored
    return m.group(0), stored[: m.start()] + stored[m.end():]


def tls_context(server):
    return ssl.create_default_context(cafile=server.cert)


def raw_exchange(port, payload, replies, timeout=10):
    """Sends payload in one write and reads until `replies` reply lines ending in 'NNN ' came."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        data = b""
        while b"\r\n" not in data:
            data += s.recv(4096)
        banner, data = data.split(b"\r\n", 1)
        assert banner.startswith(b"220 ")
        s.sendall(payload)
        while len(re.findall(rb"(?m)^\d{3} ", data)) < replies:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return [l for l in data.decode().split("\r\n") if re.match(r"^\d{3} ", l)]


def test_plain_delivery_stores_exact_bytes(server):
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
        s.ehlo("py.client.test")
        assert s.has_extn("pipelining") and s.has_extn("chunking") and s.has_extn("smtputf8")
        assert not s.has_extn("auth")
        refused = s.sendmail("sender@remote.test", ["alice@example.test"], MSG)
        assert refused == {}
    mail = server.wait_for_mail("alice", 1)
    assert len(mail) == 1
    received, rest = strip_received(mail[0][1])
    assert re.match(
        rb"Received: from py\.client\.test \(\[127\.0\.0\.1\]\)\n\tby localhost \(Postern\) with ESMTP id [0-9A-F]+\n\tfor <alice@example\.test>;\n\t\w{3}, \d{1,2} \w{3} \d{4} ",
        received,
    ), received
    assert rest == (
        b"Return-Path: <sender@remote.test>\nDelivered-To: alice@example.test\n"
        + MSG.replace(b"\r\n", b"\n")
    )


def test_starttls_auth_submission_and_relay(server):
    with smtplib.SMTP("127.0.0.1", server.ports["submission"]) as s:
        s.ehlo()
        with pytest.raises(smtplib.SMTPNotSupportedError):
            s.login("alice@example.test", "alicepass")
        s.starttls(context=tls_context(server))
        s.ehlo()
        assert "PLAIN" in s.esmtp_features["auth"]
        with pytest.raises(smtplib.SMTPAuthenticationError) as bad:
            s.login("alice@example.test", "wrong")
        assert bad.value.smtp_code == 535
        s.login("alice@example.test", "alicepass")
        with pytest.raises(smtplib.SMTPSenderRefused) as spoof:
            s.sendmail("bob@example.test", ["friend@remote.test"], MSG)
        assert spoof.value.smtp_code == 553
        s.rset()
        assert s.sendmail("alice@example.test", ["friend@remote.test", "bob@example.test"], MSG) == {}
    assert len(server.wait_for_mail("bob", 1)) == 1
    assert len(server.spooled()) == 1, "the remote copy waits for a retry (no DNS in tests)"


def test_login_mechanism_over_implicit_tls(server):
    with smtplib.SMTP_SSL("127.0.0.1", server.ports["submissions"], context=tls_context(server)) as s:
        s.ehlo()
        s.user, s.password = "bob@example.test", "bobpass"
        code, _ = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
        assert code == 235
        assert s.sendmail("bob@example.test", ["alice@example.test"], MSG) == {}
    mail = server.wait_for_mail("alice", 1)
    assert b"with ESMTPSA id" in mail[0][1]


def test_auth_before_tls_is_refused(server):
    lines = raw_exchange(
        server.ports["smtp"],
        b"EHLO x\r\nAUTH PLAIN " + base64.b64encode(b"\0alice@example.test\0alicepass") + b"\r\nQUIT\r\n",
        3,
    )
    assert lines[1].startswith("538 5.7.11"), lines


@pytest.mark.parametrize(
    "rcpt",
    [
        "victim@remote.test",
        "victim%remote.test@example.test",
        "@example.test:victim@remote.test",
        '"victim@remote.test"@example.test',
        "victim@REMOTE.test",
        "victim@[127.0.0.1]",
        "victim@remote.test.",
    ],
)
def test_open_relay_attempts_are_refused(server, rcpt):
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
        s.ehlo()
        s.mail("spammer@remote.test")
        code, text = s.rcpt(rcpt)
        assert code in (550, 501), (rcpt, code, text)
        # Still serving a normal client afterwards.
        assert s.noop()[0] == 250
    assert server.spooled() == []


def test_size_is_enforced_at_mail_and_in_data(make_server):
    server = make_server(max_message_size=10000, body_memory_budget=1048576)
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
        s.ehlo()
        assert s.ehlo_resp and b"SIZE 10000" in s.ehlo_resp
        code, text = s.mail("a@remote.test", ["SIZE=20000"])
        assert code == 552 and b"5.3.4" in text
        s.rset()
        # smtplib adds SIZE= itself when the server advertises SIZE.
        with pytest.raises(smtplib.SMTPSenderRefused) as big:
            s.sendmail("a@remote.test", ["alice@example.test"], b"Subject: big\r\n\r\n" + b"x" * 20000)
        assert big.value.smtp_code == 552
        # Without SIZE=, the limit is enforced while the data arrives.
        s.rset()
        s.mail("a@remote.test")
        s.rcpt("alice@example.test")
        code, text = s.data(b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 20)
        assert code == 552 and b"5.3.4" in text
        assert s.noop()[0] == 250
    assert server.maildir("alice") == []


def test_pipelined_commands_in_one_write(server):
    payload = (
        b"EHLO pipeliner\r\n"
        b"MAIL FROM:<p@remote.test>\r\n"
        b"RCPT TO:<alice@example.test>\r\n"
        b"RCPT TO:<nosuchuser@example.test>\r\n"
        b"RCPT TO:<bob@example.test>\r\n"
        b"DATA\r\n"
    )
    # Replies: EHLO, MAIL, 3x RCPT, 354.
    with socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=10) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")
        s.sendall(payload)
        replies = []
        while len(replies) < 6:
            line = f.readline()
            if line[3:4] == b" ":
                replies.append(line.decode().strip())
        assert replies[1].startswith("250 2.1.0")
        assert replies[2].startswith("250 2.1.5")
        assert replies[3].startswith("550 5.1.1")
        assert replies[4].startswith("250 2.1.5")
        assert replies[5].startswith("354")
        s.sendall(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        done = f.readline().decode()
        assert done.startswith("250 2.0.0 OK: queued as "), done
        assert f.readline().startswith(b"221")
    assert len(server.wait_for_mail("alice", 1)) == 1
    assert len(server.wait_for_mail("bob", 1)) == 1


def test_bdat_chunking(server):
    body = b"Subject: chunked\r\n\r\nfirst chunk\r\nsecond chunk\r\n"
    a, b = body[:20], body[20:]
    payload = (
        b"EHLO chunker\r\nMAIL FROM:<c@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
        + b"BDAT %d\r\n" % len(a) + a
        + b"BDAT %d LAST\r\n" % len(b) + b
        + b"QUIT\r\n"
    )
    lines = raw_exchange(server.ports["smtp"], payload, 6)
    assert lines[3].startswith("250 2.0.0 20 octets"), lines
    assert lines[4].startswith("250 2.0.0 OK: queued as"), lines
    mail = server.wait_for_mail("alice", 1)
    assert mail[0][1].endswith(b"Subject: chunked\n\nfirst chunk\nsecond chunk\n")


def test_smtputf8_message(server):
    msg = "Subject: héllo\r\nFrom: pelé@remote.test\r\n\r\nçà va\r\n".encode()
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
        s.ehlo()
        assert s.sendmail("pelé@remote.test", ["alice@example.test"], msg, mail_options=["SMTPUTF8", "BODY=8BITMIME"]) == {}
    mail = server.wait_for_mail("alice", 1)
    assert mail[0][1].endswith("Subject: héllo\nFrom: pelé@remote.test\n\nçà va\n".encode())
    assert b"with UTF8SMTP id" in mail[0][1]


def test_vrfy_and_expn_reveal_nothing(server):
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
        s.ehlo()
        assert s.verify("alice")[0] == 252
        assert s.verify("nobody")[0] == 252
        assert s.expn("staff")[0] == 502


def test_starttls_discards_pipelined_plaintext(server):
    """CVE-2011-0411: commands sent in plaintext behind STARTTLS must not run inside TLS."""
    with socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=10) as raw:
        f = raw.makefile("rb")
        assert f.readline().startswith(b"220 ")
        raw.sendall(b"EHLO x\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        raw.sendall(b"STARTTLS\r\nMAIL FROM:<injected@remote.test>\r\n")
        assert f.readline().startswith(b"220 2.0.0")
        tls = tls_context(server).wrap_socket(raw, server_hostname="localhost")
        tf = tls.makefile("rb")
        # Had the injected MAIL run, this RCPT would be accepted; it must see no transaction.
        tls.sendall(b"EHLO x\r\n")
        while not tf.readline().startswith(b"250 "):
            pass
        tls.sendall(b"RCPT TO:<alice@example.test>\r\n")
        assert tf.readline().startswith(b"503 5.5.1"), "injected command ran inside TLS"


def test_swaks_starttls_auth_login(server):
    """swaks, a real SMTP client, submits over STARTTLS with AUTH LOGIN."""
    import shutil
    import subprocess

    assert shutil.which("swaks"), "swaks is installed by scripts/test"
    out = subprocess.run(
        [
            "swaks", "--server", "127.0.0.1", "--port", str(server.ports["submission"]),
            "--tls", "--tls-verify", "--tls-ca-path", server.cert, "--tls-sni", "localhost",
            "--auth", "LOGIN", "--auth-user", "bob@example.test", "--auth-password", "bobpass",
            "--from", "bob@example.test", "--to", "alice@example.test",
            "--header", "Subject: from swaks", "--body", "swaks body line",
        ],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "235 2.7.0" in out.stdout
    assert re.search(r"<~  250 2\.0\.0 OK: queued as [0-9A-F]+", out.stdout), out.stdout
    mail = server.wait_for_mail("alice", 1)
    stored = mail[0][1]
    assert b"Subject: from swaks\n" in stored
    # swaks sends the body followed by two empty lines (see its transcript), stored as LF lines.
    assert stored.endswith(b"\n\nswaks body line\n\n\n"), stored
    assert b"with ESMTPSA id" in stored


def test_json_log_lines(tmp_path):
    """`serve --log-format json`: every log line is one JSON object, with the level, the message
    and the session's span fields, for log collectors."""
    import json
    import subprocess

    from conftest import postern_bin, test_config

    config = tmp_path / "postern.toml"
    config.write_text(test_config(tmp_path / "data"))
    log = open(tmp_path / "postern.log", "wb")
    proc = subprocess.Popen([postern_bin(), "serve", "--config", str(config), "--log-format", "json"],
                            stdout=subprocess.PIPE, stderr=log)
    try:
        ports = {}
        for raw in proc.stdout:
            line = raw.decode()
            if line.startswith("postern: ready"):
                break
            parts = line.split()
            if len(parts) >= 4 and parts[0] == "postern:" and parts[1] == "listening":
                ports[parts[2]] = int(parts[3].rsplit(":", 1)[1])
        with smtplib.SMTP("127.0.0.1", ports["smtp"]) as s:
            assert s.sendmail("sender@remote.test", ["alice@example.test"], b"Subject: j\r\n\r\nx\r\n") == {}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    records = [json.loads(line) for line in (tmp_path / "postern.log").read_text().splitlines() if line.strip()]
    assert records and all({"timestamp", "level", "fields"} <= r.keys() for r in records)
    queued = [r for r in records if "(queue active)" in r["fields"].get("message", "")]
    assert len(queued) == 1, records
    assert queued[0]["level"] == "INFO" and "nrcpt=1" in queued[0]["fields"]["message"]
    assert queued[0]["spans"][0]["name"] == "smtp" and "session" in queued[0]["spans"][0]


def test_the_systemd_unit_verifies(tmp_path):
    """examples/postern.service passes `systemd-analyze verify` (pointed at the built binary)."""
    import shutil
    import subprocess

    from conftest import ROOT, postern_bin

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (ROOT / "examples" / "postern.service").read_text()
    assert "NoNewPrivileges=yes" in unit and "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in unit
    copy = tmp_path / "postern.service"
    copy.write_text(unit.replace("/usr/local/bin/postern", postern_bin()))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "postern.service" not in result.stderr, result.stderr


def test_outcome_lines_grep_like_postfix(server):
    """One line at acceptance and one per recipient outcome, queue id first, in Postfix's
    `key=value` form: `grep QUEUEID` follows the message, `status=` counts outcomes."""
    import re as _re
    import time as _time
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
        s.ehlo()
        s.mail("sender@remote.test")
        s.rcpt("alice@example.test")
        s.rcpt("bob@example.test")
        code, reply = s.data(b"Subject: log\r\n\r\nlines\r\n")
        assert code == 250
    queue_id = _re.search(rb"queued as (\w+)", reply).group(1).decode()
    deadline = _time.time() + 10
    while _time.time() < deadline and server.log_text().count(f"{queue_id}: to=") < 2:
        _time.sleep(0.05)
    lines = [l for l in server.log_text().splitlines() if f"{queue_id}:" in l]
    assert any(_re.search(rf"{queue_id}: from=<sender@remote\.test>, size=\d+, nrcpt=2 \(queue active\)", l)
               for l in lines), lines
    for user in ("alice", "bob"):
        assert any(_re.search(
            rf"{queue_id}: to=<{user}@example\.test>, relay=local, delay=\d+, dsn=2\.0\.0, "
            rf"status=sent \(delivered to {user}@example\.test/INBOX\)", l) for l in lines), lines
