"""Starts the real postern binary on free loopback ports with a temporary data directory."""

import os
import pathlib
import re
import resource
import signal
import subprocess
import threading
import time

import pytest

import pg

ROOT = pathlib.Path(__file__).resolve().parents[2]

# The abuse tests open a thousand connections: as many descriptors as the hard limit allows, for
# this process and the servers it starts (they inherit it).
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft < _hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))


def postern_bin():
    if os.environ.get("POSTERN_BIN"):
        return os.environ["POSTERN_BIN"]
    target = os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))
    return os.path.join(target, "debug", "postern")


def test_config(data_dir, edits=None, transform=None):
    """The embedded default with port-0 listeners, the given data dir, optional key edits and an
    optional function applied to the text last."""
    text = (ROOT / "examples" / "postern.toml").read_text()
    text = re.sub(r'(?m)^address = "127\.0\.0\.1:\d+"', 'address = "127.0.0.1:0"', text)
    text = re.sub(r'(?m)^data_dir = .*$', f'data_dir = "{data_dir}"', text)
    # Origin checks (SPF/DKIM/DMARC) need DNS; the Rust tests cover them with a test DNS server.
    text = re.sub(r'(?m)^verify_inbound = .*$', 'verify_inbound = false', text)
    # Never the machine's resolver: remote domains get a temporary DNS failure and stay queued.
    text = re.sub(r'(?m)^nameservers = .*$', 'nameservers = ["127.0.0.1:9"]', text)
    for key, value in (edits or {}).items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        assert n == 1, key
    return transform(text) if transform else text


MAILBOX_LOG = ROOT / "plugins" / "target" / "wasm32-wasip2" / "release" / "mailbox_log.wasm"


def with_backend(backend, transform=None, database_url=None, database_users=False,
                 database_kv=False, database_queue=False):
    """A config transform that also stores example.test's mailboxes in `backend` ("maildir",
    the embedded default, "mailbox-log", the shipped Wasm backend, or "postgres", the database
    at `database_url`)."""
    def apply(text):
        text = transform(text) if transform else text
        if backend == "postgres":
            # A shared queue needs every local domain's mailboxes in the database.
            domains = '["example.test", "localhost"]' if database_queue else '["example.test"]'
            text += (f'\n[database]\nurl = "{database_url}"\n'
                     f'domains = {domains}\nmigrate = true\n')
            if database_queue:
                text += "queue = true\nlease_seconds = 3\n"
            if database_users:
                text += "users = true\n"
            if database_kv:
                text += "kv = true\n"
        if backend == "mailbox-log":
            text += (
                '\n[[mailbox_backend]]\nname = "mailbox-log"\n'
                f'path = "{MAILBOX_LOG}"\ndomains = ["example.test"]\n'
            )
        return text
    return apply


def _encode(text):
    """The mailbox-log backend's file name encoding (plugins/mailbox-log/src/names.rs)."""
    return "".join(
        chr(b) if chr(b).isalnum() and b < 128 or chr(b) in "@-_+" else f"%{b:02X}"
        for b in text.encode()
    )


# Maildir's letters for the system flags, in the backend's bit order (seen, answered, flagged,
# deleted, draft, forwarded), so tests can read either store the same way.
_LETTERS = [(1, "S"), (2, "R"), (4, "F"), (8, "T"), (16, "D"), (32, "P")]


def read_mailbox_log(folder_dir):
    """The messages of a mailbox-log folder as Maildir would show them: (name, bytes with LF
    endings), the name `<received>.<uid>:2,<flag letters>`."""
    current = folder_dir / "current"
    if not current.exists():
        return []
    generation = current.read_text().strip()
    data = (folder_dir / f"messages.{generation}").read_bytes()
    messages = {}
    for line in (folder_dir / f"index.{generation}").read_text().split("\n"):
        f = line.split(" ")
        if f[0] == "A" and len(f) == 9:
            uid, offset, size = int(f[1]), int(f[2]), int(f[3])
            messages[uid] = [f[4], int(f[6]), data[offset:offset + size]]
        elif f[0] == "F" and len(f) == 5 and int(f[1]) in messages:
            messages[int(f[1])][1] = int(f[3])
        elif f[0] == "X" and len(f) == 3:
            messages.pop(int(f[1]), None)
    out = []
    for uid, (received, bits, content) in sorted(messages.items()):
        letters = "".join(sorted(l for bit, l in _LETTERS if bits & bit))
        out.append((f"{received}.{uid}:2,{letters}", content.replace(b"\r\n", b"\n")))
    return out


