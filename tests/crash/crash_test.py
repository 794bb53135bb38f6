"""Crash test: concurrent SMTP load, kill -9 at random moments, restart, repeat; then check that
every message that got a 250 is in its Maildir exactly once, byte for byte, and that the
mailboxes and their UID indexes read back consistently (through POP3 and IMAP, and directly).

    tests/.venv/bin/python tests/crash/crash_test.py [--cycles 50] [--clients 8] [--bin PATH]
        [--backend maildir|mailbox-log]

`--backend mailbox-log` stores example.test's mail in the shipped Wasm backend instead of the
embedded Maildir, and checks its logs the same way.

Prints one line per cycle and a summary; exits non-zero on any lost, duplicated or damaged
message. Messages whose 250 never arrived (the kill came first) may be delivered once or not at
all; both are counted.
"""

import argparse
import collections
import hashlib
import imaplib
import os
import pathlib
import poplib
import random
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "python"))
from conftest import _encode, read_mailbox_log, test_config, with_backend  # noqa: E402
USERS = {"alice@example.test": "alicepass", "bob@example.test": "bobpass"}
TOKEN = re.compile(rb"X-Crash-Token: (\S+)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(data_dir, ports, backend):
    """The end-to-end tests' configuration (tests/python/conftest.py), with a quiet log, room for
    the load, fixed ports (restarts must find the server where the clients left it) and plain
    LOGIN on loopback for the readers."""
    text = test_config(data_dir, {"log": '"warn"', "max_connections_per_ip": "500"},
                       with_backend(backend))

    def port_for(match):
        return f'name = "{match.group(1)}"{match.group(2)}address = "127.0.0.1:{ports[match.group(1)]}"'

    text = re.sub(r'name = "(\w+)"(\nprotocol = "\w+"\n)address = "127\.0\.0\.1:0"', port_for, text)
    return re.sub(r'(?m)^(name = "(?:imap|pop3)")$', r"\1\ntrusted = true", text)


class Server:
    def __init__(self, binary, workdir, ports, backend):
        self.binary, self.workdir, self.ports = binary, workdir, ports
        self.backend = backend
        self.config = workdir / "postern.toml"
        self.data = workdir / "data"
        self.config.write_text(config(self.data, ports, backend))
        self.log = open(workdir / "postern.log", "ab")
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([self.binary, "serve", "--config", str(self.config)],
                                     stdout=subprocess.PIPE, stderr=self.log)
        deadline = time.time() + 60
        for line in self.proc.stdout:
            if line.strip() == b"postern: ready":
                break
            if time.time() > deadline:
                raise RuntimeError("server did not start")
        else:
            raise RuntimeError("server exited: see " + str(self.workdir / "postern.log"))
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)

    def spooled(self):
        d = self.data / "spool" / "queue"
        return sorted(os.listdir(d)) if d.exists() else []


class Ledger:
    """What the clients sent and what the server acknowledged."""

    def __init__(self):
        self.lock = threading.Lock()
        self.acked = {}  # token -> (recipients, body digest)
        self.unacked = {}  # token -> (recipients, body digest): sent, no final reply seen
        self.appended = {}  # token -> (user, UIDVALIDITY, UID) from an acknowledged APPEND

    def record(self, table, token, recipients, digest):
        with self.lock:
            table[token] = (tuple(recipients), digest)


def message(token, rng):
    words = ["lorem", "ipsum", "dolor", "sit", "amet", ".dot", "tab\there", "x" * 70]
    # Mostly small; one in ten up to ~400 KB, which keeps messages in flight longer.
    lines = rng.randrange(1, 400) if rng.random() < 0.9 else rng.randrange(400, 8000)
    filler = "\r\n".join(" ".join(rng.choice(words) for _ in range(rng.randrange(0, 12)))
                         for _ in range(lines))
    body = (f"From: load@remote.test\r\nTo: alice@example.test\r\nSubject: crash {token}\r\n"
            f"X-Crash-Token: {token}\r\n\r\n{filler}\r\n.leading dot\r\nend {token}\r\n").encode()
    return body


