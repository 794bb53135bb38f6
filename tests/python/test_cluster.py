"""Several nodes sharing mailboxes, queue and users through one PostgreSQL database
(`[database]`, `queue = true`): three servers on 127.0.0.2-4, each with its own data directory
(TLS key), one database. Mail sent to one node is read from the others byte for byte, IDLE on
one node is woken by a delivery on another, a flag set through one node is seen through
another, and a user added through one node logs in on the others."""

import imaplib
import poplib
import smtplib
import ssl
import time

import pytest

from conftest import Server

ALICE = ("alice@example.test", "alicepass")


@pytest.fixture
def nodes(tmp_path, pg_cluster):
    database = pg_cluster.new_database()
    made = []
    for n in (2, 3, 4):
        made.append(Server(tmp_path / f"node{n}", backend="postgres", cluster=pg_cluster,
                           database=database, host=f"127.0.0.{n}", database_users=True,
                           database_queue=True))
    yield made
    for s in made:
        s.stop()


def tls(node):
    context = ssl.create_default_context(cafile=node.cert)
    # Each node's certificate is its own, made for its hostname, not for 127.0.0.N.
    context.check_hostname = False
    return context


def imap(node, user=ALICE):
    m = imaplib.IMAP4(node.host, node.ports["imap"], timeout=10)
    m.starttls(ssl_context=tls(node))
    assert m.login(*user)[0] == "OK"
    return m


def send(node, body):
    message = (b"From: Sender <sender@remote.test>\r\nTo: alice@example.test\r\n"
               b"Subject: cluster\r\nMessage-ID: <" + body[:8] + b"@remote.test>\r\n\r\n" + body)
    with smtplib.SMTP(node.host, node.ports["smtp"]) as s:
        assert s.sendmail("sender@remote.test", ["alice@example.test"], message) == {}
    return message


def wait_stored(node, count):
    deadline = time.time() + 20
    while time.time() < deadline:
        mail = node.maildir("alice")
        if len(mail) >= count:
            return mail
        time.sleep(0.05)
    raise AssertionError("not delivered")


def test_sent_to_one_node_read_from_the_others(nodes):
    a, b, c = nodes
    sent = send(a, b"First through node 2.\r\n")
    stored = wait_stored(a, 1)[0][1].replace(b"\n", b"\r\n")
    assert stored.endswith(sent)
    m = imap(b)
    assert m.select("INBOX") == ("OK", [b"1"])
    typ, data = m.uid("FETCH", "1", "(BODY.PEEK[])")
    assert typ == "OK" and data[0][1] == stored
    m.logout()
    p = poplib.POP3(c.host, c.ports["pop3"], timeout=10)
    p.stls(context=tls(c))
    p.user(ALICE[0])
    p.pass_(ALICE[1])
    _, lines, _ = p.retr(1)
    assert b"\r\n".join(lines) + b"\r\n" == stored
    p.quit()


def test_idle_on_one_node_woken_by_a_delivery_on_another(nodes):
    a, _, c = nodes
    m = imap(c)
    m.select("INBOX")
    tag = m._new_tag().decode()
    m.send(f"{tag} IDLE\r\n".encode())
    assert m.readline().startswith(b"+ ")
    send(a, b"Wake the other node.\r\n")
    # Timed from when the message is in the database, not from the SMTP reply.
    wait_stored(a, 1)
    committed = time.time()
    assert m.readline() == b"* 1 EXISTS\r\n"
    assert time.time() - committed < 1.0
    m.send(b"DONE\r\n")
    while not (line := m.readline()).startswith(tag.encode()):
        pass
    assert b"OK" in line
    m.logout()


