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
        assert plugin["hooks"] == ["connect", "helo", "auth", "mail-from", "rcpt", "data",
                                   "deliver", "vrfy", "expn"]
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
