//! VRFY and EXPN policy.
//!
//! Authenticated users, and clients in `allowed_networks`, get real answers: VRFY resolves an
//! address through the server's user directory (aliases and +details included), EXPN expands a
//! list from the `lists` table. Everyone else gets 252 for both and learns nothing: not whether a
//! user exists, nor whether a list does.
//!
//! ```toml
//! [[plugin]]
//! name = "vrfy-policy"
//! path = "plugins/vrfy_policy.wasm"
//! capabilities = ["config", "directory", "log"]
//! [plugin.config]
//! allowed_networks = ["127.0.0.0/8"]
//! [plugin.config.lists]
//! staff = ["alice@example.test", "bob@example.test"]
//! ```

use postern_plugin_sdk::types::{LookupAnswer, Mailbox, Session};
use postern_plugin_sdk::{config, config_list, directory, ip_in};

postern_plugin_sdk::plugin!(VrfyPolicy);

struct VrfyPolicy;

fn trusted(session: &Session) -> bool {
    session.user.is_some()
        || config_list("allowed_networks")
            .iter()
            .any(|net| ip_in(&session.peer_ip, net))
}

/// `alice`, `<alice@example.test>`, `Alice <alice@example.test>` → the address part.
fn address_in(query: &str) -> String {
    let query = query.trim();
    match (query.rfind('<'), query.rfind('>')) {
        (Some(start), Some(end)) if start < end => query[start + 1..end].trim().to_string(),
        _ => query.to_string(),
    }
}

impl exports::postern::plugin0_1_0::vrfy::Guest for VrfyPolicy {
    fn on_vrfy(session: Session, query: String) -> LookupAnswer {
        if !trusted(&session) {
            return LookupAnswer::CannotVerify;
        }
        let address = address_in(&query);
        if !address.contains('@') {
            // A bare name could be a user in any local domain: not worth guessing.
            return LookupAnswer::CannotVerify;
        }
        match directory::resolve(&address) {
            Some(user) => LookupAnswer::Found(vec![Mailbox {
                address: user,
                display_name: None,
            }]),
            None => LookupAnswer::NotFound,
        }
    }
}

impl exports::postern::plugin0_1_0::expn::Guest for VrfyPolicy {
    fn on_expn(session: Session, list: String) -> LookupAnswer {
        if !trusted(&session) {
            return LookupAnswer::CannotVerify;
        }
        let name = address_in(&list).to_lowercase();
        let name = name.split('@').next().unwrap_or_default().to_string();
        if config::get(&format!("lists.{name}")).is_none() {
            return LookupAnswer::NotFound;
        }
        let members = config_list(&format!("lists.{name}"));
        LookupAnswer::Found(
            members
                .into_iter()
                .map(|address| Mailbox {
                    address,
                    display_name: None,
                })
                .collect(),
        )
    }
}