def test_flags_and_folders_changed_through_one_node_seen_through_another(nodes):
    a, b, c = nodes
    send(a, b"Flag me.\r\n")
    wait_stored(a, 1)
    watcher = imap(c)
    watcher.select("INBOX")
    changer = imap(b)
    changer.select("INBOX")
    assert changer.uid("STORE", "1", "+FLAGS", r"(\Flagged)")[0] == "OK"
    assert changer.create("Projects")[0] == "OK"
    deadline = time.time() + 2
    seen = []
    while time.time() < deadline and not any(b"\\Flagged" in x for x in seen if x):
        typ, _ = watcher.noop()
        seen = watcher.untagged_responses.pop("FETCH", [])
        time.sleep(0.05)
    assert any(b"\\Flagged" in x for x in seen if x), seen
    typ, folders = watcher.list()
    assert any(b"Projects" in f for f in folders)
    watcher.logout()
    changer.logout()


def test_database_outage_defers_delivery_and_loses_nothing(tmp_path):
    """PostgreSQL stopped at once (as a crash would) with mail arriving: what SMTP acknowledged
    waits in the node's spool, IMAP answers with a temporary error, and when the database is
    back every acknowledged message is in the mailbox exactly once, with nobody's help."""
    import pg
    cluster = pg.Cluster()
    node = Server(tmp_path / "node", edits={"retry_schedule": '["1s"]'}, backend="postgres",
                  cluster=cluster)
    try:
        sent = [send(node, b"before the outage\r\n")]
        wait_stored(node, 1)
        cluster.stop(immediate=True)
        for n in range(5):
            sent.append(send(node, f"during the outage {n}\r\n".encode()))
        m = imap(node)
        typ, data = m.select("INBOX")
        assert typ == "NO" and b"[UNAVAILABLE]" in data[0], data
        m.logout()
        cluster.start()
        deadline = time.time() + 30
        while time.time() < deadline and len(node.maildir("alice")) < len(sent):
            time.sleep(0.2)
        stored = [content.replace(b"\n", b"\r\n") for _, content in node.maildir("alice")]
        assert len(stored) == len(sent)
        for message in sent:
            assert sum(s.endswith(message) for s in stored) == 1
        while time.time() < deadline and node.spooled():
            time.sleep(0.1)  # the spool entry goes once the delivery is recorded
        assert node.spooled() == []
        m = imap(node)
        assert m.select("INBOX") == ("OK", [str(len(sent)).encode()])
        m.logout()
    finally:
        node.stop()
        cluster.close()


