//! `postern plugin new NAME --lang rust|python|js [--hooks rcpt,data]`: a plugin project that
//! builds to a component with one command and passes `postern plugin test` as written.
//!
//! The project carries its own copy of the WIT contract (`wit/deps/`), taken from this binary,
//! so it builds against exactly the contract the server that made it implements. Each hook it
//! is asked for answers `continue`, except data, which adds an `X-NAME: seen` field so that the
//! generated test has something to check.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::Args;

const WIT_0_2_0: &str = include_str!("../../../wit/plugin.wit");
const WIT_0_1_0: &str = include_str!("../../../wit/deps/postern-plugin-0.1.0/plugin.wit");

#[derive(Args)]
pub struct PluginNew {
    /// The plugin's name (letters, digits and `-`); also the project's folder.
    name: String,
    #[arg(long, value_parser = ["rust", "python", "js"])]
    lang: String,
    /// Hooks to export, comma-separated (connect, helo, auth, login, mail-from, rcpt, data,
    /// queued, deliver, vrfy, expn).
    #[arg(long, value_delimiter = ',', default_value = "rcpt,data")]
    hooks: Vec<String>,
    /// Where to make the project (default: ./NAME).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Rust only: the postern-plugin-sdk crate (default: the one in the source tree this binary
    /// was built from).
    #[arg(long)]
    sdk: Option<PathBuf>,
}

/// One hook: its WIT interface and how each language spells its stub.
struct HookStub {
    name: &'static str,
    version: &'static str,
    rust: &'static str,
    python_class: &'static str,
    python: &'static str,
    js: &'static str,
}

