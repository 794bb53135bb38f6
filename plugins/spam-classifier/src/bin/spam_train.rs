//! Trains the spam-filter's token classifier from two directories of messages and prints the
//! model as a TOML setting to paste under `[plugin.config]`:
//!
//! ```sh
//! cargo run --manifest-path plugins/Cargo.toml -p spam-classifier --bin spam-train -- SPAM_DIR HAM_DIR
//! ```

use spam_classifier::classifier::Model;

fn subject_and_body(raw: &str) -> (String, String) {
    let raw = raw.replace("\r\n", "\n");
    let (head, body) = raw.split_once("\n\n").unwrap_or((raw.as_str(), ""));
    let subject = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("Subject:")
                .or_else(|| l.strip_prefix("subject:"))
        })
        .unwrap_or("")
        .trim()
        .to_string();
    (subject, body.to_string())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 2 {
        eprintln!("usage: spam-train SPAM_DIR HAM_DIR");
        std::process::exit(2);
    }
    let mut model = Model::default();
    for (dir, spam) in [(&args[0], true), (&args[1], false)] {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for path in entries {
            let raw = String::from_utf8_lossy(&std::fs::read(&path).expect("readable message"))
                .into_owned();
            let (subject, body) = subject_and_body(&raw);
            model.learn(&subject, &body, spam);
        }
    }
    eprintln!(
        "trained on {} spam and {} ham messages, {} tokens",
        model.spam_messages,
        model.ham_messages,
        model.counts.len()
    );
    println!("model = \"\"\"\n{}\"\"\"", model.to_text());
}
