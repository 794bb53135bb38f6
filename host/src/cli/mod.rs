//! The `postern` command line.

mod admin;
mod mailbox;
mod plugin_new;
mod plugin_test;
mod users;

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
    /// Users of the live directory (and a hash for a `[[user]]` entry).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Aliases of the live directory.
    Alias {
        #[command(subcommand)]
        command: AliasCommand,
    },
    /// Local domains of the live directory, beside relay.local_domains.
    Domain {
        #[command(subcommand)]
        command: DomainCommand,
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
    /// Mailboxes in their stores.
    Mailbox {
        #[command(subcommand)]
        command: MailboxCommand,
    },
    /// The delivery queue of a running server.
    Queue {
        #[command(subcommand)]
        command: admin::QueueCommand,
    },
    /// Make a running server take its configuration file again: limits, TLS certificate,
    /// listeners, users, aliases, local domains, plugins and the rest that can change live;
    /// what needs a restart is named. Exit status 1 when something could not be applied.
    Reload {
        #[command(flatten)]
        target: admin::Target,
        #[arg(long)]
        json: bool,
    },
    /// The open SMTP, POP3 and IMAP sessions of a running server.
    Who {
        #[command(flatten)]
        target: admin::Target,
        #[arg(long)]
        json: bool,
    },
    /// End a user's open IMAP and POP3 sessions on a running server.
    Kick {
        user: String,
        #[command(flatten)]
        target: admin::Target,
    },
    /// The PostgreSQL database (`[database]`).
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
}

