//! The `postern` command line.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::config::Config;

#[derive(Parser)]
#[command(
    name = "postern",
    version,
    about = "A WebAssembly-pluggable mail server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the embedded default configuration when --config is not given).
    Serve {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overrides server.data_dir.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// `text` (the default) or `json` (one JSON object per line, for log collectors).
        #[arg(long, value_enum, default_value_t)]
        log_format: crate::telemetry::LogFormat,
    },
    /// Check a configuration file and print what is wrong with it.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Manage users.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Manage plugins of a running server.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// DKIM keys.
    Dkim {
        #[command(subcommand)]
        command: DkimCommand,
    },
}

#[derive(Subcommand)]
enum DkimCommand {
    /// Make an RSA-2048 signing key, write it (mode 0600), and print the DNS TXT record to
    /// publish and the `[[dkim]]` block for the configuration.
    Generate {
        domain: String,
        selector: String,
        /// Where to write the private key (default `dkim-<domain>-<selector>.pem`).
        #[arg(long)]
        key: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Ask the running server to reload its plugins (sends SIGHUP to the pid in the data dir).
    Reload {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Print an argon2id hash for a `[[user]]` entry; reads the password from stdin.
    HashPassword,
}

pub fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("postern: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(path) => Config::load(path)?,
        None => Config::embedded_default(),
    })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            config,
            data_dir,
            log_format,
        } => {
            let config_path = config.clone();
            let mut config = load_config(config.as_ref())?;
            if let Some(dir) = data_dir {
                config.server.data_dir = dir;
            }
            crate::telemetry::init(&config.server.log, log_format);
            // Before the runtime's threads exist, so that they inherit the blocked signals.
            let grace = std::time::Duration::from_secs(config.server.shutdown_grace_secs);
            let pid_file = crate::server::pid_path(&config.server.data_dir);
            let stop = crate::signals::install(grace, move || {
                let _ = std::fs::remove_file(&pid_file);
            });
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let result = runtime.block_on(crate::server::run(config, config_path, stop));
            // A task that never yields must not keep the process alive past the stop.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            result?;
            Ok(())
        }
        Command::CheckConfig { config } => {
            let config = Config::load(&config)?;
            println!(
                "ok: {} listeners, {} users, local domains {}",
                config.listeners.len(),
                config.users.len(),
                config.relay.local_domains.join(", ")
            );
            Ok(())
        }
        Command::Plugin {
            command: PluginCommand::Reload { config, data_dir },
        } => {
            let mut loaded = load_config(config.as_ref())?;
            if let Some(dir) = data_dir {
                loaded.server.data_dir = dir;
            }
            let pid_file = crate::server::pid_path(&loaded.server.data_dir);
            let pid: i32 = std::fs::read_to_string(&pid_file)
                .with_context(|| format!("no running server ({} not found)", pid_file.display()))?
                .trim()
                .parse()
                .context("bad pid file")?;
            // SAFETY: kill(2) with a pid read from our own pid file and a plain signal number.
            let rc = unsafe { libc::kill(pid, libc::SIGHUP) };
            anyhow::ensure!(
                rc == 0,
                "cannot signal pid {pid}: {}",
                std::io::Error::last_os_error()
            );
            println!("reload requested (pid {pid}); see the server log for the result");
            Ok(())
        }
        Command::Dkim {
            command:
                DkimCommand::Generate {
                    domain,
                    selector,
                    key,
                },
        } => {
            let path =
                key.unwrap_or_else(|| PathBuf::from(format!("dkim-{domain}-{selector}.pem")));
            anyhow::ensure!(
                !path.exists(),
                "{} exists; not overwriting a key",
                path.display()
            );
            let (pem, txt) = crate::message_auth::generate_key(&domain, &selector)
                .map_err(|e| anyhow::anyhow!("cannot generate a key: {e}"))?;
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .and_then(|mut f| f.write_all(pem.as_bytes()))
                .with_context(|| format!("cannot write {}", path.display()))?;
            println!("; private key written to {}", path.display());
            println!("; publish this record:");
            println!("{txt}");
            println!();
            println!("; and add to the configuration:");
            println!(
                "[[dkim]]\ndomain = {domain:?}\nselector = {selector:?}\nkey = {:?}",
                path.display().to_string()
            );
            Ok(())
        }
        Command::User {
            command: UserCommand::HashPassword,
        } => {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            let password = line.trim_end_matches(['\r', '\n']);
            anyhow::ensure!(!password.is_empty(), "empty password on stdin");
            let hash = crate::auth::hash_password(password)
                .map_err(|e| anyhow::anyhow!("cannot hash: {e}"))?;
            println!("{hash}");
            Ok(())
        }
    }
}
