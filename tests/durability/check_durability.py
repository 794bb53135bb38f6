#!/usr/bin/env python3
"""Crash consistency without crashing, in the spirit of ALICE (Pillai et al., OSDI '14).

kill -9 ends the process, not the machine: it cannot show a flush that is missing. This runs
the real server under `strace -f`, drives it through the writes a client is told are done (an
SMTP delivery to a new user, one that stays spooled for a remote recipient, IMAP CREATE,
APPEND, STORE, EXPUNGE, RENAME and DELETE, POP3 DELE and QUIT), and then checks the recorded
file-system calls against the rules a power loss would punish:

  R1 flushed before renamed: a file renamed into place was flushed (fsync/fdatasync) after its
     last write and before the rename, so the new name never points at data still in cache.
  R2 directory flushed before the answer: every directory that gained or lost an entry
     (rename, unlink, mkdir, link) before an acknowledgement (SMTP `250 … queued`, an IMAP
     tagged OK, a POP3 +OK) was flushed after that change and before the answer was written.
     Entries in `tmp/` directories and in folders still being built or torn down
     (`..creating.*`, `..deleting.*`) are exempt: they become visible only through a rename,
     which R2 covers.
  R3 delivered before unspooled: a spooled message is removed only after every Maildir copy
     made from it is durable (its directory flushed).

Run: tests/durability/check_durability.py [--bin target/debug/postern]. Exit status 1 and the
violations on stderr when a rule is broken; a plain `N passed, N failed` line at the end.
"""

import argparse
import imaplib
import os
import pathlib
import poplib
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "python"))
from conftest import test_config  # noqa: E402

SYSCALLS = ",".join([
    "openat", "write", "writev", "pwrite64", "sendto", "sendmsg", "rename", "renameat",
    "renameat2", "link", "linkat", "unlink", "unlinkat", "mkdir", "mkdirat", "fsync",
    "fdatasync",
])

LINE = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(.*)$")
DONE = re.compile(r"^(\w+)\((.*)\)\s+=\s+(-?\d+)(?:<[^>]*>)?.*<(\d+\.\d+)>$")
UNFINISHED = re.compile(r"^(\w+)\((.*) <unfinished \.\.\.>$")
RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)\)\s+=\s+(-?\d+)(?:<[^>]*>)?.*<(\d+\.\d+)>$")
FD_PATH = re.compile(r"^-?\d+<(TCP:\[[^\]]*\]|[^>]*)>")
STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')


class Call:
    def __init__(self, pid, name, args, result, start, end):
        self.pid, self.name, self.args, self.result = pid, name, args, result
        self.start, self.end = start, end

    def fd_path(self):
        m = FD_PATH.match(self.args)
        return m.group(1) if m else None

    def strings(self):
        return [bytes(s, "utf-8").decode("unicode_escape") for s in STRING.findall(self.args)]

    def path_args(self):
        """Absolute paths named by a path call (dirfd annotations resolve relative ones)."""
        parts = split_args(self.args)
        out = []
        base = None
        for part in parts:
            m = FD_PATH.match(part)
            if part.startswith("AT_FDCWD<") or (m and not part.startswith('"')):
                base = part[part.index("<") + 1:part.rindex(">")]
                continue
            if part.startswith('"'):
                path = bytes(part[1:-1], "utf-8").decode("unicode_escape")
                if not path.startswith("/") and base:
                    path = os.path.join(base, path)
                out.append(os.path.normpath(path))
        return out


def split_args(args):
    parts, depth, quote, cur = [], 0, False, ""
    i = 0
    while i < len(args):
        c = args[i]
        if quote:
            cur += c
            if c == "\\":
                cur += args[i + 1]
                i += 1
            elif c == '"':
                quote = False
        elif c == '"':
            quote = True
            cur += c
        elif c in "<[{(":
            depth += 1
            cur += c
        elif c in ">]})":
            depth -= 1
            cur += c
        elif c == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += c
        i += 1
    if cur.strip():
        parts.append(cur.strip())
    return parts


def parse(trace):
    calls, pending = [], {}
    for raw in trace.splitlines():
        m = LINE.match(raw)
        if not m:
            continue
        pid, ts, rest = m.group(1), float(m.group(2)), m.group(3)
        u = UNFINISHED.match(rest)
        if u:
            pending[(pid, u.group(1))] = (ts, u.group(2))
            continue
        r = RESUMED.match(rest)
        if r:
            started = pending.pop((pid, r.group(1)), None)
            if started is None:
                continue
            start, head = started
            calls.append(Call(pid, r.group(1), head + r.group(2), int(r.group(3)), start,
                              ts + float(r.group(4))))
            continue
        d = DONE.match(rest)
        if d:
            calls.append(Call(pid, d.group(1), d.group(2), int(d.group(3)), ts,
                              ts + float(d.group(4))))
    calls.sort(key=lambda c: c.start)
    return calls