#[derive(Subcommand)]
enum DbCommand {
    /// Create the schema, or bring it to this version (versioned migrations, run once each).
    Migrate {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum MailboxCommand {
    #[command(flatten)]
    Live(mailbox::LiveCommand),
    /// Copy mailboxes from one store to another (the embedded `maildir`, `postgres` for
    /// `[database]`, or a `[[mailbox_backend]]` by name), keeping UIDVALIDITY, UIDs, flags, keywords, dates,
    /// subscriptions and annotations, so clients keep their caches. Run it with the server
    /// stopped, then point the domain at the new store (`domains = [...]`) and start it.
    /// Running it again copies only what is missing.
    Migrate {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        /// Mailboxes (`alice@example.test`); every configured user when none is given.
        users: Vec<String>,
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
    /// The loaded plugins: digest, hooks, capabilities, and calls, errors, p50 and p99 time
    /// per hook since the server started.
    List {
        #[command(flatten)]
        target: admin::Target,
        #[arg(long)]
        json: bool,
    },
    /// Run a plugin's hooks offline on a message, as the server would call them, and print
    /// each decision, edit and time; --expect lines make it a test (exit status 1 when unmet).
    Test(plugin_test::PluginTest),
    /// Make a plugin project (Rust, Python or JavaScript) that builds to a component with one
    /// command and passes `postern plugin test` (its `./test`) as made.
    New(plugin_new::PluginNew),
    /// Reload the plugins from the configuration file (as SIGHUP does) and print what came of
    /// each; exit status 1 when one failed to load (its previous version keeps running).
    Reload {
        #[command(flatten)]
        target: admin::Target,
        #[arg(long)]
        json: bool,
    },
}

use users::{AliasCommand, DomainCommand, UserCommand};

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
        Command::Plugin { command } => match command {
            PluginCommand::List { target, json } => admin::plugin_list(&target, json),
            PluginCommand::Reload { target, json } => admin::plugin_reload(&target, json),
            PluginCommand::Test(test) => plugin_test::run(test),
            PluginCommand::New(new) => plugin_new::run(new),
        },
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
        Command::Mailbox {
            command: MailboxCommand::Live(command),
        } => mailbox::run(command),
        Command::Mailbox {
            command:
                MailboxCommand::Migrate {
                    config,
                    from,
                    to,
                    users,
                },
        } => migrate(load_config(config.as_ref())?, &from, &to, users),
        Command::Db {
            command: DbCommand::Migrate { config },
        } => {
            let config = load_config(config.as_ref())?;
            let database = config
                .database
                .context("the configuration has no [database]")?;
            let store = crate::store::postgres::PgStore::connect(&database.url, 1)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let version = store.migrate().map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("schema at version {version}");
            Ok(())
        }
        Command::Queue { command } => admin::queue(command),
        Command::Kick { user, target } => admin::kick(&user, &target),
        Command::Who { target, json } => admin::who(&target, json),
        Command::Reload { target, json } => admin::reload(&target, json),
        Command::User { command } => {
            let config = load_config(command.config())?;
            users::user(config, command)
        }
        Command::Alias { command } => {
            let config = load_config(command.config())?;
            users::alias(config, command)
        }
        Command::Domain { command } => {
            let config = load_config(command.config())?;
            users::domain(config, command)
        }
    }
}

/// `postern mailbox migrate`: opens both stores as the server would and copies mailbox by
/// mailbox, with a progress bar on stderr.
fn migrate(config: Config, from: &str, to: &str, users: Vec<String>) -> anyhow::Result<()> {
    use crate::store::MailStore;
    use std::sync::Arc;
    anyhow::ensure!(from != to, "--from and --to name the same store");
    let data_dir = config.server.data_dir.clone();
    crate::durable::create_dir_all(&data_dir)
        .with_context(|| format!("cannot use {}", data_dir.display()))?;
    // The server's own lock: no migration under a running server, and no server during one.
    let _lock = crate::durable::DirectoryLock::acquire(&crate::server::pid_path(&data_dir))
        .map_err(|err| match err {
            crate::durable::LockError::Held { pid } => anyhow::anyhow!(
                "a server (pid {pid}) is running on {}: stop it first",
                data_dir.display()
            ),
            crate::durable::LockError::Io(e) => {
                anyhow::anyhow!("cannot lock the data directory: {e}")
            }
        })?;
    let engine = crate::plugin::engine::build(&config.plugins)
        .map_err(|e| anyhow::anyhow!("cannot start the Wasm engine: {e}"))?;
    let users_dir = Arc::new(crate::auth::UserDirectory::from_config(&config));
    let open = |name: &str| -> anyhow::Result<Arc<dyn MailStore>> {
        if name == "maildir" {
            return Ok(Arc::new(crate::store::maildir::Maildir::new(
                data_dir.join("mailboxes"),
                &config.server.hostname,
            )));
        }
        if name == "postgres" {
            let database = config
                .database
                .as_ref()
                .context("--from/--to postgres needs a [database]")?;
            let store = crate::store::postgres::PgStore::connect(&database.url, 4)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            store.migrate().map_err(|e| anyhow::anyhow!("{e}"))?;
            return Ok(Arc::new(store));
        }
        let backend = config
            .mailbox_backends
            .iter()
            .find(|b| b.name == name)
            .with_context(|| {
                format!("no store {name:?}: give maildir or a [[mailbox_backend]] name")
            })?;
        let store = crate::store::wasm::WasmStore::new(
            backend,
            &config.plugins,
            engine.clone(),
            &data_dir,
            users_dir.clone(),
        )
        .map_err(|e| anyhow::anyhow!("mailbox_backend {name:?} did not load: {e}"))?;
        Ok(Arc::new(store))
    };
    let (source, target) = (open(from)?, open(to)?);
    let mailboxes: Vec<String> = if users.is_empty() {
        config
            .users
            .iter()
            .map(|u| u.address.to_ascii_lowercase())
            .collect()
    } else {
        users.iter().map(|u| u.to_ascii_lowercase()).collect()
    };
    let style = indicatif::ProgressStyle::with_template(
        "{prefix:>28} [{bar:30}] {bytes}/{total_bytes} {msg}",
    )
    .expect("progress template")
    .progress_chars("=> ");
    let mut total = crate::store::migrate::Copied::default();
    for mailbox in &mailboxes {
        let size = crate::store::migrate::size(&*source, mailbox)
            .with_context(|| format!("{mailbox}: cannot read {from}"))?;
        let bar = indicatif::ProgressBar::new(size.bytes).with_style(style.clone());
        bar.set_prefix(mailbox.clone());
        let copied = crate::store::migrate::mailbox(&*source, &*target, mailbox, &mut |p| {
            bar.set_position(p.bytes);
            bar.set_message(format!("{} messages, {}", p.messages, p.folder));
        })
        .with_context(|| {
            format!("{mailbox}: migration from {from} to {to} stopped (run it again to resume)")
        })?;
        bar.finish_with_message(format!(
            "{} messages in {} folders",
            copied.messages, copied.folders
        ));
        total.folders += copied.folders;
        total.messages += copied.messages;
        total.bytes += copied.bytes;
    }
    println!(
        "migrated {} mailboxes from {from} to {to}: {} folders, {} messages, {} bytes",
        mailboxes.len(),
        total.folders,
        total.messages,
        total.bytes
    );
    Ok(())
}
