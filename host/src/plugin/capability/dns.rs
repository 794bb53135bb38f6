//! Capability `dns`: A and TXT lookups through the server's resolver, off the runtime threads.

use std::sync::Arc;

use crate::plugin::bindings::v1::dns;
use crate::plugin::host::PluginState;

impl dns::Host for PluginState {
    async fn lookup_a(
        &mut self,
        name: String,
    ) -> wasmtime::Result<Result<Vec<String>, dns::DnsError>> {
        let resolver = self.resolver()?;
        Ok(resolver
            .a(&name)
            .await
            .map(|ips| ips.iter().map(|ip| ip.to_string()).collect())
            .map_err(dns_error))
    }

    async fn lookup_txt(
        &mut self,
        name: String,
    ) -> wasmtime::Result<Result<Vec<String>, dns::DnsError>> {
        let resolver = self.resolver()?;
        Ok(resolver.txt(&name).await.map_err(dns_error))
    }
}

impl PluginState {
    fn resolver(&self) -> wasmtime::Result<Arc<crate::dns::Dns>> {
        self.meta
            .dns
            .clone()
            .ok_or_else(|| wasmtime::format_err!("capability dns not available"))
    }
}

fn dns_error(err: crate::dns::DnsError) -> dns::DnsError {
    match err {
        crate::dns::DnsError::NotFound => dns::DnsError::NotFound,
        crate::dns::DnsError::Timeout => dns::DnsError::Timeout,
        crate::dns::DnsError::Failed(why) => dns::DnsError::Failed(why),
        bogus @ crate::dns::DnsError::Bogus => dns::DnsError::Failed(bogus.to_string()),
    }
}
