"""The queue of a running server through its admin API (`postern queue …`, `postern kick`):
messages to domains that cannot be reached (the tests' DNS never answers) are listed, shown,
held across a restart, released, retried, bulk deleted by filter with a confirmation, and
bounced to their sender; a kicked user's IMAP session ends."""

import imaplib
import json
import re
import smtplib
import socket
import ssl
import subprocess
import time

from conftest import Server, postern_bin

EDITS = {"trusted_networks": '["127.0.0.0/8"]'}


def cli(server, *args, stdin=""):
    return subprocess.run([postern_bin(), *args, "--config", str(server.config)],
                          input=stdin, capture_output=True, text=True, timeout=60)


def queue(server, *args):
    result = cli(server, "queue", *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def send(server, sender, rcpts):
    with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
        s.ehlo("client.test")
        s.mail(sender)
        for r in rcpts:
            assert s.rcpt(r)[0] == 250
        code, reply = s.data(f"Subject: to {rcpts[0]}\r\n\r\nqueued\r\n".encode())
        assert code == 250
    return re.search(rb"queued as (\w+)", reply).group(1).decode()


def eventually(check, seconds=15):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    return check()


def deferred_lines(server, queue_id):
    return [l for l in server.log_text().splitlines()
            if f"{queue_id}: to=" in l and "status=deferred" in l]


def test_queue_list_show_hold_release_retry_delete_bounce(tmp_path):
    server = Server(tmp_path, EDITS)
    try:
        a = send(server, "alice@example.test", ["x@nowhere.test"])
        b = send(server, "alice@example.test", ["y@nowhere.test", "bob@example.test"])
        c = send(server, "bob@example.test", ["z@elsewhere.test"])
        # Each is tried once: the outcome line greps like Postfix's.
        for q in (a, b, c):
            assert eventually(lambda: deferred_lines(server, q)), server.log_text()
        line = deferred_lines(server, a)[0]
        assert re.search(rf"{a}: to=<x@nowhere\.test>, relay=none, delay=\d+, dsn=4\.4\.3, "
                         rf"status=deferred \(451 4\.4\.3 MX lookup for nowhere\.test failed", line), line

        entries = queue(server, "list")
        assert [e["id"] for e in entries] == [a, b, c], "oldest first"
        assert all(e["status"] == "deferred" and e["attempts"] == 1 for e in entries), entries
        by_id = {e["id"]: e for e in entries}
        # The local copy of b is done; its remote recipient is owed.
        assert [(r["address"], r["state"]) for r in by_id[b]["recipients"]] == [
            ("y@nowhere.test", "pending"), ("bob@example.test", "done")]
        assert "MX lookup for nowhere.test failed" in by_id[b]["recipients"][0]["last"]["diagnostic"]
        human = cli(server, "queue", "list")
        assert human.returncode == 0 and "-- 3 messages" in human.stdout, human
        assert a in human.stdout and "alice@example.test" in human.stdout
        shown = cli(server, "queue", "show", a)
        assert shown.returncode == 0, shown.stderr
        assert "attempts: 1" in shown.stdout and "next attempt:" in shown.stdout
        assert "last: 4.4.3 451 4.4.3 MX lookup for nowhere.test failed" in shown.stdout, shown.stdout
        missing = cli(server, "queue", "show", "NOSUCHID")
        assert missing.returncode == 1 and "not in the queue" in missing.stderr
        # Filters combine.
        assert {e["id"] for e in queue(server, "list", "--domain", "nowhere.test")} == {a, b}
        assert [e["id"] for e in queue(server, "list", "--sender", "BOB@")] == [c]
        assert queue(server, "list", "--older-than", "1h") == []

        # Hold by domain: kept across a restart.
        report = queue(server, "hold", "--domain", "nowhere.test")
        assert sorted(report["done"]) == sorted([a, b]), report
        assert eventually(lambda: {e["id"] for e in queue(server, "list", "--status", "held")} == {a, b})
        assert f"{a}: placed on hold (by the mail administrator)" in server.log_text()
        server.stop()
        server = Server(tmp_path, EDITS)
        assert eventually(lambda: len(queue(server, "list")) == 3)
        status = {e["id"]: e["status"] for e in queue(server, "list")}
        assert status[a] == status[b] == "held", status
        # Held messages are not retried; release one: it is tried at once.
        queue(server, "retry", "--all")
        assert eventually(lambda: len(deferred_lines(server, c)) >= 1)
        time.sleep(1)
        assert deferred_lines(server, a) == [] and deferred_lines(server, b) == []
        queue(server, "release", a)
        assert eventually(lambda: deferred_lines(server, a)), server.log_text()
        assert {e["id"]: e["status"] for e in queue(server, "list")}[a] == "deferred"

        # A bulk delete asks first; without a terminal it says how many and does nothing.
        refused = cli(server, "queue", "delete", "--domain", "nowhere.test")
        assert refused.returncode == 1
        assert "2 messages match; say --yes" in refused.stderr, refused.stderr
        assert len(queue(server, "list")) == 3
        nothing = cli(server, "queue", "delete")
        assert nothing.returncode == 1 and "--all" in nothing.stderr
        report = queue(server, "delete", "--domain", "nowhere.test", "--yes")
        assert sorted(report["done"]) == sorted([a, b]), report
        assert eventually(lambda: [e["id"] for e in queue(server, "list")] == [c])
        assert eventually(lambda: len(server.spooled()) == 1)
        assert f"{b}: removed (by the mail administrator)" in server.log_text()

        # Bounce: the sender (local) gets the failure notice, and the message leaves the queue.
        report = queue(server, "bounce", c)
        assert report["done"] == [c], report
        assert eventually(lambda: queue(server, "list") == [])
        notices = server.wait_for_mail("bob", 2)  # b's local copy, then the bounce
        bounce = [m for _, m in notices if b"Delivery cancelled by the mail administrator" in m]
        assert len(bounce) == 1, notices
        assert b"z@elsewhere.test" in bounce[0]
        assert eventually(lambda: server.spooled() == [])
    finally:
        server.stop()


def test_kick_ends_a_users_sessions_and_the_socket_refuses_garbage(server):
    context = ssl.create_default_context(cafile=server.cert)
    context.check_hostname = False
    m = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=10)
    m.starttls(ssl_context=context)
    m.login("alice@example.test", "alicepass")
    m.select("INBOX")
    other = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=10)
    other.starttls(ssl_context=context)
    other.login("bob@example.test", "bobpass")
    kicked = cli(server, "kick", "alice@example.test")
    assert kicked.returncode == 0, kicked.stderr
    assert m.readline() == b"* BYE Session ended by the mail administrator\r\n"
    assert other.noop()[0] == "OK"
    # The user may log in again.
    again = imaplib.IMAP4("127.0.0.1", server.ports["imap"], timeout=10)
    again.starttls(ssl_context=context)
    assert again.login("alice@example.test", "alicepass")[0] == "OK"
    again.logout()
    other.logout()
    unknown = cli(server, "kick", "nobody@example.test")
    assert unknown.returncode == 1 and "no such user" in unknown.stderr

    path = str(server.data_dir / "admin" / "socket")
    assert oct((server.data_dir / "admin").stat().st_mode & 0o777) == "0o700"
    for request in (b"not json\n", b"x" * 70_000 + b"\n", b'{"command":"queue-list"'):
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(request)
        if not request.endswith(b"\n"):
            s.shutdown(socket.SHUT_WR)
        answer = json.loads(s.makefile().readline())
        assert answer["status"] == "error", (request[:20], answer)
        s.close()
    stopped = subprocess.run([postern_bin(), "queue", "list", "--data-dir", str(server.data_dir / "nothing")],
                             capture_output=True, text=True, timeout=30)
    assert stopped.returncode == 1 and "cannot reach a running server" in stopped.stderr