const HOOKS: &[HookStub] = &[
    HookStub {
        name: "connect",
        version: "0.1.0",
        rust: "fn on_connect(_session: Session) -> Decision {\n        Decision::Continue\n    }",
        python_class: "Connect",
        python: "def on_connect(self, session):\n        return types.Decision_Continue()",
        js: "onConnect(session) {\n    return { tag: \"continue\" };\n  }",
    },
    HookStub {
        name: "helo",
        version: "0.1.0",
        rust: "fn on_helo(_session: Session, _name: String, _extended: bool) -> Decision {\n        Decision::Continue\n    }",
        python_class: "Helo",
        python: "def on_helo(self, session, name, extended):\n        return types.Decision_Continue()",
        js: "onHelo(session, name, extended) {\n    return { tag: \"continue\" };\n  }",
    },
    HookStub {
        name: "auth",
        version: "0.1.0",
        rust: "fn on_auth(_session: Session, _mechanism: String, _user: String) -> Decision {\n        Decision::Continue\n    }",
        python_class: "Auth",
        python: "def on_auth(self, session, mechanism, user):\n        return types.Decision_Continue()",
        js: "onAuth(session, mechanism, user) {\n    return { tag: \"continue\" };\n  }",
    },
    HookStub {
        name: "login",
        version: "0.2.0",
        rust: "fn on_login(\n        _session: Session,\n        _protocol: exports::postern::plugin0_2_0::login::Protocol,\n        _mechanism: String,\n        _user: String,\n    ) -> Decision {\n        Decision::Continue\n    }",
        python_class: "Login",
        python: "def on_login(self, session, protocol, mechanism, user):\n        return types.Decision_Continue()",
        js: "onLogin(session, protocol, mechanism, user) {\n    return { tag: \"continue\" };\n  }",
    },
    HookStub {
        name: "mail-from",
        version: "0.1.0",
        rust: "fn on_mail_from(_session: Session, _sender: String, _size: u64) -> Decision {\n        Decision::Continue\n    }",
        python_class: "MailFrom",
        python: "def on_mail_from(self, session, sender, size):\n        return types.Decision_Continue()",
        js: "onMailFrom(session, sender, size) {\n    return { tag: \"continue\" };\n  }",
    },
    HookStub {
        name: "rcpt",
        version: "0.1.0",
        rust: "fn on_rcpt(_session: Session, _sender: String, _recipient: String, _local: bool) -> Decision {\n        Decision::Continue\n    }",
        python_class: "Rcpt",
        python: "def on_rcpt(self, session, sender, recipient, local):\n        return types.Decision_Continue()",
        js: "onRcpt(session, sender, recipient, local) {\n    return { tag: \"continue\" };\n  }",
    },
    HookStub {
        name: "data",
        version: "0.1.0",
        rust: "fn on_data(_session: Session, _envelope: Envelope, _message: &Message) -> DataVerdict {\n        DataVerdict {\n            decision: DataDecision::Continue,\n            modifications: vec![Modification::AddHeader(HeaderField {\n                name: \"X-@NAME@\".into(),\n                value: \"seen\".into(),\n            })],\n        }\n    }",
        python_class: "Data",
        python: "def on_data(self, session, envelope, message):\n        field = types.HeaderField(name=\"X-@NAME@\", value=\"seen\")\n        return types.DataVerdict(decision=types.DataDecision_Continue(),\n                                 modifications=[types.Modification_AddHeader(field)])",
        js: "onData(session, envelope, message) {\n    return {\n      decision: { tag: \"continue\" },\n      modifications: [{ tag: \"add-header\", val: { name: \"X-@NAME@\", value: \"seen\" } }],\n    };\n  }",
    },
    HookStub {
        name: "queued",
        version: "0.2.0",
        rust: "fn on_queued(_envelope: Envelope, _message: &Message) -> exports::postern::plugin0_2_0::queued::QueuedVerdict {\n        exports::postern::plugin0_2_0::queued::QueuedVerdict {\n            decision: exports::postern::plugin0_2_0::queued::QueuedDecision::Continue,\n            modifications: vec![],\n        }\n    }",
        python_class: "Queued",
        python: "def on_queued(self, envelope, message):\n        return queued.QueuedVerdict(decision=queued.QueuedDecision_Continue(), modifications=[])",
        js: "onQueued(envelope, message) {\n    return { decision: { tag: \"continue\" }, modifications: [] };\n  }",
    },
    HookStub {
        name: "deliver",
        version: "0.1.0",
        rust: "fn on_deliver(_envelope: Envelope, _target: DeliveryTarget, _message: &Message) -> Delivery {\n        Delivery::Continue\n    }",
        python_class: "Deliver",
        python: "def on_deliver(self, envelope, target, message):\n        return types.Delivery_Continue()",
        js: "onDeliver(envelope, target, message) {\n    return { tag: \"continue\" };\n  }",
    },
    HookStub {
        name: "vrfy",
        version: "0.1.0",
        rust: "fn on_vrfy(_session: Session, _query: String) -> LookupAnswer {\n        LookupAnswer::Continue\n    }",
        python_class: "Vrfy",
        python: "def on_vrfy(self, session, query):\n        return types.LookupAnswer_Continue()",
        js: "onVrfy(session, query) {\n    return { tag: \"continue\" };\n  }",
    },
    HookStub {
        name: "expn",
        version: "0.1.0",
        rust: "fn on_expn(_session: Session, _name: String) -> LookupAnswer {\n        LookupAnswer::Continue\n    }",
        python_class: "Expn",
        python: "def on_expn(self, session, name):\n        return types.LookupAnswer_Continue()",
        js: "onExpn(session, name) {\n    return { tag: \"continue\" };\n  }",
    },
];

pub fn run(args: PluginNew) -> anyhow::Result<()> {
    let name = args.name.as_str();
    if name.is_empty()
        || !name.starts_with(|c: char| c.is_ascii_lowercase())
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        || name.ends_with('-')
        || name.contains("--")
    {
        bail!("a plugin name is lower-case letters, digits and single dashes, starting with a letter (WIT's rule): {name:?}");
    }
    let mut hooks = Vec::new();
    for wanted in &args.hooks {
        let Some(hook) = HOOKS.iter().find(|h| h.name == wanted.trim()) else {
            let known: Vec<&str> = HOOKS.iter().map(|h| h.name).collect();
            bail!("unknown hook {wanted:?} (one of {})", known.join(", "));
        };
        if !hooks.iter().any(|h: &&HookStub| h.name == hook.name) {
            hooks.push(hook);
        }
    }
    if hooks.is_empty() {
        bail!("--hooks names no hook");
    }
    let dir = args.dir.clone().unwrap_or_else(|| PathBuf::from(name));
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
        bail!("{} exists and is not empty", dir.display());
    }
    let project = Project {
        name,
        dir: &dir,
        hooks: &hooks,
    };
    let build = match args.lang.as_str() {
        "rust" => project.rust(args.sdk.as_deref())?,
        "python" => project.python()?,
        _ => project.js()?,
    };
    project.common(&build)?;
    println!(
        "made {} ({} plugin, hooks {})",
        dir.display(),
        args.lang,
        args.hooks.join(",")
    );
    println!("build: (cd {} && {build})", dir.display());
    println!("test:  (cd {} && ./test)", dir.display());
    Ok(())
}