def client(n, cycle, port, ledger, stop, rng):
    seq = 0
    while not stop.is_set():
        try:
            s = smtplib.SMTP("127.0.0.1", port, timeout=10)
            s.ehlo("crash.client")
        except (OSError, smtplib.SMTPException):
            time.sleep(0.05)
            continue
        try:
            while not stop.is_set():
                seq += 1
                token = f"c{cycle}-t{n}-m{seq}"
                recipients = rng.choice([["alice@example.test"], ["bob@example.test"],
                                         ["alice@example.test", "bob@example.test"]])
                body = message(token, rng)
                digest = hashlib.sha256(body).hexdigest()
                ledger.record(ledger.unacked, token, recipients, digest)
                s.sendmail("load@remote.test", recipients, body)
                # sendmail returned: the 250 after the final dot came.
                with ledger.lock:
                    ledger.unacked.pop(token)
                    ledger.acked[token] = (tuple(recipients), digest)
        except (OSError, smtplib.SMTPException):
            pass
        finally:
            try:
                s.close()
            except OSError:
                pass


def reader(n, cycle, port, pop3_port, ledger, stop, rng):
    """Reads, flags and appends mail while it arrives, so the UID indexes and Maildir renames
    (flags in file names) are being written when the kill comes: IMAP APPEND, SELECT, FETCH,
    STORE, and a POP3 session that retrieves (and so marks seen at QUIT) without deleting."""
    user, password = list(USERS.items())[n % len(USERS)]
    seq = 0
    while not stop.is_set():
        try:
            imap = imaplib.IMAP4("127.0.0.1", port, timeout=10)
            imap.login(user, password)
            seq += 1
            token = f"c{cycle}-r{n}-a{seq}"
            body = message(token, rng)
            ledger.record(ledger.unacked, token, [user], hashlib.sha256(body).hexdigest())
            typ, data = imap.append("INBOX", None, None, body)
            if typ == "OK":
                # The tagged OK came: the message is on disk under the UID it names.
                code = re.search(rb"APPENDUID (\d+) (\d+)", data[0])
                with ledger.lock:
                    ledger.acked[token] = ledger.unacked.pop(token)
                    ledger.appended[token] = (user, int(code.group(1)), int(code.group(2)))
            typ, data = imap.select("INBOX")
            exists = int(data[0])
            if exists:
                imap.fetch(f"{max(1, exists - 20)}:*", "(UID FLAGS)")
                for _ in range(5):
                    flag = rng.choice(["\\Seen", "\\Flagged", "\\Answered"])
                    imap.store(str(rng.randrange(1, exists + 1)), rng.choice(["+FLAGS", "-FLAGS"]), flag)
            imap.uid("SEARCH", "ALL")
            imap.logout()
            pop = poplib.POP3("127.0.0.1", pop3_port, timeout=10)
            pop.user(user)
            pop.pass_(password)
            count, _ = pop.stat()
            if count:
                pop.retr(rng.randrange(1, count + 1))
            pop.quit()
        except (OSError, imaplib.IMAP4.error, poplib.error_proto, ValueError):
            time.sleep(0.05)


def stored(data, user, backend):
    """(where, raw bytes) of each message of the user's INBOX, and how many half-written
    leftovers the store holds (Maildir's tmp/; the log backend keeps none apart)."""
    local, domain = user.split("@")
    if backend == "mailbox-log":
        folder = data / "mailbox-backends" / "mailbox-log" / _encode(user) / "f.INBOX"
        return [(f"{folder}:{name}", raw) for name, raw in read_mailbox_log(folder)], 0
    base = data / "mailboxes" / domain / local
    files = []
    for sub in ("new", "cur"):
        d = base / sub
        if d.exists():
            files += sorted(d.iterdir())
    leftovers = len(list((base / "tmp").iterdir())) if (base / "tmp").exists() else 0
    return [(str(p), p.read_bytes()) for p in files], leftovers


