//! What a plugin instance's store holds, and the `message` resource of the shared types. The
//! capabilities a plugin may import are in `capability/`, a file each.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use super::limits::InstanceLimits;
use tokio::io::AsyncWrite;
use wasmtime::component::{Resource, ResourceTable};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::v1::types;
use super::kv::Namespace;
use crate::auth::UserDirectory;

/// Read calls return at most this much per call.
const MAX_READ: u32 = 1 << 20;

/// A plugin as configured: what its instances may see.
pub struct PluginMeta {
    pub name: String,
    pub config: toml::Table,
    pub kv: Option<Arc<Namespace>>,
    pub directory: Arc<UserDirectory>,
    pub dns: Option<Arc<crate::dns::Dns>>,
    /// The host directory granted as `/data`, if any.
    pub directory_grant: Option<std::path::PathBuf>,
    pub memory_bytes: usize,
    /// Granted `clock`: WASI's wall clock tells the real time (else it is frozen, see below).
    pub wall_clock: bool,
    /// Its calls run on a blocking thread of their own (mailbox backends, `store::wasm`): WASI
    /// file operations then block that thread instead of hopping to another one and back,
    /// which would cost more than most of the calls themselves.
    pub blocking_io: bool,
}

/// Where a granted directory appears inside the sandbox.
pub const GRANTED_DIRECTORY: &str = "/data";

/// The data of one plugin instance's store.
pub struct PluginState {
    pub meta: Arc<PluginMeta>,
    /// When the running call (or instantiation) must end; checked at every epoch tick.
    pub deadline: std::time::Instant,
    pub table: ResourceTable,
    wasi: WasiCtx,
    pub limits: InstanceLimits,
}

impl PluginState {
    pub fn new(meta: Arc<PluginMeta>) -> wasmtime::Result<PluginState> {
        // What WASI every plugin has, granted or not: random numbers, a monotonic clock (elapsed
        // time; calls are bounded by the deadline anyway), stdout and stderr to the log, an
        // empty stdin. No sockets (every address is refused), no name lookups, no environment,
        // no arguments, no directory unless one was granted, and a wall clock frozen at the
        // Unix epoch unless `clock` was granted: guests built with WASI toolchains link
        // `wasi:clocks` whether they use it or not, so the capability is enforced here, not by
        // refusing the import.
        let output = |stream| PluginOutput {
            plugin: meta.name.clone().into(),
            stream,
        };
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(output("stdout")).stderr(output("stderr"));
        if !meta.wall_clock {
            wasi.wall_clock(FrozenWallClock);
        }
        wasi.allow_blocking_current_thread(meta.blocking_io);
        if let Some(dir) = &meta.directory_grant {
            wasi.preopened_dir(dir, GRANTED_DIRECTORY, wasmtime_wasi::FsPerms::ReadWrite)?;
        }
        let wasi = wasi.build();
        let limits = InstanceLimits::new(meta.memory_bytes);
        Ok(PluginState {
            deadline: std::time::Instant::now(),
            meta,
            table: ResourceTable::new(),
            wasi,
            limits,
        })
    }
}

/// The wall clock of a plugin not granted `clock`: always the Unix epoch.
struct FrozenWallClock;

impl wasmtime_wasi::HostWallClock for FrozenWallClock {
    fn resolution(&self) -> std::time::Duration {
        std::time::Duration::from_secs(1)
    }

    fn now(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A plugin's stdout or stderr: every line becomes a log event tagged with the plugin's name.
#[derive(Clone)]
struct PluginOutput {
    plugin: Arc<str>,
    stream: &'static str,
}

/// Longest line logged; the rest of a longer line is cut.
const MAX_OUTPUT_LINE: usize = 1000;

impl IsTerminal for PluginOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for PluginOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineLogger {
            output: self.clone(),
            pending: Vec::new(),
        })
    }
}

struct LineLogger {
    output: PluginOutput,
    pending: Vec<u8>,
}

impl LineLogger {
    fn emit(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(&line[..line.len().min(MAX_OUTPUT_LINE)]);
        let text = text.trim_end_matches(['\r', '\n']);
        tracing::info!(plugin = %self.output.plugin, stream = self.output.stream, "{text}");
    }
}

impl AsyncWrite for LineLogger {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.pending.extend_from_slice(data);
        while let Some(end) = memchr::memchr(b'\n', &self.pending) {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            self.emit(&line);
        }
        if self.pending.len() > MAX_OUTPUT_LINE {
            // A line without end: log what there is rather than hold it.
            let line = std::mem::take(&mut self.pending);
            self.emit(&line);
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.pending.is_empty() {
            let line = std::mem::take(&mut self.pending);
            self.emit(&line);
        }
        Poll::Ready(Ok(()))
    }
}

/// The message a data or deliver hook reads, shared (not copied) between plugins.
pub struct MessageView {
    pub bytes: Arc<Vec<u8>>,
    /// Origin checks (data hook only).
    pub authentication: Option<Arc<crate::message_auth::Verification>>,
}

impl types::Host for PluginState {}

impl types::HostMessage for PluginState {
    fn size(&mut self, this: Resource<MessageView>) -> wasmtime::Result<u64> {
        Ok(self.table.get(&this)?.bytes.len() as u64)
    }

    fn body_offset(&mut self, this: Resource<MessageView>) -> wasmtime::Result<u64> {
        Ok(crate::message::body_offset(&self.table.get(&this)?.bytes) as u64)
    }

    fn header(
        &mut self,
        this: Resource<MessageView>,
        name: String,
    ) -> wasmtime::Result<Vec<String>> {
        Ok(crate::message::header_values(
            &self.table.get(&this)?.bytes,
            &name,
        ))
    }

    fn headers(&mut self, this: Resource<MessageView>) -> wasmtime::Result<Vec<(String, String)>> {
        Ok(crate::message::parse_fields(&self.table.get(&this)?.bytes)
            .iter()
            .map(|f| (f.name.clone(), f.value()))
            .collect())
    }

    fn read(
        &mut self,
        this: Resource<MessageView>,
        offset: u64,
        len: u32,
    ) -> wasmtime::Result<Vec<u8>> {
        let bytes = &self.table.get(&this)?.bytes;
        let start = (offset as usize).min(bytes.len());
        let end = start
            .saturating_add(len.min(MAX_READ) as usize)
            .min(bytes.len());
        Ok(bytes[start..end].to_vec())
    }

    fn text_parts(&mut self, this: Resource<MessageView>) -> wasmtime::Result<Vec<String>> {
        Ok(crate::message::text_parts(&self.table.get(&this)?.bytes))
    }

    fn authentication(
        &mut self,
        this: Resource<MessageView>,
    ) -> wasmtime::Result<types::Authentication> {
        let found = self.table.get(&this)?.authentication.clone();
        let v = found.as_deref().cloned().unwrap_or_default();
        Ok(types::Authentication {
            spf: v.spf,
            dkim: v.dkim,
            dmarc: v.dmarc,
            dmarc_policy: v.dmarc_policy,
            arc: v.arc,
            from_domain: v.from_domain,
        })
    }

    fn drop(&mut self, this: Resource<MessageView>) -> wasmtime::Result<()> {
        self.table.delete(this)?;
        Ok(())
    }
}