# Advisory state kept without a flush, by choice: the \Recent boundary (RFC 3501 §2.3.2; a
# crash can only make a few messages \Recent again, never lose or bring back one).
ADVISORY = ("postern-recent", "postern-recent.tmp")


def exempt(entry):
    """Entries no reader ever sees under their name: in tmp/, or a folder still being built or
    already renamed away to be torn down; and the advisory files above."""
    return (os.path.basename(os.path.dirname(entry)) == "tmp"
            or "/..creating." in entry
            or "/..deleting." in entry
            or os.path.basename(entry) in ADVISORY)


def check(calls, data_dir, ports):
    data_dir = str(data_dir)
    ours = lambda p: p is not None and p.startswith(data_dir)  # noqa: E731
    syncs, changes, renames, acks, unspools = {}, [], [], [], []
    for c in calls:
        if c.result < 0:
            continue
        if c.name in ("fsync", "fdatasync"):
            # Any directory counts, the data directory's parent too (it gained the data dir).
            syncs.setdefault(c.fd_path(), []).append((c.start, c.end, c.pid))
        elif c.name in ("rename", "renameat", "renameat2", "link", "linkat"):
            paths = c.path_args()
            if len(paths) >= 2 and ours(paths[-1]):
                src, dst = paths[0], paths[-1]
                if c.name.startswith("rename"):
                    renames.append((c, src, dst))
                    changes.append((c, src, f"{c.name} from {src}"))
                changes.append((c, dst, f"{c.name} to {dst}"))
        elif c.name in ("unlink", "unlinkat", "mkdir", "mkdirat"):
            paths = c.path_args()
            if paths and ours(paths[-1]):
                changes.append((c, paths[-1], f"{c.name} {paths[-1]}"))
                if c.name.startswith("unlink") and "/spool/queue/" in paths[-1]:
                    unspools.append((c, os.path.basename(paths[-1])))
        if c.name in ("sendto", "write", "writev", "sendmsg"):
            target = c.fd_path() or ""
            if not target.startswith("TCP:"):
                continue
            local = re.search(r"TCP:\[[^:]+:(\d+)->", target)
            port = int(local.group(1)) if local else 0
            text = "".join(c.strings())
            if port == ports["smtp"] and re.search(r"(?m)^250 2\.0\.0 OK: queued", text):
                acks.append((c, "SMTP " + text.strip()[:60]))
            elif port == ports["imap"] and re.search(r"(?m)^[A-Za-z0-9]+ OK ", text):
                acks.append((c, "IMAP " + text.strip().splitlines()[-1][:60]))
            elif port == ports["pop3"] and text.startswith("+OK"):
                acks.append((c, "POP3 " + text.strip()[:60]))

    def synced(path, change, before):
        # A flush counts when it began after the change returned. A later call of the same
        # thread did, whatever the timestamps say: strace's end time (start + -T) can run a
        # few microseconds past the next call's start under load.
        def after(s, pid):
            return s >= change.end or (pid == change.pid and s > change.start)
        return any(after(s, pid) and e <= before for s, e, pid in syncs.get(path, []))

    violations = []
    # R1: each renamed file flushed after its last write and before the rename. Replayed in
    # order: a write makes its file dirty, a flush that starts after the write cleans it, a
    # rename of a dirty file is the violation (and the dirt moves with the name).
    dirty = {}
    for c in calls:
        if c.result < 0:
            continue
        path = c.fd_path()
        if c.name in ("write", "writev", "pwrite64") and ours(path):
            dirty[path] = c.end
        elif c.name in ("fsync", "fdatasync") and path in dirty and c.start >= dirty[path]:
            del dirty[path]
        elif c.name.startswith("rename"):
            paths = c.path_args()
            if len(paths) >= 2 and paths[0] in dirty and not exempt(paths[0]):
                violations.append(
                    f"R1 {paths[0]} renamed to {paths[-1]} without a flush after its last write")
                dirty[paths[-1]] = dirty.pop(paths[0])
    # R2: every directory change before an answer flushed before it.
    previous = 0.0
    for ack, what in acks:
        for c, entry, how in changes:
            directory = os.path.dirname(entry)
            if c.end > ack.start or c.end < previous or exempt(entry):
                continue
            if not synced(directory, c, ack.start):
                flushes = [(f"{s:.6f}", pid) for s, _, pid in syncs.get(directory, [])][:6]
                violations.append(
                    f"R2 answered '{what}' before flushing {directory} after {how} "
                    f"(change {c.start:.6f}-{c.end:.6f} in {c.pid}, answer {ack.start:.6f}; "
                    f"flushes of it: {flushes})")
        previous = ack.start
    # R3: Maildir copies of a spooled message durable before it leaves the spool.
    for unlink, queue_id in unspools:
        for c, src, dst in renames:
            if f"Q{queue_id}_" not in os.path.basename(dst) or c.end > unlink.start:
                continue
            if not synced(os.path.dirname(dst), c, unlink.start):
                violations.append(f"R3 {queue_id} unspooled before {os.path.dirname(dst)} was flushed")
    return violations, acks, changes, renames, unspools


