//! Capability `config`: the plugin's own `[plugin.config]` table, value by dotted path.

use crate::plugin::bindings::v1::config;
use crate::plugin::host::PluginState;

/// A value of the plugin's config table at a dotted path, as text.
fn config_value(table: &toml::Table, key: &str) -> Option<String> {
    let mut parts = key.split('.');
    let mut value = table.get(parts.next()?)?;
    for part in parts {
        value = value.as_table()?.get(part)?;
    }
    Some(match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

impl config::Host for PluginState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(config_value(&self.meta.config, &key))
    }

    fn keys(&mut self) -> wasmtime::Result<Vec<String>> {
        Ok(self.meta.config.keys().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_values_by_dotted_path() {
        let table: toml::Table = toml::from_str(
            "threshold = 5.5\nname = \"x\"\n[rules]\ngtube = 100\nlist = [\"a\", \"b\"]",
        )
        .unwrap();
        assert_eq!(config_value(&table, "threshold").as_deref(), Some("5.5"));
        assert_eq!(config_value(&table, "name").as_deref(), Some("x"));
        assert_eq!(config_value(&table, "rules.gtube").as_deref(), Some("100"));
        assert_eq!(
            config_value(&table, "rules.list").as_deref(),
            Some("[\"a\", \"b\"]")
        );
        assert_eq!(config_value(&table, "rules.none"), None);
        // A table comes as an inline table: what the SDK's `config_table` parses.
        assert_eq!(
            config_value(&table, "rules").as_deref(),
            Some("{ gtube = 100, list = [\"a\", \"b\"] }")
        );
    }
}