struct Project<'a> {
    name: &'a str,
    dir: &'a Path,
    hooks: &'a [&'a HookStub],
}

impl Project<'_> {
    fn write(&self, path: &str, text: &str) -> anyhow::Result<()> {
        let path = self.dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }

    fn snake(&self) -> String {
        self.name.replace('-', "_")
    }

    fn camel(&self) -> String {
        self.name
            .split('-')
            .map(|part| {
                let mut chars = part.chars();
                chars
                    .next()
                    .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                    .unwrap_or_default()
            })
            .collect()
    }

    /// The world: `host-api` for Rust (the linker keeps only what the code uses), and just the
    /// interfaces the stubs need for Python and JavaScript, whose components import everything
    /// their world names (each import needs a grant).
    fn world(&self, full_host_api: bool) -> String {
        let mut world = format!(
            "package local:{name};\n\n/// Made by `postern plugin new`. Export the hooks you implement; import the capabilities\n/// you use (each needs a grant in the server's `[[plugin]]` block).\nworld {name} {{\n",
            name = self.name
        );
        if full_host_api {
            world.push_str("    include postern:plugin/host-api@0.2.0;\n");
        } else {
            world.push_str("    import postern:plugin/types@0.1.0;\n");
        }
        for hook in self.hooks {
            world.push_str(&format!(
                "    export postern:plugin/{}@{};\n",
                hook.name, hook.version
            ));
        }
        world.push_str("}\n");
        world
    }

    fn wit(&self, full_host_api: bool) -> anyhow::Result<()> {
        self.write("wit/world.wit", &self.world(full_host_api))?;
        self.write("wit/deps/postern-plugin/plugin.wit", WIT_0_2_0)?;
        self.write("wit/deps/postern-plugin-0.1.0/plugin.wit", WIT_0_1_0)
    }

    fn rust(&self, sdk: Option<&Path>) -> anyhow::Result<String> {
        let sdk = match sdk {
            Some(path) => path.to_path_buf(),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/sdk"),
        };
        let sdk = sdk.canonicalize().with_context(|| {
            format!(
                "the Rust SDK is not at {} (give --sdk PATH to plugins/sdk of a Postern checkout)",
                sdk.display()
            )
        })?;
        self.write(
            "Cargo.toml",
            &format!(
                "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\npostern-plugin-sdk = {{ path = {sdk:?} }}\n\n[profile.release]\nopt-level = \"s\"\nlto = true\ncodegen-units = 1\nstrip = true\npanic = \"abort\"\n\n# A project of its own, even inside another workspace.\n[workspace]\n",
                name = self.name,
                sdk = sdk.display().to_string()
            ),
        )?;
        let camel = self.camel();
        let mut code = format!(
            "//! The {name} plugin for Postern, made by `postern plugin new`.\n\n#![allow(unused_imports)]\n\nuse postern_plugin_sdk::types::{{\n    DataDecision, DataVerdict, Decision, Delivery, DeliveryTarget, Envelope, HeaderField,\n    LookupAnswer, Message, Modification, Session,\n}};\n\nstruct {camel};\npostern_plugin_sdk::plugin!({camel});\n",
            name = self.name
        );
        for hook in self.hooks {
            let module = format!(
                "exports::postern::plugin{}::{}",
                hook.version.replace('.', "_"),
                hook.name.replace('-', "_")
            );
            code.push_str(&format!(
                "\nimpl {module}::Guest for {camel} {{\n    {}\n}}\n",
                hook.rust.replace("@NAME@", &camel)
            ));
        }
        self.write("src/lib.rs", &code)?;
        self.wit(true)?;
        self.write(".gitignore", "/target\n")?;
        Ok("cargo build --release --target wasm32-wasip2".into())
    }

    fn python(&self) -> anyhow::Result<String> {
        let camel = self.camel();
        let mut code = format!(
            "\"\"\"The {name} plugin for Postern (componentize-py), made by `postern plugin new`.\"\"\"\n\nfrom wit_world import exports\nfrom wit_world.imports import types\n",
            name = self.name
        );
        if self.hooks.iter().any(|h| h.name == "queued") {
            // The verdict types of a 0.2.0 interface live in its own module.
            code.push_str("from wit_world.exports import queued\n");
        }
        for hook in self.hooks {
            code.push_str(&format!(
                "\n\nclass {}(exports.{}):\n    {}\n",
                hook.python_class,
                hook.python_class,
                hook.python.replace("@NAME@", &camel)
            ));
        }
        self.write("app.py", &code)?;
        self.wit(false)?;
        Ok(format!(
            "componentize-py -d wit -w {name} componentize app -o {snake}.wasm",
            name = self.name,
            snake = self.snake()
        ))
    }

    fn js(&self) -> anyhow::Result<String> {
        let camel = self.camel();
        let mut code = format!(
            "// The {name} plugin for Postern (componentize-js), made by `postern plugin new`.\n",
            name = self.name
        );
        for hook in self.hooks {
            let export = hook
                .name
                .split('-')
                .enumerate()
                .map(|(i, part)| {
                    if i == 0 {
                        part.to_string()
                    } else {
                        part[..1].to_uppercase() + &part[1..]
                    }
                })
                .collect::<String>();
            code.push_str(&format!(
                "\nexport const {export} = {{\n  {},\n}};\n",
                hook.js.replace("@NAME@", &camel)
            ));
        }
        self.write("app.js", &code)?;
        self.write(
            "package.json",
            &format!(
                "{{\n  \"name\": \"{name}\",\n  \"private\": true,\n  \"type\": \"module\",\n  \"scripts\": {{\n    \"build\": \"componentize-js app.js --wit wit --world-name {name} -d stdio random clocks http fetch-event -o {snake}.wasm\"\n  }},\n  \"devDependencies\": {{\n    \"@bytecodealliance/componentize-js\": \"0.23.0\",\n    \"@bytecodealliance/preview2-shim\": \"0.25.0\"\n  }}\n}}\n",
                name = self.name,
                snake = self.snake()
            ),
        )?;
        self.wit(false)?;
        self.write(".gitignore", "/node_modules\n")?;
        Ok("npm install && npm run build".into())
    }

    /// The sample message, the test script and the README, the same for every language.
    fn common(&self, build: &str) -> anyhow::Result<()> {
        let snake = self.snake();
        let (wasm, built) = if build.starts_with("cargo") {
            (
                format!("target/wasm32-wasip2/release/{snake}.wasm"),
                format!("${{CARGO_TARGET_DIR:-target}}/wasm32-wasip2/release/{snake}.wasm"),
            )
        } else {
            (format!("{snake}.wasm"), format!("{snake}.wasm"))
        };
        self.write(
            "test.eml",
            "From: sender@remote.test\r\nTo: alice@example.test\r\nSubject: a test\r\n\r\nHello.\r\n",
        )?;
        let mut expects = String::new();
        for hook in self.hooks {
            let outcome = match hook.name {
                "data" => format!("data: +X-{}", self.camel()),
                "queued" => "queued: deliver".into(),
                // No outcome is printed for these offline: they are not session stages.
                "deliver" | "vrfy" | "expn" => continue,
                "rcpt" => "rcpt: pass".into(),
                other => format!("{other}: pass"),
            };
            expects.push_str(&format!(" \\\n    --expect '{outcome}'"));
        }
        let test = format!(
            "#!/bin/sh\n# Runs the plugin's hooks offline on test.eml, as the server would, and checks what they\n# decided (exit status 1 when an expectation is not met). Build first.\nset -e\ncd \"$(dirname \"$0\")\"\nexec \"${{POSTERN:-postern}}\" plugin test \"{built}\" --eml test.eml{expects}\n"
        );
        self.write("test", &test)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                self.dir.join("test"),
                std::fs::Permissions::from_mode(0o755),
            )?;
        }
        self.write(
            "README.md",
            &format!(
                "# {name}\n\nA Postern plugin. Build it, then test it offline:\n\n```sh\n{build}\n./test\n```\n\nRun it in a server:\n\n```toml\n[[plugin]]\nname = \"{name}\"\npath = \"{wasm}\"\n```\n\nThe contract is in `wit/deps/` (`postern-plugin` is 0.2.0, `postern-plugin-0.1.0` what it builds on);\n`wit/world.wit` says which hooks this plugin exports.\n",
                name = self.name
            ),
        )?;
        Ok(())
    }
}