def scenario(ports):
    """What a client does; every step waits for the one before to settle."""
    def smtp(sender, rcpts, subject):
        with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=20) as s:
            s.sendmail(sender, rcpts, b"Subject: " + subject + b"\r\n\r\nbody\r\n")

    smtp("a@remote.test", ["bob@example.test"], b"first for bob")
    time.sleep(0.5)
    smtp("a@remote.test", ["bob@example.test", "friend@elsewhere.test"], b"stays spooled")
    time.sleep(0.5)
    m = imaplib.IMAP4("127.0.0.1", ports["imap"], timeout=20)
    m.login("alice@example.test", "alicepass")
    assert m.create("Work")[0] == "OK"
    assert m.append("INBOX", None, None, b"Subject: appended\r\n\r\nbody\r\n")[0] == "OK"
    assert m.select("INBOX")[0] == "OK"
    assert m.store("1", "+FLAGS", "(\\Deleted)")[0] == "OK"
    assert m.expunge()[0] == "OK"
    assert m.rename("Work", "Archive2")[0] == "OK"
    assert m.delete("Archive2")[0] == "OK"
    m.logout()
    time.sleep(0.2)
    p = poplib.POP3("127.0.0.1", ports["pop3"], timeout=20)
    p.user("bob@example.test")
    p.pass_("bobpass")
    assert len(p.list()[1]) == 2
    p.dele(1)
    p.quit()
    time.sleep(0.3)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin", default=str(ROOT / "target" / "debug" / "postern"))
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="postern-durability."))
    data = work / "data"

    def plaintext(text):
        # Plaintext, trusted IMAP and POP3 listeners: the checker reads the answers in the trace.
        for name in ("imap", "pop3"):
            text = text.replace(
                f'name = "{name}"\nprotocol = "{name}"\naddress = "127.0.0.1:0"\ntls = "starttls"',
                f'name = "{name}"\nprotocol = "{name}"\naddress = "127.0.0.1:0"\ntls = "none"\n'
                "trusted = true")
        # Relaying for loopback clients: the remote recipient keeps its message spooled.
        return text.replace("trusted_networks = []", 'trusted_networks = ["127.0.0.0/8"]')

    config = work / "postern.toml"
    config.write_text(plaintext(test_config(data)))
    assert 'trusted = true' in config.read_text()
    trace = work / "trace.txt"
    proc = subprocess.Popen(
        ["strace", "-f", "-ttt", "-T", "-yy", "-s", "160", "-e", f"trace={SYSCALLS}",
         "-o", str(trace), args.bin, "serve", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=open(work / "postern.log", "wb"))
    ports = {}
    for raw in proc.stdout:
        line = raw.decode().strip()
        if line == "postern: ready":
            break
        m = re.match(r"postern: listening (\S+) \S+:(\d+)$", line)
        if m:
            ports[m.group(1)] = int(m.group(2))
    try:
        scenario(ports)
    finally:
        # The server, not strace, gets the stop (strace would detach and leave it running).
        server_pid = int((data / "postern.pid").read_text().strip())
        os.kill(server_pid, signal.SIGTERM)
        proc.wait(timeout=30)
    calls = parse(trace.read_text(errors="replace"))
    violations, acks, changes, renames, unspools = check(calls, data, ports)
    kinds = {"SMTP": 0, "IMAP": 0, "POP3": 0}
    for _, what in acks:
        kinds[what[:4]] += 1
    print(f"durability: {len(calls)} calls traced; {len(acks)} acknowledgements "
          f"({', '.join(f'{k} {v}' for k, v in kinds.items())}), {len(changes)} directory "
          f"changes, {len(renames)} renames, {len(unspools)} messages unspooled")
    # Nothing checked proves nothing: the scenario's answers must all be in the trace.
    expected = {"SMTP": 2, "IMAP": 8, "POP3": 3}
    short = [k for k, n in expected.items() if kinds[k] < n]
    if short or not unspools or not renames:
        violations.append(f"the trace lacks what the scenario did: {kinds}, "
                          f"{len(unspools)} unspooled, {len(renames)} renames")
    for v in violations:
        print("  " + v, file=sys.stderr)
    rules = 3
    failed = len({v.split()[0] for v in violations})
    print(f"{rules - failed} passed, {failed} failed")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
