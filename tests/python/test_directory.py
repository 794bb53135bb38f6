"""The live user directory through the CLI while the server runs (`postern user …`, `postern
alias …`, kept in data_dir/directory.toml): users added, changed, disabled and removed log in
or are refused within seconds, without a restart; aliases deliver; the configuration's users
cannot be changed from it."""

import imaplib
import smtplib
import ssl
import subprocess
import time

from conftest import postern_bin


def cli(server, *args, password=None):
    return subprocess.run([postern_bin(), *args, "--config", str(server.config)],
                          input=(password + "\n") if password else "", capture_output=True,
                          text=True, timeout=60)


def login(server, user, password):
    m = imaplib.IMAP4(server.host, server.ports["imap"], timeout=10)
    context = ssl.create_default_context(cafile=server.cert)
    context.check_hostname = False
    m.starttls(ssl_context=context)
    try:
        m.login(user, password)
        m.logout()
        return True
    except imaplib.IMAP4.error:
        return False


def eventually(check, seconds=5):
    """Whether check() becomes true within the time (the server looks once a second)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return check()


def test_users_added_changed_disabled_and_removed_while_running(server):
    carol = "carol@example.test"
    out = cli(server, "user", "add", carol, "--quota-mb", "10", password="first pass")
    assert out.returncode == 0 and "added" in out.stdout, out.stderr
    assert eventually(lambda: login(server, carol, "first pass"))
    assert "user directory reloaded" in server.log_text()
    listed = cli(server, "user", "list").stdout
    assert f"{carol}\tdirectory\tenabled\tquota 10 MiB" in listed
    assert "alice@example.test\tconfig" in listed
    # A second add is refused: passwd changes the password.
    assert cli(server, "user", "add", carol, password="x").returncode != 0
    assert cli(server, "user", "passwd", carol, password="second pass").returncode == 0
    assert eventually(lambda: login(server, carol, "second pass"))
    assert not login(server, carol, "first pass")

    assert cli(server, "user", "disable", carol).returncode == 0
    assert eventually(lambda: not login(server, carol, "second pass"))
    # Disabled is not deleted: mail is still accepted and stored.
    with smtplib.SMTP(server.host, server.ports["smtp"]) as s:
        assert s.sendmail("sender@remote.test", [carol],
                          b"Subject: while disabled\r\n\r\nstill here\r\n") == {}
    assert cli(server, "user", "enable", carol).returncode == 0
    assert eventually(lambda: login(server, carol, "second pass"))
    assert eventually(lambda: len(server.maildir("carol")) == 1)

    out = cli(server, "alias", "add", "c.smith@example.test", carol)
    assert out.returncode == 0, out.stderr
    time.sleep(1.5)
    with smtplib.SMTP(server.host, server.ports["smtp"]) as s:
        assert s.sendmail("sender@remote.test", ["c.smith@example.test"],
                          b"Subject: by alias\r\n\r\nfor carol\r\n") == {}
    assert eventually(lambda: len(server.maildir("carol")) == 2)
    assert b"for carol" in sorted(server.maildir("carol"))[-1][1]

    assert cli(server, "user", "del", carol).returncode == 0
    assert eventually(lambda: not login(server, carol, "second pass"))
    with smtplib.SMTP(server.host, server.ports["smtp"]) as s:
        s.ehlo()
        s.mail("sender@remote.test")
        code, _ = s.rcpt(carol)
        assert code == 550
    assert cli(server, "user", "del", carol).returncode == 1


def test_configuration_users_and_foreign_domains_are_refused(server):
    out = cli(server, "user", "passwd", "alice@example.test", password="new")
    assert out.returncode != 0 and "configuration file" in out.stderr
    out = cli(server, "user", "add", "dave@elsewhere.test", password="pw")
    assert out.returncode != 0 and "local_domains" in out.stderr
    out = cli(server, "alias", "add", "x@example.test", "nobody@example.test")
    assert out.returncode != 0 and "not a user" in out.stderr
    assert login(server, "alice@example.test", "alicepass")


def test_disabling_a_user_ends_its_open_sessions(server):
    """Disabling stops logins at once and ends the user's open IMAP (idle or not) and POP3
    sessions; other users' sessions stay."""
    import poplib
    carol = "carol@example.test"
    assert cli(server, "user", "add", carol, password="pw").returncode == 0
    assert eventually(lambda: login(server, carol, "pw"))
    context = ssl.create_default_context(cafile=server.cert)
    context.check_hostname = False

    def imap_session(user, password):
        m = imaplib.IMAP4(server.host, server.ports["imap"], timeout=10)
        m.starttls(ssl_context=context)
        m.login(user, password)
        m.select("INBOX")
        return m

    idle = imap_session(carol, "pw")
    tag = idle._new_tag().decode()
    idle.send(f"{tag} IDLE\r\n".encode())
    assert idle.readline().startswith(b"+ ")
    busy = imap_session(carol, "pw")
    other = imap_session("alice@example.test", "alicepass")
    pop = poplib.POP3(server.host, server.ports["pop3"], timeout=10)
    pop.stls(context=context)
    pop.user(carol)
    pop.pass_("pw")

    assert cli(server, "user", "disable", carol).returncode == 0
    assert idle.readline() == b"* BYE Account disabled\r\n"
    assert busy.readline() == b"* BYE Account disabled\r\n"
    assert pop.file.readline() == b"-ERR [AUTH] Account disabled\r\n"
    assert other.noop()[0] == "OK"
    other.logout()
    assert not login(server, carol, "pw")


