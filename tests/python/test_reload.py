"""`postern reload` (and SIGHUP) against a running server: a new certificate is presented in new
TLS handshakes, a new limit holds for new sessions while sessions opened before keep theirs, a new
alias delivers, a new listener accepts and a removed one stops, what needs a restart is named, and
a broken file changes nothing. Real clients throughout (smtplib, imaplib, ssl)."""

import hashlib
import imaplib
import json
import signal
import smtplib
import socket
import ssl
import subprocess
import time

from conftest import Server, postern_bin

MESSAGE = b"Subject: reload\r\n\r\nhello\r\n"


def reload(server, *extra):
    # By data directory: the file may be broken on purpose.
    return subprocess.run([postern_bin(), "reload", "--data-dir", str(server.data_dir), *extra],
                          capture_output=True, text=True, timeout=60)


def fingerprint(port):
    """SHA-256 of the certificate a new implicit-TLS handshake on `port` presents."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw) as tls:
            return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cert(directory):
    cert, key = directory / "new-cert.pem", directory / "new-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=renewed.example.test", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def rcpt_codes(smtp, count):
    smtp.mail("sender@remote.test")
    codes = [smtp.rcpt("alice@example.test")[0] for _ in range(count)]
    smtp.rset()
    return codes


def test_reload_applies_certificate_limits_aliases_and_listeners(tmp_path):
    server = Server(tmp_path, {"max_recipients": "3"})
    try:
        before = fingerprint(server.ports["imaps"])
        # A session from before the reload, to check it keeps its limit and its connection.
        old_smtp = smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10)
        old_smtp.ehlo("old.test")
        context = ssl.create_default_context(cafile=server.cert)
        context.check_hostname = False
        old_imap = imaplib.IMAP4_SSL("127.0.0.1", server.ports["imaps"], ssl_context=context)
        old_imap.login("alice@example.test", "alicepass")

        cert, key = make_cert(tmp_path)
        new_port = free_port()
        text = server.config.read_text()
        text = text.replace("max_recipients = 3", "max_recipients = 2")
        text = text.replace('# cert = "/etc/postern/cert.pem"', f'cert = "{cert}"')
        text = text.replace('# key = "/etc/postern/key.pem"', f'key = "{key}"')
        text = text.replace('"postmaster@localhost" = "alice@example.test"',
                            '"postmaster@localhost" = "alice@example.test"\n'
                            '"reloaded@example.test" = "bob@example.test"')
        text = text.replace('nameservers = ["127.0.0.1:9"]', 'nameservers = ["127.0.0.1:10"]')
        # A new listener; the plain POP3 one goes.
        text += (f'\n[[listener]]\nname = "imap-extra"\nprotocol = "imap"\n'
                 f'address = "127.0.0.1:{new_port}"\ntls = "none"\n')
        pop3_block = text[text.index('[[listener]]\nname = "pop3"\n'):]
        pop3_block = pop3_block[:pop3_block.index("\n\n") + 2]
        text = text.replace(pop3_block, "")
        server.config.write_text(text)

        result = reload(server, "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert "[tls] certificate (new handshakes)" in report["applied"], report
        assert "[limits] (new sessions)" in report["applied"], report
        assert any(a.startswith("users, aliases and local domains") for a in report["applied"]), report
        assert f"listener imap-extra started on 127.0.0.1:{new_port}" in report["applied"], report
        assert "listener pop3 stopped" in report["applied"], report
        assert report["restart_needed"] == ["[dns]"], report
        assert report["failed"] == [], report

        # New handshakes present the new certificate.
        after = fingerprint(server.ports["imaps"])
        assert after != before
        assert after == hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()
        # The sessions from before are still up, and the old SMTP one keeps its limit of 3.
        assert old_imap.noop()[0] == "OK"
        assert rcpt_codes(old_smtp, 3) == [250, 250, 250]
        # A new session has the new limit.
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
            s.ehlo("new.test")
            assert rcpt_codes(s, 3) == [250, 250, 452]
            s.sendmail("sender@remote.test", ["reloaded@example.test"], MESSAGE)
        assert len(server.wait_for_mail("bob", 1)) == 1, "the new alias delivers"
        # The new listener serves IMAP; the removed one no longer accepts.
        with imaplib.IMAP4("127.0.0.1", new_port) as imap:
            assert imap.noop()[0] == "OK"
        try:
            socket.create_connection(("127.0.0.1", server.ports["pop3"]), timeout=5).close()
            raise AssertionError("the removed pop3 listener still accepts")
        except ConnectionRefusedError:
            pass

        # Again with nothing new: nothing applied, and the restart is still owed.
        result = reload(server)
        assert result.returncode == 0, result
        assert result.stdout == "changed, takes effect after a restart: [dns]\n", result.stdout

        # SIGHUP reloads the same way.
        server.config.write_text(server.config.read_text().replace("max_recipients = 2",
                                                                   "max_recipients = 1"))
        reloads = server.log_text().count("configuration reloaded")
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 10
        while server.log_text().count("configuration reloaded") == reloads:
            assert time.time() < deadline, server.log_text()
            time.sleep(0.1)
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
            s.ehlo("hup.test")
            assert rcpt_codes(s, 2) == [250, 452]

        # A file that no longer parses changes nothing and says why.
        server.config.write_text(server.config.read_text() + "\n[limits\n")
        result = reload(server)
        assert result.returncode == 1, result
        assert "configuration not reloaded" in result.stderr, result.stderr
        with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=10) as s:
            s.ehlo("still.test")
            assert rcpt_codes(s, 2) == [250, 452]
        old_smtp.quit()
        old_imap.logout()
    finally:
        server.stop()
