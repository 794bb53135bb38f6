//! End-to-end harness: starts the real `postern` binary on free loopback ports with a temporary
//! data directory, and a small SMTP client (plain, STARTTLS, implicit TLS) to drive it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

pub mod dns;
pub mod https;
pub mod postgres;
pub mod relay;
pub mod sink;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The binary under test: `$POSTERN_BIN`, or the workspace's debug build.
pub fn postern_bin() -> PathBuf {
    if let Ok(path) = std::env::var("POSTERN_BIN") {
        return PathBuf::from(path);
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("debug/postern")
}

/// A plugin built by `scripts/test` (plugins/target/wasm32-wasip2/release/<name>.wasm).
pub fn plugin_wasm(name: &str) -> PathBuf {
    let dir = std::env::var("POSTERN_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/target/wasm32-wasip2/release")
        });
    let path = dir.join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: build the plugins (scripts/test does)",
        path.display()
    );
    path
}

/// A `[plugins]` section whose compiled-component cache is shared by all test servers (compiling
/// the Python and JavaScript components takes seconds; the cache is keyed by content hash).
pub fn plugins_section(extra: &str) -> String {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugin-cache-tests");
    format!(
        "\n[plugins]\ncache_dir = {:?}\n{extra}\n",
        cache.display().to_string()
    )
}

/// A `[[plugin]]` block to append to a test configuration.
pub fn plugin_block(name: &str, wasm: &str, extra: &str, config: &[(&str, &str)]) -> String {
    let mut block = format!(
        "\n[[plugin]]\nname = {name:?}\npath = {:?}\n{extra}\n[plugin.config]\n",
        plugin_wasm(wasm).display().to_string()
    );
    for (key, value) in config {
        block.push_str(&format!("{key:?} = {value}\n"));
    }
    block
}

