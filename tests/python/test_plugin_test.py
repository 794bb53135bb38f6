"""`postern plugin test`: the shipped plugins run offline on a message, with no server, and
--expect lines make it a test runner (exit status 0 when every expectation is met, 1 when not)."""

import subprocess

from conftest import ROOT, postern_bin

WASM = ROOT / "plugins" / "target" / "wasm32-wasip2" / "release"


def plugin_test(*args):
    return subprocess.run([postern_bin(), "plugin", "test", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_spam_filter_offline_with_expectations(tmp_path):
    eml = tmp_path / "lottery.eml"
    eml.write_text("From: winner@prizes.test\nSubject: win the lottery\n\n"
                   "Please send a wire transfer today.\n")
    config = 'quarantine_at = 3.0\nrules = ["header:subject:lottery:2.0", "body:wire transfer:1.5"]'
    ok = plugin_test(WASM / "spam_filter.wasm", "--eml", eml, "--config", config,
                     "--expect", "data: pass", "--expect", "data: quarantine (spam score 3.5)",
                     "--expect", "data: +X-Spam-Status: Yes, score=3.5")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "all 3 expectations met" in ok.stdout
    # Only the hooks it exports run.
    assert [line.split()[0] for line in ok.stdout.splitlines()[:3]] == ["data", "data", "data"]
    # The same settings from a file, and an expectation that fails.
    table = tmp_path / "spam.toml"
    table.write_text(config.replace("3.0", "10.0"))
    unmet = plugin_test(WASM / "spam_filter.wasm", "--eml", eml, "--config", table,
                        "--expect", "data: quarantine")
    assert unmet.returncode == 1, unmet
    assert "expected, not seen: data: quarantine" in unmet.stderr
    assert "1 of 1 expectations not met" in unmet.stderr


def test_every_hook_in_order_and_refusals(tmp_path):
    eml = tmp_path / "m.eml"
    eml.write_text("Subject: hi\n\nbody\n")
    out = plugin_test(WASM / "test_hooks.wasm", "--eml", eml,
                      "--config", 'rcpt = "reject:550:5.7.1:not here"\nhelo = "continue"',
                      "--rcpt", "a@example.test", "--rcpt", "b@remote.test",
                      "--expect", "rcpt: refuse 550 5.7.1 not here <b@remote.test>",
                      "--expect", "data: not reached")
    assert out.returncode == 0, out.stdout + out.stderr
    hooks = [line.split()[0] for line in out.stdout.splitlines()[:-1]]
    assert hooks == ["connect", "login", "helo", "mail-from", "rcpt", "rcpt", "data", "queued",
                     "outbound"], out.stdout
    # The stages after the queue: the filter, then the relay's question per remote recipient.
    later = plugin_test(WASM / "test_hooks.wasm", "--eml", eml,
                        "--config", 'queued = "quarantine:odd"\noutbound = "transport:backup"\n'
                                    'outbound-sender = "srs@example.test"',
                        "--rcpt", "a@example.test", "--rcpt", "b@remote.test",
                        "--expect", "queued: quarantine (odd)",
                        "--expect", "outbound: transport backup, sender <srs@example.test> <b@remote.test>")
    assert later.returncode == 0, later.stdout + later.stderr
    assert "<a@example.test>" not in "".join(l for l in later.stdout.splitlines() if l.startswith("outbound"))
    # The SDK's typed config getters read what the host renders.
    typed = plugin_test(WASM / "test_hooks.wasm", "--eml", eml,
                        "--config", 'helo = "echo-table:zones"\nmail-from = "echo-numbers:weights"\n'
                                    'weights = [1.5, 2, 0.25]\n[zones]\n"zen.test" = 3.5\nname = "a, b"',
                        "--expect", "helo: refuse 550 5.7.1 name=a, b zen.test=3.5",
                        "--expect", "mail-from: refuse 550 5.7.1 sum 3.75")
    assert typed.returncode == 0, typed.stdout + typed.stderr
    # A file that is not a component, and a capability it does not get.
    bad = tmp_path / "bad.wasm"
    bad.write_bytes(b"not wasm")
    refused = plugin_test(bad, "--eml", eml)
    assert refused.returncode == 1 and "cannot be loaded" in refused.stderr, refused
    ungranted = plugin_test(WASM / "test_hooks.wasm", "--eml", eml, "--capability", "log")
    assert ungranted.returncode == 1 and "does not grant" in ungranted.stderr, ungranted
