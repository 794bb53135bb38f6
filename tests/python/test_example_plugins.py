"""The README's "run with plugins" configuration (examples/plugins.toml) as a newcomer runs it:
every shipped plugin loads, and the spam filter refuses GTUBE, quarantines a message its rules
score as spam and marks the rest, with smtplib as the client."""

import re
import smtplib
import time

from conftest import ROOT, Server

PLUGINS = ROOT / "plugins" / "target"


def example(default_text):
    text = (ROOT / "examples" / "plugins.toml").read_text()
    # The test's data directory, as the default configuration was given it.
    data_dir = re.search(r'(?m)^data_dir = .*$', default_text).group(0)
    text = re.sub(r'(?m)^data_dir = .*$', data_dir.replace("\\", "\\\\"), text)
    text = text.replace('address = "127.0.0.1:2525"', 'address = "127.0.0.1:0"')
    text = text.replace('address = "127.0.0.1:2587"', 'address = "127.0.0.1:0"')
    # Paths are relative to the example's own folder.
    text = text.replace('"../plugins/target', f'"{PLUGINS}')
    # Compiled once for every test run (the tests' shared cache).
    text = text.replace('# cache_dir = "/var/cache/postern"',
                        f'cache_dir = "{ROOT / "target" / "plugin-cache-tests"}"')
    # Never the machine's resolver in tests.
    return text + '\n[dns]\nnameservers = ["127.0.0.1:9"]\n\n[mail_auth]\nverify_inbound = false\n'


def test_the_example_runs_every_shipped_plugin(tmp_path):
    server = Server(tmp_path, transform=example)
    try:
        text = server.log_text()
        for name in ("greylist", "spam-filter", "vrfy-policy"):
            assert name in text, text
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"]) as s:
            s.ehlo("client.test")
            gtube = ("Subject: test\r\n\r\n"
                     "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\r\n")
            try:
                s.sendmail("someone@remote.test", ["alice@example.test"], gtube)
                raise AssertionError("GTUBE was accepted")
            except smtplib.SMTPDataError as err:
                assert err.smtp_code == 550 and b"rejected as spam" in err.smtp_error, err
            s.sendmail("winner@prizes.test", ["alice@example.test"],
                       "Subject: Your lottery win\r\n\r\nClaim your prize: send a wire transfer "
                       "fee today.\r\n")
            s.sendmail("colleague@partner.test", ["alice@example.test"],
                       "Subject: Notes\r\n\r\nThe review notes are in the draft.\r\n")
        [(_, ham)] = server.wait_for_mail("alice", 1)
        assert b"X-Spam-Status: No" in ham and b"Subject: Notes" in ham, ham
        deadline = time.time() + 20
        while not server.maildir("alice", folder="Quarantine") and time.time() < deadline:
            time.sleep(0.05)
        [(_, spam)] = server.maildir("alice", folder="Quarantine")
        assert b"X-Spam-Status: Yes, score=8.5" in spam and b"lottery" in spam, spam
    finally:
        server.stop()
