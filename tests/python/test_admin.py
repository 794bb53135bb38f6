"""`postern who` and `postern plugin list|reload` against a running server, with real clients
holding sessions open (imaplib, poplib, smtplib) and a plugin whose calls are counted."""

import imaplib
import json
import poplib
import smtplib
import ssl
import subprocess

from conftest import ROOT, Server, postern_bin

TEST_HOOKS = ROOT / "plugins" / "target" / "wasm32-wasip2" / "release" / "test_hooks.wasm"


def plugin_block(rcpt_action):
    # Not watched: each reload here is the one the CLI asked for.
    return ('\n[plugins]\nwatch = false\n'
            f'\n[[plugin]]\nname = "hooks"\npath = "{TEST_HOOKS}"\n'
            f'capabilities = ["config", "kv", "dns"]\n[plugin.config]\nrcpt = "{rcpt_action}"\n')


def cli(server, *args):
    return subprocess.run([postern_bin(), *args, "--config", str(server.config)],
                          capture_output=True, text=True, timeout=60)


def cli_json(server, *args):
    result = cli(server, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_who_lists_open_sessions_with_their_users(tmp_path):
    server = Server(tmp_path, {"trusted_networks": '["127.0.0.0/8"]'})
    context = ssl.create_default_context(cafile=server.cert)
    context.check_hostname = False
    imap = imaplib.IMAP4("127.0.0.1", server.ports["imap"])
    pop = poplib.POP3("127.0.0.1", server.ports["pop3"])
    smtp = smtplib.SMTP("127.0.0.1", server.ports["submission"])
    try:
        imap.starttls(context)
        imap.login("alice@example.test", "alicepass")
        pop.stls(context)
        pop.user("bob@example.test")
        pop.pass_("bobpass")
        smtp.starttls(context=context)
        smtp.ehlo("client.test")  # not logged in
        sessions = cli_json(server, "who")
        by_protocol = {s["protocol"]: s for s in sessions}
        assert sorted(by_protocol) == ["imap", "pop3", "smtp"], sessions
        assert by_protocol["imap"]["user"] == "alice@example.test"
        assert by_protocol["imap"]["listener"] == "imap"
        assert by_protocol["pop3"]["user"] == "bob@example.test"
        assert by_protocol["smtp"]["user"] is None
        assert by_protocol["smtp"]["listener"] == "submission"
        assert by_protocol["imap"]["peer"].startswith("127.0.0.1:")
        ids = [s["id"] for s in sessions]
        assert len(set(ids)) == 3 and ids == sorted(ids), "unique ids, oldest first"
        smtp.login("alice@example.test", "alicepass")
        human = cli(server, "who")
        assert human.returncode == 0 and "-- 3 sessions" in human.stdout, human
        assert human.stdout.count("alice@example.test") == 2, human.stdout
    finally:
        imap.logout()
        pop.quit()
        smtp.quit()
    # Closed sessions leave the list.
    sessions = cli_json(server, "who")
    assert sessions == [], sessions
    server.stop()


def test_plugin_list_counts_calls_and_reload_reports_each_plugin(tmp_path):
    config_path = tmp_path / "postern.toml"
    server = Server(tmp_path, {"trusted_networks": '["127.0.0.0/8"]'},
                    transform=lambda text: text + plugin_block("continue"))
    try:
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
            s.ehlo("client.test")
            for _ in range(3):
                s.sendmail("sender@remote.test", ["alice@example.test"], b"Subject: x\r\n\r\nx\r\n")
        [plugin] = cli_json(server, "plugin", "list")
        assert plugin["name"] == "hooks"
        assert plugin["hooks"] == ["connect", "helo", "auth", "login", "mail-from", "rcpt", "data",
                                   "deliver", "vrfy", "expn", "mailbox-event", "queued", "outbound"]
        assert plugin["capabilities"] == ["config", "kv", "dns"]
        assert len(plugin["digest"]) == 64
        calls = {c["hook"]: c for c in plugin["calls"]}
        assert calls["rcpt"]["calls"] == 3 and calls["rcpt"]["errors"] == 0, calls
        assert calls["connect"]["calls"] == 1 and calls["helo"]["calls"] == 1, calls
        assert 0 < calls["rcpt"]["p50_us"] <= calls["rcpt"]["p99_us"], calls
        human = cli(server, "plugin", "list")
        assert human.returncode == 0 and "rcpt" in human.stdout and "p99" in human.stdout, human

        # Nothing changed: reloaded as unchanged.
        report = cli_json(server, "plugin", "reload")
        assert report == {"loaded": [], "unchanged": ["hooks"], "failed": []}, report
        # A changed configuration: loaded again, and the new action is in force.
        text = config_path.read_text().replace('rcpt = "continue"',
                                               'rcpt = "reject:550:5.7.1:reloaded"')
        config_path.write_text(text)
        report = cli_json(server, "plugin", "reload")
        assert report["loaded"] == ["hooks"] and report["failed"] == [], report
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
            s.ehlo("client.test")
            s.mail("sender@remote.test")
            assert s.rcpt("alice@example.test") == (550, b"5.7.1 reloaded")
        # A plugin file that is not a component: reported, exit status 1, the old one kept.
        broken = tmp_path / "broken.wasm"
        broken.write_bytes(b"not wasm")
        config_path.write_text(text.replace(str(TEST_HOOKS), str(broken)))
        result = cli(server, "plugin", "reload")
        assert result.returncode == 1, result
        assert "hooks: failed, previous version kept" in result.stdout, result.stdout
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
            s.ehlo("client.test")
            s.mail("sender@remote.test")
            assert s.rcpt("alice@example.test")[0] == 550
    finally:
        server.stop()


def test_admin_api_over_https_with_a_bearer_token(tmp_path):
    """curl, a real HTTPS client, against `[admin] address`: the server's certificate, the
    token required and compared, the same requests and answers as the Unix socket."""
    token = "t0ken-" + "x" * 40
    token_file = tmp_path / "admin-token"
    token_file.write_text(token + "\n")

    def with_admin(text):
        return text + f'\n[admin]\naddress = "127.0.0.1:0"\ntoken_file = "{token_file}"\n'

    server = Server(tmp_path, {"trusted_networks": '["127.0.0.0/8"]'}, transform=with_admin)
    url = f"https://localhost:{server.ports['admin']}/v1"

    def curl(body, *extra):
        result = subprocess.run(
            ["curl", "-sS", "--cacert", server.cert, "-w", "\n%{http_code}", "-X", "POST",
             "-H", "Content-Type: application/json", "--data", body, *extra, url],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        text, code = result.stdout.rsplit("\n", 1)
        return int(code), json.loads(text)

    try:
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
            s.sendmail("alice@example.test", ["far@nowhere.test"], b"Subject: q\r\n\r\nq\r\n")
        auth = ("-H", f"Authorization: Bearer {token}")
        code, answer = curl('{"command":"queue-list"}', *auth)
        assert code == 200 and answer["status"] == "ok", answer
        assert [e["recipients"][0]["address"] for e in answer["result"]] == ["far@nowhere.test"]
        code, answer = curl('{"command":"mailbox-status","user":"alice@example.test"}', *auth)
        assert code == 200 and answer["result"]["folders"][0]["name"] == "INBOX", answer
        # Refused: an unknown user (422), no token or a wrong one (401), a bad request (400).
        code, answer = curl('{"command":"mailbox-status","user":"nobody@example.test"}', *auth)
        assert (code, answer["status"]) == (422, "error") and "no such user" in answer["message"]
        code, answer = curl('{"command":"queue-list"}')
        assert code == 401 and answer["status"] == "error", answer
        code, answer = curl('{"command":"queue-list"}', "-H", f"Authorization: Bearer {token}x")
        assert code == 401
        code, answer = curl('{"command":"format-disk"}', *auth)
        assert code == 400 and "not a request" in answer["message"], answer
        # Files on the server are the Unix socket's business.
        code, answer = curl('{"command":"mailbox-export","user":"alice@example.test",'
                            '"folder":"INBOX","format":"mbox","path":"/tmp/x.mbox"}', *auth)
        assert code == 403 and "use the Unix socket" in answer["message"], answer
        assert "refused a request without the right token" in server.log_text()
    finally:
        server.stop()


def test_a_short_admin_token_refuses_the_start(tmp_path):
    token_file = tmp_path / "admin-token"
    token_file.write_text("short\n")
    config = tmp_path / "postern.toml"
    from conftest import test_config
    config.write_text(test_config(tmp_path / "data") +
                      f'\n[admin]\naddress = "127.0.0.1:0"\ntoken_file = "{token_file}"\n')
    result = subprocess.run([postern_bin(), "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "at least 32 characters" in result.stderr, result.stderr