def stored_body(raw):
    """The client's message as stored: without the trace fields our server prepended
    (Received, Return-Path, Delivered-To), LF endings turned back into CRLF."""
    raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    start = raw.find(b"From: load@remote.test\r\n")
    return raw[start:] if start >= 0 else raw


def check(server, ledger):
    problems = []
    seen = collections.defaultdict(list)  # (user, token) -> digests
    counts = {}
    for user in USERS:
        messages, leftovers = stored(server.data, user, server.backend)
        counts[user] = len(messages)
        for path, raw in messages:
            m = TOKEN.search(raw)
            if not m:
                problems.append(f"{path}: no token (damaged or foreign message)")
                continue
            seen[(user, m.group(1).decode())].append(hashlib.sha256(stored_body(raw)).hexdigest())
        counts[user + " tmp"] = leftovers

    def expect(token, recipients, digest, at_most_once):
        for user in USERS:
            got = seen.pop((user, token), [])
            wanted = user in recipients
            if wanted and not at_most_once and len(got) != 1:
                problems.append(f"{token} for {user}: acknowledged, stored {len(got)} times")
            elif len(got) > 1 or (got and not wanted):
                problems.append(f"{token} for {user}: stored {len(got)} times")
            for d in got:
                if d != digest:
                    problems.append(f"{token} for {user}: stored bytes differ from what was sent")

    for token, (recipients, digest) in ledger.acked.items():
        expect(token, recipients, digest, False)
    unacked_delivered = 0
    for token, (recipients, digest) in ledger.unacked.items():
        unacked_delivered += any((u, token) in seen for u in USERS)
        expect(token, recipients, digest, True)
    for (user, token) in seen:
        problems.append(f"{token} for {user}: stored but never sent")
    return problems, counts, unacked_delivered


