"""The Prometheus endpoint (`[metrics] address`): scraped over HTTP before and after real traffic
(smtplib, imaplib, poplib) and parsed with the Prometheus project's own OpenMetrics parser, each
counter must have moved by exactly what the traffic did."""

import imaplib
import poplib
import smtplib
import ssl
import time
import urllib.error
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families

from conftest import ROOT, Server

TEST_HOOKS = ROOT / "plugins" / "target" / "wasm32-wasip2" / "release" / "test_hooks.wasm"


def with_metrics(text):
    # The test-hooks plugin passes everything but panics at HELO/EHLO; on_error = "continue"
    # lets the session go on, so each EHLO is one plugin call and one plugin error.
    return text + (
        '\n[metrics]\naddress = "127.0.0.1:0"\n'
        f'\n[[plugin]]\nname = "hooks"\npath = "{TEST_HOOKS}"\non_error = "continue"\n'
        'capabilities = ["config", "kv", "dns"]\n[plugin.config]\nhelo = "panic"\n')


def scrape(server):
    url = f"http://127.0.0.1:{server.ports['metrics']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0)


def moved(before, after, name, **labels):
    return value(after, name, **labels) - value(before, name, **labels)


def test_counters_follow_smtp_imap_pop3_and_plugin_traffic(tmp_path):
    server = Server(tmp_path, {"trusted_networks": '["127.0.0.0/8"]'}, transform=with_metrics)
    try:
        before = scrape(server)
        assert value(before, "postern_queue_messages") == 0

        message = b"Subject: counted\r\n\r\nhello\r\n"
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
            s.ehlo("client.test")
            for _ in range(3):
                s.sendmail("sender@remote.test", ["alice@example.test"], message)
            s.mail("sender@remote.test")
            assert s.rcpt("nobody@example.test")[0] == 550
            s.rset()
            # Remote mail that cannot be delivered (the tests' DNS never answers) stays queued.
            s.sendmail("alice@example.test", ["far@nowhere.test"], message)

        context = ssl.create_default_context(cafile=server.cert)
        context.check_hostname = False
        with imaplib.IMAP4("127.0.0.1", server.ports["imap"]) as imap:
            imap.starttls(context)
            try:
                imap.login("alice@example.test", "wrong")
                raise AssertionError("a wrong password logged in")
            except imaplib.IMAP4.error:
                pass
            imap.login("alice@example.test", "alicepass")
            imap.logout()
        with imaplib.IMAP4("127.0.0.1", server.ports["imap"]) as imap:
            imap.starttls(context)
        pop = poplib.POP3("127.0.0.1", server.ports["pop3"])
        pop.stls(context)
        pop.user("bob@example.test")
        pop.pass_("bobpass")
        pop.quit()

        # Deliveries run after the 250; wait for them to be counted.
        deadline = time.time() + 15
        while True:
            after = scrape(server)
            done = moved(before, after, "postern_deliveries_total", route="local", status="sent")
            if (done == 3 and value(after, "postern_queue_messages") == 1) or time.time() > deadline:
                break
            time.sleep(0.1)
        assert moved(before, after, "postern_connections_total", protocol="smtp") == 1
        assert moved(before, after, "postern_connections_total", protocol="imap") == 2
        assert moved(before, after, "postern_connections_total", protocol="pop3") == 1
        # Closed sessions are no longer open.
        assert value(after, "postern_sessions", protocol="imap") == 0
        assert moved(before, after, "postern_smtp_replies_total", command="ehlo", code="250", reason="none") == 1
        assert moved(before, after, "postern_smtp_replies_total", command="data", code="250", reason="2.0") == 4
        assert moved(before, after, "postern_smtp_replies_total", command="rcpt", code="550", reason="5.1") == 1
        assert moved(before, after, "postern_smtp_replies_total", command="quit", code="221", reason="2.0") == 1
        assert moved(before, after, "postern_messages_accepted_total") == 4
        assert moved(before, after, "postern_received_bytes_total") >= 4 * len(message)
        assert moved(before, after, "postern_tls_handshakes_total", result="ok") == 3
        assert moved(before, after, "postern_logins_total", protocol="imap", result="accepted") == 1
        assert moved(before, after, "postern_logins_total", protocol="imap", result="refused") == 1
        assert moved(before, after, "postern_logins_total", protocol="pop3", result="accepted") == 1
        assert moved(before, after, "postern_plugin_calls_total", plugin="hooks", hook="helo") == 1
        assert moved(before, after, "postern_plugin_errors_total", plugin="hooks", hook="helo") == 1
        # The unknown local recipient is refused before any plugin is asked.
        assert moved(before, after, "postern_plugin_calls_total", plugin="hooks", hook="rcpt") == 4
        assert moved(before, after, "postern_plugin_errors_total", plugin="hooks", hook="rcpt") == 0
        assert moved(before, after, "postern_plugin_call_seconds_count", plugin="hooks", hook="data") == 4
        # Three local deliveries done; the remote one deferred and still queued.
        assert moved(before, after, "postern_deliveries_total", route="local", status="sent") == 3
        assert value(after, "postern_queue_messages") == 1
        # Store calls of every backend are counted where they pass: deliveries (batched, so
        # one call may carry several) and POP3's listing of bob's maildrop.
        assert moved(before, after, "postern_store_operations_total", op="deliver", result="ok") >= 1
        assert moved(before, after, "postern_store_operations_total", op="snapshot", result="ok") >= 1
        assert moved(before, after, "postern_store_operation_seconds_count", op="deliver") == \
            moved(before, after, "postern_store_operations_total", op="deliver", result="ok")
        assert value(after, "postern_queue_oldest_seconds") >= 0

        # Only GET /metrics is served.
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{server.ports['metrics']}/", timeout=10)
            raise AssertionError("/ answered")
        except urllib.error.HTTPError as err:
            assert err.code == 404
    finally:
        server.stop()
