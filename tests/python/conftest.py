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


class Server:
    def __init__(self, tmp_path, edits=None, transform=None):
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.data_dir = tmp_path / "data"
        self.config = tmp_path / "postern.toml"
        self.config.write_text(test_config(self.data_dir, edits, transform))
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

    def maildir(self, user, domain="example.test"):
        base = self.data_dir / "mailboxes" / domain / user
        out = []
        for sub in ("new", "cur"):
            d = base / sub
            if d.exists():
                out += [(p.name, p.read_bytes()) for p in sorted(d.iterdir())]
        return out

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
def server(tmp_path):
    s = Server(tmp_path)
    yield s
    s.stop()


@pytest.fixture
def make_server(tmp_path):
    made = []

    def make(transform=None, **edits):
        s = Server(tmp_path / f"s{len(made)}", edits, transform)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()
