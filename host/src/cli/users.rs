//! `postern user …` and `postern alias …`: the live user directory (`auth::directory`), in
//! `data_dir/directory.toml` or, with `[database] users = true`, in PostgreSQL. A running
//! server (every node, for the database) picks the change up within about a second.

use std::io::{BufRead, IsTerminal};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use clap::Subcommand;

use crate::address::Address;
use crate::auth::directory::{Directory, UserRecord};
use crate::auth::UserDirectory;
use crate::config::Config;

#[derive(Subcommand)]
pub enum UserCommand {
    /// Print an argon2id hash for a `[[user]]` entry; reads the password from stdin.
    HashPassword,
    /// Add a user (the password is read from a prompt, or from stdin when it is not a terminal).
    Add {
        address: String,
        #[arg(long)]
        quota_mb: Option<u64>,
        #[arg(long)]
        quota_messages: Option<u64>,
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    /// Change a user's password (read as for `add`).
    Passwd {
        address: String,
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    /// Remove a user (the mailbox stays; `postern mailbox` commands act on it).
    Del {
        address: String,
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    /// Stop a user's logins (mail is still accepted and stored).
    Disable {
        address: String,
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    /// Let a disabled user log in again.
    Enable {
        address: String,
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    /// Every user: address, quota, state, and where it is defined.
    List {
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    /// One user.
    Show {
        address: String,
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum AliasCommand {
    /// Deliver mail for ALIAS to the user TARGET.
    Add {
        alias: String,
        target: String,
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    Del {
        alias: String,
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    List {
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
}

/// The configured directory (`directory::configured`), with its own connection when it is
/// the database.
fn open(config: &Config) -> anyhow::Result<Arc<dyn Directory>> {
    let store = match &config.database {
        Some(database) if crate::auth::directory::users_in_database(config) => {
            let store = crate::store::postgres::PgStore::connect(&database.url, 1)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if database.migrate {
                store.migrate().map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            Some(Arc::new(store))
        }
        _ => None,
    };
    Ok(crate::auth::directory::configured(config, store))
}

/// A new password: twice at a prompt, or one line of stdin.
fn read_password() -> anyhow::Result<String> {
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ")?;
        let again = rpassword::prompt_password("Again: ")?;
        if first != again {
            bail!("the passwords differ");
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        line.trim_end_matches(['\r', '\n']).to_string()
    };
    if password.is_empty() {
        bail!("empty password");
    }
    Ok(password)
}

fn hash(password: &str) -> anyhow::Result<String> {
    crate::auth::hash_password(password).map_err(|e| anyhow::anyhow!("cannot hash: {e}"))
}

/// A local address the directory may define (not one of the configuration's), in one of the
/// configuration's local domains or the directory's.
fn local_address(
    config: &Config,
    directory: &dyn Directory,
    text: &str,
) -> anyhow::Result<Address> {
    let address = Address::parse(text).with_context(|| format!("{text:?} is not an address"))?;
    let domain = address.domain_lower();
    let users = UserDirectory::from_config(config);
    if !users.is_local_domain(&domain) {
        users.refresh(&directory.load()?);
    }
    if !users.is_local_domain(&domain) {
        bail!("{domain} is not a local domain (relay.local_domains, or `postern domain add`)");
    }
    if users.is_fixed(&address) {
        bail!("{text} is defined in the configuration file; change it there");
    }
    Ok(address)
}

fn find(directory: &dyn Directory, key: &str) -> anyhow::Result<UserRecord> {
    directory
        .load()?
        .users
        .into_iter()
        .find(|u| u.address == key)
        .with_context(|| format!("no user {key} in the directory"))
}

pub fn user(config: Config, command: UserCommand) -> anyhow::Result<()> {
    if let UserCommand::HashPassword = command {
        println!("{}", hash(&read_password()?)?);
        return Ok(());
    }
    let directory = open(&config)?;
    let disable = matches!(command, UserCommand::Disable { .. });
    match command {
        UserCommand::HashPassword => unreachable!("handled above"),
        UserCommand::Add {
            address,
            quota_mb,
            quota_messages,
            ..
        } => {
            let key = local_address(&config, &*directory, &address)?.mailbox_key();
            if directory.load()?.users.iter().any(|u| u.address == key) {
                bail!("{key} exists; `postern user passwd` changes its password");
            }
            let password = hash(&read_password()?)?;
            let outcome = directory.put_user(UserRecord {
                address: key.clone(),
                password,
                quota_mb,
                quota_messages,
                disabled: false,
            })?;
            println!("{key}: {outcome}");
        }
        UserCommand::Passwd { address, .. } => {
            let key = local_address(&config, &*directory, &address)?.mailbox_key();
            let mut user = find(&*directory, &key)?;
            user.password = hash(&read_password()?)?;
            println!("{key}: {}", directory.put_user(user)?);
        }
        UserCommand::Disable { address, .. } | UserCommand::Enable { address, .. } => {
            let key = local_address(&config, &*directory, &address)?.mailbox_key();
            let mut user = find(&*directory, &key)?;
            user.disabled = disable;
            directory.put_user(user)?;
            println!("{key}: {}", if disable { "disabled" } else { "enabled" });
        }
        UserCommand::Del { address, .. } => {
            let key = local_address(&config, &*directory, &address)?.mailbox_key();
            let outcome = directory.remove_user(&key)?;
            println!("{key}: {outcome}");
            if outcome == crate::auth::directory::Outcome::Missing {
                std::process::exit(1);
            }
        }
        UserCommand::List { .. } => {
            for u in &config.users {
                println!("{}\tconfig", u.address.to_ascii_lowercase());
            }
            for u in directory.load()?.users {
                println!("{}", describe(&u));
            }
        }
        UserCommand::Show { address, .. } => {
            let key = Address::parse(&address)
                .with_context(|| format!("{address:?} is not an address"))?
                .mailbox_key();
            if config
                .users
                .iter()
                .any(|u| u.address.eq_ignore_ascii_case(&key))
            {
                println!("{key}\tconfig");
            } else {
                println!("{}", describe(&find(&*directory, &key)?));
            }
        }
    }
    Ok(())
}

/// One line of `user list`: address, where, state, quota.
fn describe(u: &UserRecord) -> String {
    let quota =
        |n: Option<u64>, unit: &str| n.map_or("default".to_string(), |n| format!("{n}{unit}"));
    format!(
        "{}\tdirectory\t{}\tquota {} {}",
        u.address,
        if u.disabled { "disabled" } else { "enabled" },
        quota(u.quota_mb, " MiB"),
        quota(u.quota_messages, " messages"),
    )
}

pub fn alias(config: Config, command: AliasCommand) -> anyhow::Result<()> {
    let directory = open(&config)?;
    match command {
        AliasCommand::Add { alias, target, .. } => {
            let alias = local_address(&config, &*directory, &alias)?.canonical();
            let target =
                Address::parse(&target).with_context(|| format!("{target:?} is not an address"))?;
            let users = UserDirectory::from_config(&config);
            users.refresh(&directory.load()?);
            let Some(user) = users.resolve(&target) else {
                bail!("{target} is not a user");
            };
            println!("{alias} -> {user}: {}", directory.put_alias(&alias, &user)?);
        }
        AliasCommand::Del { alias, .. } => {
            let alias = local_address(&config, &*directory, &alias)?.canonical();
            let outcome = directory.remove_alias(&alias)?;
            println!("{alias}: {outcome}");
            if outcome == crate::auth::directory::Outcome::Missing {
                std::process::exit(1);
            }
        }
        AliasCommand::List { .. } => {
            for (alias, target) in &config.aliases {
                println!("{alias}\t{target}\tconfig");
            }
            for (alias, target) in directory.load()?.aliases {
                println!("{alias}\t{target}\tdirectory");
            }
        }
    }
    Ok(())
}

/// `postern domain …`: local domains beside the configuration's.
#[derive(Subcommand)]
pub enum DomainCommand {
    /// Accept mail for DOMAIN as local (its users and aliases are then added as usual).
    Add {
        domain: String,
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    /// Stop accepting mail for DOMAIN (refused while the directory has users or aliases in it).
    Del {
        domain: String,
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    List {
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
}

pub fn domain(config: Config, command: DomainCommand) -> anyhow::Result<()> {
    let directory = open(&config)?;
    let users = UserDirectory::from_config(&config);
    match command {
        DomainCommand::Add { domain, .. } => {
            let domain = domain.to_ascii_lowercase();
            // A domain name as RFC 5321 §4.1.2 has it: dot-separated letters, digits, hyphens.
            let valid = !domain.is_empty()
                && domain.len() <= 253
                && domain.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if !valid {
                bail!("{domain:?} is not a domain name");
            }
            if users.is_fixed_domain(&domain) {
                bail!("{domain} is in relay.local_domains already");
            }
            println!("{domain}: {}", directory.put_domain(&domain)?);
        }
        DomainCommand::Del { domain, .. } => {
            let domain = domain.to_ascii_lowercase();
            if users.is_fixed_domain(&domain) {
                bail!("{domain} is in relay.local_domains; change it there");
            }
            let entries = directory.load()?;
            let in_domain = |address: &str| {
                address
                    .rsplit_once('@')
                    .is_some_and(|(_, d)| d.eq_ignore_ascii_case(&domain))
            };
            let held = entries
                .users
                .iter()
                .filter(|u| in_domain(&u.address))
                .count()
                + entries.aliases.keys().filter(|a| in_domain(a)).count();
            if held > 0 {
                bail!("{domain} still has {held} users or aliases in the directory: delete them first");
            }
            let outcome = directory.remove_domain(&domain)?;
            println!("{domain}: {outcome}");
            if outcome == crate::auth::directory::Outcome::Missing {
                std::process::exit(1);
            }
        }
        DomainCommand::List { .. } => {
            for domain in &config.relay.local_domains {
                println!("{domain}\tconfig");
            }
            for domain in directory.load()?.domains {
                println!("{domain}\tdirectory");
            }
        }
    }
    Ok(())
}

impl DomainCommand {
    pub fn config(&self) -> Option<&std::path::PathBuf> {
        match self {
            DomainCommand::Add { config, .. }
            | DomainCommand::Del { config, .. }
            | DomainCommand::List { config } => config.as_ref(),
        }
    }
}

impl UserCommand {
    pub fn config(&self) -> Option<&std::path::PathBuf> {
        match self {
            UserCommand::HashPassword => None,
            UserCommand::Add { config, .. }
            | UserCommand::Passwd { config, .. }
            | UserCommand::Del { config, .. }
            | UserCommand::Disable { config, .. }
            | UserCommand::Enable { config, .. }
            | UserCommand::List { config }
            | UserCommand::Show { config, .. } => config.as_ref(),
        }
    }
}

impl AliasCommand {
    pub fn config(&self) -> Option<&std::path::PathBuf> {
        match self {
            AliasCommand::Add { config, .. }
            | AliasCommand::Del { config, .. }
            | AliasCommand::List { config } => config.as_ref(),
        }
    }
}