def check_through_protocols(server, ledger):
    """POP3 and IMAP read every mailbox back: counts equal the Maildir, UIDs unique and stable,
    and every acknowledged APPEND is found under the UIDVALIDITY and UID its APPENDUID named."""
    problems = []
    ctx = ssl.create_default_context(cafile=str(server.data / "tls" / "cert.pem"))
    for user, password in USERS.items():
        files, _ = stored(server.data, user, server.backend)
        imap = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=ctx)
        imap.login(user, password)
        typ, data = imap.select("INBOX", readonly=True)
        exists = int(data[0])
        typ, data = imap.uid("SEARCH", "ALL")
        uids = data[0].split()
        validity = int(re.search(rb"UIDVALIDITY (\d+)", imap.status("INBOX", "(UIDVALIDITY)")[1][0]).group(1))
        typ, data = imap.uid("FETCH", "1:*", "(BODY.PEEK[HEADER.FIELDS (X-Crash-Token)])")
        token_at = {}
        for item in data:
            if isinstance(item, tuple):
                uid = int(re.search(rb"UID (\d+)", item[0]).group(1))
                m = TOKEN.search(item[1])
                token_at[uid] = m.group(1).decode() if m else None
        imap.logout()
        for token, (owner, v, uid) in ledger.appended.items():
            if owner == user and (v != validity or token_at.get(uid) != token):
                problems.append(f"APPEND {token}: acknowledged as UID {uid} (UIDVALIDITY {v}), "
                                f"found {token_at.get(uid)!r} there (UIDVALIDITY {validity})")
        if exists != len(files) or len(set(uids)) != len(files):
            problems.append(f"IMAP {user}: EXISTS {exists}, {len(set(uids))} UIDs, {len(files)} files")
        pop = poplib.POP3_SSL("127.0.0.1", server.ports["pop3s"], context=ctx)
        pop.user(user)
        pop.pass_(password)
        count, _ = pop.stat()
        uidls = pop.uidl()[1]
        pop.quit()
        if count != len(files) or len(set(uidls)) != len(files):
            problems.append(f"POP3 {user}: STAT {count}, {len(set(uidls))} UIDLs, {len(files)} files")
        # IMAP UIDs and POP3 UIDLs name the same messages (UIDL = UID in hex + UIDVALIDITY).
        pop_uids = sorted(int(line.split()[1][:8], 16) for line in uidls)
        if pop_uids != sorted(int(u) for u in uids):
            problems.append(f"{user}: POP3 UIDLs and IMAP UIDs disagree")
    return problems


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--bin", default=str(ROOT / "target" / "release" / "postern"))
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--backend", default="maildir", choices=["maildir", "mailbox-log"])
    args = parser.parse_args()
    rng = random.Random(args.seed)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="postern-crash."))
    ports = {name: free_port() for name in
             ("smtp", "submission", "submissions", "pop3", "pop3s", "imap", "imaps")}
    server = Server(args.bin, workdir, ports, args.backend)
    ledger = Ledger()
    print(f"seed {args.seed}, {args.cycles} cycles, {args.clients} clients, "
          f"{args.backend} store, work dir {workdir}")
    started = time.time()
    spooled_at_kill = []
    try:
        for cycle in range(1, args.cycles + 1):
            server.start()
            stop = threading.Event()
            threads = [threading.Thread(target=client, daemon=True,
                                        args=(n, cycle, ports["smtp"], ledger, stop,
                                              random.Random(rng.random())))
                       for n in range(args.clients)]
            threads += [threading.Thread(target=reader, daemon=True,
                                         args=(n, cycle, ports["imap"], ports["pop3"], ledger,
                                               stop, random.Random(rng.random())))
                        for n in range(2)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.2, 1.5))
            server.kill()
            spooled_at_kill.append(len(server.spooled()))
            stop.set()
            for t in threads:
                t.join()
            print(f"cycle {cycle:3}: killed; {len(ledger.acked)} acknowledged so far, "
                  f"{len(ledger.unacked)} unacknowledged, {spooled_at_kill[-1]} in the spool",
                  flush=True)
        # A last start delivers what the spool still holds; then a clean stop.
        server.start()
        deadline = time.time() + 120
        while server.spooled() and time.time() < deadline:
            time.sleep(0.1)
        problems = check_through_protocols(server, ledger)
        server.stop()
        more, counts, unacked_delivered = check(server, ledger)
        problems += more
        log = (workdir / "postern.log").read_text(errors="replace")
        damaged = len(re.findall(r"(?i)damaged|rebuil", log))
        print(f"\n{args.cycles} kill -9 cycles in {time.time() - started:.0f} s")
        print(f"acknowledged messages: {len(ledger.acked)} ({len(ledger.appended)} by IMAP APPEND); "
              f"unacknowledged when killed: "
              f"{len(ledger.unacked)} ({unacked_delivered} of them delivered once, the rest never)")
        print(f"{args.backend} messages: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        print(f"spool at each kill: max {max(spooled_at_kill)}, mean "
              f"{sum(spooled_at_kill) / len(spooled_at_kill):.1f}; left at the end: {len(server.spooled())}")
        print(f"index/Maildir repairs logged: {damaged}")
        if server.spooled():
            problems.append(f"{len(server.spooled())} messages never left the spool")
        # A run that acknowledged nothing proves nothing: both kinds of write must have happened.
        smtp_acked = len(ledger.acked) - len(ledger.appended)
        if smtp_acked < args.cycles:
            problems.append(f"only {smtp_acked} SMTP messages acknowledged in {args.cycles} cycles")
        if not ledger.appended:
            problems.append("no IMAP APPEND was acknowledged")
        if problems:
            print(f"\nFAILED: {len(problems)} problems")
            for p in problems[:50]:
                print("  " + p)
            return 1
        print("OK: every acknowledged message delivered exactly once, byte for byte; "
              "mailboxes and indexes consistent")
        return 0
    finally:
        if server.proc and server.proc.poll() is None:
            server.kill()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