def test_a_domain_added_while_running_receives_mail(server):
    """`postern domain add`: mail for the new domain is refused before and delivered after, to
    a user added in it; the domain cannot go while it has users; the configuration's domains
    cannot be edited from the CLI."""
    carol = "carol@new.test"

    def rcpt(address):
        with smtplib.SMTP(server.host, server.ports["smtp"], timeout=10) as s:
            s.ehlo("client.test")
            s.mail("sender@remote.test")
            return s.rcpt(address)

    # Not local yet: an unauthenticated client may not relay to it.
    relay_refused = rcpt(carol)
    assert relay_refused[0] // 100 == 5 and b"no such user" not in relay_refused[1], relay_refused
    assert cli(server, "user", "add", carol, password="pw").returncode != 0
    out = cli(server, "domain", "add", "New.Test")
    assert out.returncode == 0 and "new.test: added" in out.stdout, out.stderr
    assert cli(server, "domain", "add", "example.test").returncode != 0
    assert cli(server, "domain", "add", "not a domain").returncode != 0
    listed = cli(server, "domain", "list").stdout
    assert "example.test\tconfig" in listed and "new.test\tdirectory" in listed
    assert eventually(lambda: b"no such user" in rcpt("nobody@new.test")[1])
    assert cli(server, "user", "add", carol, password="carol pass").returncode == 0
    assert eventually(lambda: rcpt(carol)[0] == 250)
    with smtplib.SMTP(server.host, server.ports["smtp"], timeout=10) as s:
        assert s.sendmail("sender@remote.test", [carol],
                          b"Subject: new domain\r\n\r\nwelcome\r\n") == {}
    deadline = time.time() + 10
    while time.time() < deadline and not server.maildir("carol", "new.test"):
        time.sleep(0.1)
    stored = server.maildir("carol", "new.test")
    assert len(stored) == 1 and stored[0][1].endswith(b"welcome\n")
    assert login(server, carol, "carol pass")
    # Not while it has users; then it goes, and mail for it is refused again.
    out = cli(server, "domain", "del", "new.test")
    assert out.returncode != 0 and "users or aliases" in out.stderr
    assert cli(server, "user", "del", carol).returncode == 0
    assert cli(server, "domain", "del", "new.test").returncode == 0
    assert eventually(lambda: rcpt(carol) == relay_refused)
    assert cli(server, "domain", "del", "example.test").returncode != 0
