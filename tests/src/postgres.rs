//! A PostgreSQL cluster of a test's own: `initdb` in a temporary directory, started with
//! `pg_ctl` on a free loopback port as the unprivileged `postgres` user (Debian's package, which
//! `scripts/setup` installs), stopped when dropped. Nothing is assumed running.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

/// Debian's server binaries (`/usr/lib/postgresql/<version>/bin`), the newest there is.
fn server_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (scripts/setup installs it)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    found.sort();
    found.pop().expect("an initdb under /usr/lib/postgresql")
}

/// A server program, run as `postgres` when this process is root (PostgreSQL refuses root).
fn command(bin: &Path, program: &str) -> Command {
    let path = bin.join(program);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { geteuid() == 0 }
}

fn run(bin: &Path, program: &str, args: &[&str]) {
    let out = command(bin, program)
        .args(args)
        .output()
        .expect("run a PostgreSQL program");
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

extern "C" {
    fn geteuid() -> u32;
}

impl Cluster {
    pub fn start() -> Cluster {
        let bin = server_bin();
        let dir = tempfile::Builder::new()
            .prefix("postern-pg.")
            .tempdir()
            .expect("temp dir");
        if is_root() {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success());
        }
        let data = dir.path().join("data");
        let data = data.to_str().expect("utf-8 path");
        run(
            &bin,
            "initdb",
            &[
                "-D",
                data,
                "-A",
                "trust",
                "-U",
                "postern",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            listener.local_addr().expect("address").port()
        };
        let cluster = Cluster { dir, bin, port };
        cluster.restart();
        cluster
    }

    /// Starts the server (again, after [`Cluster::stop`]) on the same port and data.
    pub fn restart(&self) {
        let data = self.dir.path().join("data");
        let socket_dir = self.dir.path().to_str().expect("utf-8 path").to_string();
        let log = self.dir.path().join("postgres.log");
        let options = format!(
            "-p {} -k {socket_dir} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port
        );
        run(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                data.to_str().expect("utf-8"),
                "-o",
                &options,
                "-l",
                log.to_str().expect("utf-8"),
                "-w",
                "start",
            ],
        );
    }

    /// A connection URL for the cluster's default database.
    pub fn url(&self) -> String {
        format!("postgres://postern@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server at once (as a crash would) or cleanly.
    pub fn stop(&self, immediate: bool) {
        let data = self.dir.path().join("data");
        let mode = if immediate { "immediate" } else { "fast" };
        run(
            &self.bin,
            "pg_ctl",
            &[
                "-D",
                data.to_str().expect("utf-8"),
                "-m",
                mode,
                "-w",
                "stop",
            ],
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = command(&self.bin, "pg_ctl")
            .args([
                "-D",
                data.to_str().unwrap_or_default(),
                "-m",
                "immediate",
                "stop",
            ])
            .output();
    }
}