def test_db_migrate_creates_the_schema_once(tmp_path, pg_cluster):
    """`postern db migrate` brings an empty database to the current schema version; run again
    it changes nothing."""
    import subprocess
    from conftest import postern_bin, test_config, with_backend
    database = pg_cluster.new_database()
    config = tmp_path / "postern.toml"
    config.write_text(test_config(tmp_path / "data", None,
                                  with_backend("postgres", None, pg_cluster.url(database))))
    for _ in range(2):
        out = subprocess.run([postern_bin(), "db", "migrate", "--config", str(config)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "schema at version 7"
    assert pg_cluster.sql(database, "SELECT version FROM schema_version ORDER BY 1") == [
        ["1"], ["2"], ["3"], ["4"], ["5"], ["6"], ["7"]]
    tables = {r[0] for r in pg_cluster.sql(
        database, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"mailboxes", "folders", "bodies", "messages", "deliveries", "metadata", "users",
            "aliases", "directory_version", "kv", "kv_usage", "queue", "domains"} <= tables


def test_a_user_added_through_one_node_logs_in_on_the_others(nodes):
    import subprocess
    from conftest import postern_bin
    a, b, c = nodes
    carol = ("carol@example.test", "carol's pass")
    out = subprocess.run([postern_bin(), "user", "add", carol[0], "--config", str(a.config)],
                         input=carol[1] + "\n", capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for node in (b, c):
        deadline = time.time() + 5
        while True:
            try:
                imap(node, carol).logout()
                break
            except imaplib.IMAP4.error:
                assert time.time() < deadline, "the user never reached the node"
                time.sleep(0.2)
    # And receives mail through any node, read through another.
    with smtplib.SMTP(c.host, c.ports["smtp"]) as s:
        assert s.sendmail("sender@remote.test", [carol[0]],
                          b"Subject: hi\r\n\r\nfor carol\r\n") == {}
    deadline = time.time() + 20
    while time.time() < deadline and not b.maildir("carol"):
        time.sleep(0.1)
    m = imap(b, carol)
    assert m.select("INBOX") == ("OK", [b"1"])
    m.logout()


def test_a_domain_added_through_one_node_receives_mail_on_the_others(nodes):
    """`postern domain add` on one node: every node accepts the domain's mail, and its
    mailboxes are the database's (the directory is), read through any node."""
    import subprocess
    from conftest import postern_bin
    a, b, c = nodes
    dana = ("dana@joined.test", "dana's pass")

    def cli(*args, password=None):
        out = subprocess.run([postern_bin(), *args, "--config", str(a.config)],
                             input=(password + "\n") if password else "", capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    cli("domain", "add", "joined.test")
    cli("user", "add", dana[0], password=dana[1])
    deadline = time.time() + 5
    while True:
        with smtplib.SMTP(c.host, c.ports["smtp"]) as s:
            s.ehlo("client.test")
            s.mail("sender@remote.test")
            if s.rcpt(dana[0])[0] == 250:
                assert s.data(b"Subject: joined\r\n\r\nfor dana\r\n")[0] == 250
                break
        assert time.time() < deadline, "the domain never reached the node"
        time.sleep(0.2)
    deadline = time.time() + 20
    while True:
        m = imap(b, dana)
        if m.select("INBOX") == ("OK", [b"1"]):
            break
        m.logout()
        assert time.time() < deadline, "not stored in the database"
        time.sleep(0.1)
    typ, data = m.fetch("1", "(BODY.PEEK[TEXT])")
    assert typ == "OK" and data[0][1] == b"for dana\r\n"
    m.logout()
    assert b.database and a.cluster.sql(
        a.database, "SELECT count(*) FROM mailboxes WHERE name = 'dana@joined.test'") == [["1"]]

GREYLIST = """
[[plugin]]
name = "greylist"
path = "{path}"
capabilities = ["config", "kv", "clock", "log"]
[plugin.config]
delay_secs = 1
retry_window_secs = 600
pass_ttl_secs = 600
whitelist_networks = []
ip_limit = 0
sender_limit = 0
rate_window_secs = 60
"""


def test_greylisting_holds_across_nodes_with_shared_kv(tmp_path, pg_cluster):
    """With `[database] kv = true` the greylist plugin's triplets are in the database: a
    sender greylisted by one node passes on another after the delay (with per-node kv it would
    be greylisted again there)."""
    from conftest import ROOT
    wasm = ROOT / "plugins" / "target" / "wasm32-wasip2" / "release" / "greylist.wasm"
    database = pg_cluster.new_database()
    nodes = [Server(tmp_path / f"node{n}", backend="postgres", cluster=pg_cluster,
                    database=database, host=f"127.0.0.{n}", database_kv=True,
                    transform=lambda text: text + GREYLIST.format(path=wasm))
             for n in (2, 3)]
    try:
        a, b = nodes
        message = b"Subject: grey\r\n\r\nretried elsewhere\r\n"
        with smtplib.SMTP(a.host, a.ports["smtp"]) as s:
            s.ehlo()
            s.mail("sender@remote.test")
            code, reply = s.rcpt("alice@example.test")
            assert code == 451 and b"4.7.1" in reply, reply
        time.sleep(1.5)
        with smtplib.SMTP(b.host, b.ports["smtp"]) as s:
            assert s.sendmail("sender@remote.test", ["alice@example.test"], message) == {}
        assert wait_stored(b, 1)[0][1].replace(b"\n", b"\r\n").endswith(message)
        rows = pg_cluster.sql(database, "SELECT count(*) FROM kv WHERE namespace = 'greylist'")
        assert int(rows[0][0]) >= 1
    finally:
        for n in nodes:
            n.stop()