/// The embedded default configuration with every listener on port 0 and the given data dir.
pub fn test_config(data_dir: &Path) -> String {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/postern.toml"),
    )
    .expect("examples/postern.toml");
    let mut out = String::new();
    for line in text.lines() {
        let line = if line.starts_with("address = \"127.0.0.1:") {
            "address = \"127.0.0.1:0\"".to_string()
        } else if line.starts_with("data_dir = ") {
            format!("data_dir = {:?}", data_dir.display().to_string())
        } else if line.starts_with("nameservers = ") {
            // Never the machine's resolver: a dead loopback port unless a test serves DNS.
            "nameservers = [\"127.0.0.1:9\"]".to_string()
        } else if line.starts_with("verify_inbound = ") {
            // Origin checks need DNS; the tests about them turn them back on with a test DNS.
            "verify_inbound = false".to_string()
        } else if line.starts_with("log = ") {
            "log = \"info,postern=debug\"".to_string()
        } else {
            line.to_string()
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// Replaces `key = value` under `[section]` (the key must exist in the text).
pub fn set_key(config: &str, section: &str, key: &str, value: &str) -> String {
    let mut in_section = false;
    let mut done = false;
    let mut out = String::new();
    for line in config.lines() {
        if line.starts_with('[') {
            in_section = line.trim() == format!("[{section}]");
        }
        if in_section && !done && line.split('=').next().map(str::trim) == Some(key) {
            out.push_str(&format!("{key} = {value}\n"));
            done = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(done, "no {key} in [{section}]");
    out
}

pub struct TestServer {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub ports: HashMap<String, u16>,
    child: Option<Child>,
    _temp: Option<tempfile::TempDir>,
}

impl TestServer {
    /// Starts a server on a fresh temp dir; `edit` may change the config text.
    pub fn start(edit: impl FnOnce(String) -> String) -> Result<TestServer> {
        let temp = tempfile::tempdir()?;
        let dir = temp.path().to_path_buf();
        let mut server = TestServer::start_in(&dir, edit)?;
        server._temp = Some(temp);
        Ok(server)
    }

    /// Starts a server whose data lives in `dir` (kept by the caller).
    pub fn start_in(dir: &Path, edit: impl FnOnce(String) -> String) -> Result<TestServer> {
        let data_dir = dir.join("data");
        let config_path = dir.join("postern.toml");
        std::fs::write(&config_path, edit(test_config(&data_dir)))?;
        let mut server = TestServer {
            dir: data_dir,
            config_path,
            ports: HashMap::new(),
            child: None,
            _temp: None,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.config_path.with_extension("log"))?;
        let mut child = Command::new(postern_bin())
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", postern_bin().display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        self.ports.clear();
        loop {
            let line = lines
                .next()
                .ok_or_else(|| anyhow!("server exited before ready; log: {}", self.log()))??;
            if line == "postern: ready" {
                break;
            }
            if let Some(rest) = line.strip_prefix("postern: listening ") {
                let (name, addr) = rest
                    .split_once(' ')
                    .ok_or_else(|| anyhow!("bad line {line}"))?;
                let port = addr.rsplit(':').next().unwrap_or("0").parse()?;
                self.ports.insert(name.to_string(), port);
            }
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        self.child = Some(child);
        Ok(())
    }

    pub fn port(&self, listener: &str) -> u16 {
        self.ports[listener]
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.config_path.with_extension("log")).unwrap_or_default()
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("tls/cert.pem")
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn()
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) the process without killing it: a node that is
    /// alive but gets no CPU, as under a long pause.
    pub fn freeze(&self, frozen: bool) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .arg(if frozen { "-STOP" } else { "-CONT" })
                .arg(child.id().to_string())
                .status();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().ok_or_else(|| anyhow!("not running"))?;
        send_sigterm(child.id());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("server did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Messages in a user's INBOX (`new` and `cur`), as (file name, bytes).
    pub fn maildir(&self, user: &str, domain: &str) -> Vec<(String, Vec<u8>)> {
        self.folder(user, domain, "INBOX")
    }

    /// Messages in one folder of a user's mailbox (`INBOX`, or a Maildir++ folder such as
    /// `Quarantine` or `Lists/Rust`), as (file name, bytes), sorted by name.
    pub fn folder(&self, user: &str, domain: &str, folder: &str) -> Vec<(String, Vec<u8>)> {
        let mut base = self.dir.join("mailboxes").join(domain).join(user);
        if folder != "INBOX" {
            base = base.join(format!(".{}", folder.replace('/', ".")));
        }
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            if let Ok(entries) = std::fs::read_dir(base.join(sub)) {
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    out.push((name, std::fs::read(entry.path()).unwrap_or_default()));
                }
            }
        }
        out.sort();
        out
    }

    /// Waits until a user's INBOX holds at least `count` messages.
    pub fn wait_for_mail(&self, user: &str, domain: &str, count: usize) -> Vec<(String, Vec<u8>)> {
        self.wait_for_folder(user, domain, "INBOX", count)
    }

    /// Waits (up to 20 s) until a folder holds at least `count` messages, and returns them.
    pub fn wait_for_folder(
        &self,
        user: &str,
        domain: &str,
        folder: &str,
        count: usize,
    ) -> Vec<(String, Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mail = self.folder(user, domain, folder);
            if mail.len() >= count || Instant::now() > deadline {
                return mail;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ids of messages still in the spool.
    pub fn spooled(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.join("spool/queue"))
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn send_sigterm(pid: u32) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A minimal SMTP client that reports every reply as (code, full text).
pub struct SmtpClient {
    stream: Option<Box<dyn Stream>>,
    buf: Vec<u8>,
}

pub type SmtpReply = (u16, String);

fn tls_connector(cert: &Path) -> Result<tokio_rustls::TlsConnector> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(cert)? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

impl SmtpClient {
    /// Connects and reads the banner.
    pub async fn connect(port: u16) -> Result<(SmtpClient, SmtpReply)> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.set_nodelay(true)?;
        let mut client = SmtpClient {
            stream: Some(Box::new(tcp)),
            buf: Vec::new(),
        };
        let banner = client.reply().await?;
        Ok((client, banner))
    }

    /// Connects with TLS from the first byte (RFC 8314) and reads the banner.
    pub async fn connect_tls(port: u16, cert: &Path) -> Result<(SmtpClient, SmtpReply)> {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
        let name = rustls_pki_types::ServerName::try_from("localhost")?;
        let tls = tls_connector(cert)?.connect(name, tcp).await?;
        let mut client = SmtpClient {
            stream: Some(Box::new(tls)),
            buf: Vec::new(),
        };
        let banner = client.reply().await?;
        Ok((client, banner))
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        let stream = self.stream.as_mut().ok_or_else(|| anyhow!("closed"))?;
        stream.write_all(bytes).await?;
        stream.flush().await?;
        Ok(())
    }

    pub async fn reply(&mut self) -> Result<SmtpReply> {
        let mut text = String::new();
        loop {
            let line = self.line().await?;
            let code: u16 = line
                .get(..3)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| anyhow!("bad reply {line:?}"))?;
            let last = line.as_bytes().get(3) != Some(&b'-');
            text.push_str(&line);
            if last {
                return Ok((code, text));
            }
        }
    }

    async fn line(&mut self) -> Result<String> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Ok(String::from_utf8(line)?);
            }
            let stream = self.stream.as_mut().ok_or_else(|| anyhow!("closed"))?;
            let mut chunk = [0u8; 4096];
            let n =
                tokio::time::timeout(Duration::from_secs(30), stream.read(&mut chunk)).await??;
            if n == 0 {
                bail!("connection closed");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub async fn cmd(&mut self, line: &str) -> Result<SmtpReply> {
        self.send_raw(format!("{line}\r\n").as_bytes()).await?;
        self.reply().await
    }

    /// Sends a command and fails unless the reply code is `code`.
    pub async fn expect(&mut self, line: &str, code: u16) -> Result<String> {
        let (got, text) = self.cmd(line).await?;
        if got != code {
            bail!("{line:?}: expected {code}, got {text:?}");
        }
        Ok(text)
    }

    pub async fn starttls(&mut self, cert: &Path) -> Result<()> {
        self.expect("STARTTLS", 220).await?;
        let stream = self.stream.take().ok_or_else(|| anyhow!("closed"))?;
        let name = rustls_pki_types::ServerName::try_from("localhost")?;
        let tls = tls_connector(cert)?.connect(name, stream).await?;
        self.stream = Some(Box::new(tls));
        Ok(())
    }

    /// Sends a whole message with DATA (dot-stuffing it) and returns the final reply.
    pub async fn data(&mut self, message: &[u8]) -> Result<SmtpReply> {
        let (code, text) = self.cmd("DATA").await?;
        if code != 354 {
            return Ok((code, text));
        }
        let mut stuffed = Vec::with_capacity(message.len() + 16);
        let mut at_line_start = true;
        for &b in message {
            if at_line_start && b == b'.' {
                stuffed.push(b'.');
            }
            stuffed.push(b);
            at_line_start = b == b'\n';
        }
        if !stuffed.ends_with(b"\r\n") {
            stuffed.extend_from_slice(b"\r\n");
        }
        stuffed.extend_from_slice(b".\r\n");
        self.send_raw(&stuffed).await?;
        self.reply().await
    }

    /// Sends MAIL, RCPTs and DATA; returns the queue id from the 250 reply.
    pub async fn send_mail(&mut self, from: &str, to: &[&str], message: &[u8]) -> Result<String> {
        self.expect(&format!("MAIL FROM:<{from}>"), 250).await?;
        for rcpt in to {
            self.expect(&format!("RCPT TO:<{rcpt}>"), 250).await?;
        }
        let (code, text) = self.data(message).await?;
        if code != 250 {
            bail!("DATA: {text:?}");
        }
        text.trim_end()
            .rsplit(' ')
            .next()
            .map(str::to_string)
            .ok_or_else(|| anyhow!("no queue id in {text:?}"))
    }

    /// True once the server has closed the connection (reads until EOF, up to 10 s).
    pub async fn closed(&mut self) -> bool {
        let Some(stream) = self.stream.as_mut() else {
            return true;
        };
        let mut chunk = [0u8; 256];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}
