//! The hook table: one line per hook, from which the stage list, the discovery of a component's
//! exports and the per-instance function handles are all made.
//!
//! Adding a hook: its interface in the WIT, a line here, its arguments in [`super::chain::Hook`]
//! (or a call of its own for hooks that take a message) and the arm that calls it in
//! `chain::invoke`.

use wasmtime::component::{Instance, InstancePre};
use wasmtime::Store;

use super::bindings::hooks;
use super::host::PluginState;

macro_rules! hook_table {
    ($( $stage:ident => $name:literal, $module:ident; )*) => {
        /// The hook stages, one per exported interface.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Stage {
            $( $stage, )*
        }

        impl Stage {
            pub const ALL: &'static [Stage] = &[$( Stage::$stage, )*];

            /// The hook's name as the WIT interface spells it (logs and metric labels).
            pub fn name(self) -> &'static str {
                match self {
                    $( Stage::$stage => $name, )*
                }
            }
        }

        /// Where each hook's functions are in a component; None for hooks it does not export.
        #[derive(Default)]
        pub struct HookIndices {
            $( pub $module: Option<hooks::$module::GuestIndices>, )*
        }

        impl HookIndices {
            pub fn discover(pre: &InstancePre<PluginState>) -> HookIndices {
                HookIndices {
                    $( $module: hooks::$module::GuestIndices::new(pre).ok(), )*
                }
            }

            pub fn has(&self, stage: Stage) -> bool {
                match stage {
                    $( Stage::$stage => self.$module.is_some(), )*
                }
            }
        }

        /// An instance's hook exports, looked up once per instance (None for hooks it does not
        /// export).
        pub struct Guests {
            $( pub $module: Option<hooks::$module::Guest>, )*
        }

        impl Guests {
            pub fn load(
                indices: &HookIndices,
                store: &mut Store<PluginState>,
                instance: &Instance,
            ) -> wasmtime::Result<Guests> {
                Ok(Guests {
                    $( $module: indices
                        .$module
                        .as_ref()
                        .map(|i| i.load(&mut *store, instance))
                        .transpose()?, )*
                })
            }
        }
    };
}

hook_table! {
    Connect => "connect", connect;
    Helo => "helo", helo;
    Auth => "auth", auth;
    Login => "login", login;
    MailFrom => "mail-from", mail_from;
    Rcpt => "rcpt", rcpt;
    Data => "data", data;
    Deliver => "deliver", deliver;
    Vrfy => "vrfy", vrfy;
    Expn => "expn", expn;
    MailboxEvent => "mailbox-event", mailbox_event;
    Queued => "queued", queued;
    Outbound => "outbound", outbound;
}

impl HookIndices {
    pub fn names(&self) -> Vec<&'static str> {
        Stage::ALL
            .iter()
            .filter(|s| self.has(**s))
            .map(|s| s.name())
            .collect()
    }
}