class Server:
    def __init__(self, tmp_path, edits=None, transform=None, backend="maildir", cluster=None,
                 database=None, host="127.0.0.1", database_users=False, database_kv=False,
                 database_queue=False):
        """`cluster` (a pg.Cluster) for the postgres backend, with `database` to share one
        between servers (a fresh one otherwise); `host` is the loopback address listened on."""
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.backend = backend
        self.cluster = cluster
        self.database = database or (cluster.new_database() if backend == "postgres" else None)
        self.data_dir = tmp_path / "data"
        self.config = tmp_path / "postern.toml"
        url = cluster.url(self.database) if self.database else None
        text = test_config(self.data_dir, edits,
                           with_backend(backend, transform, url, database_users, database_kv,
                                        database_queue))
        text = re.sub(r'(?m)^address = "127\.0\.0\.1:0"', f'address = "{host}:0"', text)
        self.host = host
        self.config.write_text(text)
        self.log = open(tmp_path / "postern.log", "wb")
        self.proc = subprocess.Popen(
            [postern_bin(), "serve", "--config", str(self.config)],
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        self.ports = {}
        deadline = time.time() + 30
        for raw in self.proc.stdout:
            line = raw.decode().strip()
            if line == "postern: ready":
                break
            m = re.match(r"postern: listening (\S+) \S+:(\d+)$", line)
            if m:
                self.ports[m.group(1)] = int(m.group(2))
            assert time.time() < deadline, "server did not start"
        assert self.ports, "server exited before ready"
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        self.cert = str(self.data_dir / "tls" / "cert.pem")

    def maildir(self, user, domain="example.test", folder="INBOX"):
        """A folder as stored: (Maildir file name, bytes with LF endings)."""
        if self.backend == "postgres" and domain == "example.test":
            return self._database_folder(f"{user}@{domain}", folder)
        if self.backend == "mailbox-log" and domain == "example.test":
            root = self.data_dir / "mailbox-backends" / "mailbox-log"
            return read_mailbox_log(root / _encode(f"{user}@{domain}") / f"f.{_encode(folder)}")
        base = self.data_dir / "mailboxes" / domain / user
        if folder != "INBOX":
            base = base / ("." + folder.replace("/", "."))
        out = []
        for sub in ("new", "cur"):
            d = base / sub
            if d.exists():
                out += [(p.name, p.read_bytes()) for p in sorted(d.iterdir())]
        return out

    def _database_folder(self, mailbox, folder):
        """A folder in the database, named as read_mailbox_log names them."""
        rows = self.cluster.sql(self.database, f"""
            SELECT m.received_at, m.uid, m.flags, encode(m.prepend || b.bytes, 'hex')
            FROM messages m JOIN bodies b ON b.id = m.body JOIN folders f ON f.id = m.folder
            JOIN mailboxes x ON x.id = f.mailbox
            WHERE x.name = '{mailbox}' AND f.name = '{folder}' ORDER BY m.uid""")
        out = []
        for received, uid, bits, content in rows:
            letters = "".join(sorted(l for bit, l in _LETTERS if int(bits) & bit))
            out.append((f"{received}.{uid}:2,{letters}",
                        bytes.fromhex(content).replace(b"\r\n", b"\n")))
        return out

    def uid_index(self, user, domain="example.test"):
        """(UIDVALIDITY, UIDs) of the user's INBOX as the store's index keeps them."""
        if self.backend == "postgres":
            rows = self.cluster.sql(self.database, f"""
                SELECT f.uid_validity, m.uid FROM folders f JOIN mailboxes x ON x.id = f.mailbox
                LEFT JOIN messages m ON m.folder = f.id
                WHERE x.name = '{user}@{domain}' AND f.name = 'INBOX' ORDER BY m.uid""")
            return int(rows[0][0]), [int(r[1]) for r in rows if r[1]]
        if self.backend == "mailbox-log":
            folder = (self.data_dir / "mailbox-backends" / "mailbox-log"
                      / _encode(f"{user}@{domain}") / "f.INBOX")
            generation = (folder / "current").read_text().strip()
            lines = [l.split(" ") for l in (folder / f"index.{generation}").read_text().splitlines()]
            validity = next(int(f[1]) for f in lines if f[0] == "V")
            gone = {int(f[1]) for f in lines if f[0] == "X"}
            return validity, [int(f[1]) for f in lines if f[0] == "A" and int(f[1]) not in gone]
        index = (self.data_dir / "mailboxes" / domain / user / "postern-uidlist").read_text().splitlines()
        validity = int(re.search(r" V(\d+) ", index[0]).group(1))
        return validity, [int(line.split()[0]) for line in index[1:]]

    def wait_for_mail(self, user, count, domain="example.test"):
        deadline = time.time() + 20
        while time.time() < deadline:
            mail = self.maildir(user, domain)
            if len(mail) >= count:
                return mail
            time.sleep(0.02)
        return self.maildir(user, domain)

    def log_text(self):
        """What the server has logged so far."""
        self.log.flush()
        return pathlib.Path(self.log.name).read_text(errors="replace")

    def spooled(self):
        d = self.data_dir / "spool" / "queue"
        return sorted(os.listdir(d)) if d.exists() else []

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.log.close()


@pytest.fixture
def backend():
    """Where the test server keeps mailboxes; the IMAP and POP3 tests run on every backend
    (their modules override this fixture with parameters)."""
    return "maildir"


@pytest.fixture(scope="session")
def pg_cluster():
    """One PostgreSQL cluster for the whole run; each server gets a database of its own."""
    cluster = pg.Cluster()
    yield cluster
    cluster.close()


def _cluster_for(request, backend):
    return request.getfixturevalue("pg_cluster") if backend == "postgres" else None


@pytest.fixture
def server(tmp_path, backend, request):
    s = Server(tmp_path, backend=backend, cluster=_cluster_for(request, backend))
    yield s
    s.stop()


@pytest.fixture
def make_server(tmp_path, backend, request):
    made = []
    cluster = _cluster_for(request, backend)

    def make(transform=None, **edits):
        s = Server(tmp_path / f"s{len(made)}", edits, transform, backend, cluster)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()
