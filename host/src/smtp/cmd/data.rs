//! DATA (RFC 5321 §4.1.1.4) and BDAT (RFC 3030), the Received trace header (RFC 5321 §4.4), and
//! the hand-over to the spool: 250 is sent only once the message is durable.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::address::Address;
use crate::message::{apply_edits, Edit, Field};
use crate::plugin::bindings::types;
use crate::plugin::{Stage, Verdict};
use crate::queue::{Envelope, Recipient, SpoolError};
use crate::smtp::body::BodyBuffer;
use crate::smtp::codec::{ChunkReader, DotDecoder};
use crate::smtp::reply::{common, Reply};
use crate::smtp::session::{Flow, Phase, Session, Transaction};
use crate::stream::{Io, ReadError};

/// RFC 8601's header field.
const AUTH_RESULTS: &str = "Authentication-Results";

impl Session {
    /// Checks that a message may be sent now; the reply says why not.
    fn ready_for_body(&self) -> Result<(), Reply> {
        match &self.phase {
            Phase::Transaction(tx) if !tx.recipients.is_empty() => Ok(()),
            // RFC 2920 §3.1: with pipelining, DATA after only failed RCPTs gets 554.
            Phase::Transaction(tx) if tx.rcpt_attempts > 0 => {
                Err(Reply::new(554, "5.5.1", "No valid recipients"))
            }
            Phase::Transaction(_) => Err(common::bad_sequence("Need RCPT before DATA")),
            _ => Err(common::bad_sequence("Need MAIL before DATA")),
        }
    }

    pub async fn cmd_data<S>(&mut self, io: &mut Io<S>) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if let Err(reply) = self.ready_for_body() {
            return self.answer(io, reply);
        }
        if matches!(&self.phase, Phase::Transaction(tx) if tx.chunks.is_some()) {
            return self.answer(io, common::bad_sequence("DATA not allowed after BDAT"));
        }
        io.queue(&Reply::new(354, "", "End data with <CR><LF>.<CR><LF>").to_bytes());
        if io.flush().await.is_err() {
            return Flow::Close;
        }
        let mut body = BodyBuffer::new(self.server.body_budget.clone());
        body.append(self.received_header().as_bytes());
        let mut decoder = DotDecoder::new(self.server.config.limits.max_message_size);
        let mut scratch = Vec::new();
        loop {
            let progress = decoder.feed(&io.input, &mut scratch);
            io.input.drain(..progress.consumed);
            body.append(&scratch);
            scratch.clear();
            if progress.done {
                break;
            }
            if let Err(err) = io.fill(Instant::now() + self.data_timeout()).await {
                return self.lost_during_body(io, err);
            }
        }
        if decoder.overflowed() {
            self.phase = Phase::Idle;
            return self.answer(io, common::message_too_big());
        }
        self.finish_message(io, body).await
    }

    pub async fn cmd_bdat<S>(&mut self, io: &mut Io<S>, size: usize, last: bool) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        // RFC 3030 §2: the chunk follows the command whatever the answer, so it is always read
        // (and dropped when refused) to keep the stream in step.
        let refusal = self.ready_for_body().err();
        let limit = self.server.config.limits.max_message_size;
        let budget = self.server.body_budget.clone();
        let received = self.received_header();
        let mut too_big = false;
        if let (None, Phase::Transaction(tx)) = (&refusal, &mut self.phase) {
            let body = tx.chunks.get_or_insert_with(|| {
                let mut body = BodyBuffer::new(budget);
                body.append(received.as_bytes());
                body
            });
            too_big = body
                .len()
                .saturating_sub(received.len())
                .saturating_add(size)
                > limit;
        }
        let accepting = refusal.is_none() && !too_big;
        let mut reader = ChunkReader::new(size);
        loop {
            let (take, done) = reader.feed(io.input.len());
            if let (
                true,
                Phase::Transaction(Transaction {
                    chunks: Some(body), ..
                }),
            ) = (accepting, &mut self.phase)
            {
                body.append(&io.input[..take]);
            }
            io.input.drain(..take);
            if done {
                break;
            }
            if let Err(err) = io.fill(Instant::now() + self.data_timeout()).await {
                return self.lost_during_body(io, err);
            }
        }
        if let Some(reply) = refusal {
            return self.answer(io, reply);
        }
        if too_big {
            self.phase = Phase::Idle;
            return self.answer(io, common::message_too_big());
        }
        if !last {
            return self.answer(
                io,
                Reply::new(250, "2.0.0", format!("{size} octets received")),
            );
        }
        let body = match &mut self.phase {
            Phase::Transaction(tx) => tx.chunks.take(),
            _ => None,
        };
        match body {
            Some(body) => self.finish_message(io, body).await,
            None => self.answer(io, common::bad_sequence("No transaction")),
        }
    }

    fn lost_during_body<S>(&mut self, io: &mut Io<S>, err: ReadError) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        self.phase = Phase::Idle;
        if let ReadError::Timeout = err {
            io.queue(&common::timeout().to_bytes());
        }
        Flow::Close
    }

    /// Ends the transaction: spool the message durably, then answer.
    async fn finish_message<S>(&mut self, io: &mut Io<S>, mut body: BodyBuffer) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let Phase::Transaction(tx) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            return self.answer(io, common::bad_sequence("No transaction"));
        };
        if body.exhausted() {
            warn!(queue_id = %tx.id, "body memory budget exhausted");
            return self.answer(io, common::storage_full());
        }
        let mut message = Arc::new(body.take());
        // Loop detection (RFC 5321 §6.3): our Received field is counted with the others.
        let hops = crate::message::header_values(&message, "Received").len();
        if hops > self.server.config.limits.max_hops {
            warn!(queue_id = %tx.id, hops, "mail loop suspected: too many Received fields");
            return self.answer(
                io,
                Reply::new(554, "5.4.6", format!("Too many hops ({hops}): mail loop?")),
            );
        }
        let inside = self.auth.is_some() || self.server.config.is_trusted_network(self.peer.ip());
        let mut verification = crate::message_auth::Verification::default();
        let mut protected = 1; // our Received field stays first through plugin edits
        if !inside {
            let hostname = &self.server.config.server.hostname;
            // RFC 8601 §5: results that claim to be ours but arrived with the message are
            // forged, whether or not we check the origin ourselves. Only those go; other hosts'
            // results stay. Last first, so that earlier indexes still point at the same fields.
            let mut edits: Vec<Edit> = crate::message::header_values(&message, AUTH_RESULTS)
                .iter()
                .enumerate()
                .filter(|(_, v)| {
                    let id = v.trim_start().split([';', ' ']).next().unwrap_or_default();
                    id.eq_ignore_ascii_case(hostname)
                })
                .rev()
                .map(|(i, _)| Edit::Remove {
                    name: AUTH_RESULTS.to_string(),
                    index: i as u32 + 1,
                })
                .collect();
            if let Some(checks) = self.server.message_auth.as_ref().filter(|m| m.verifies()) {
                let helo = self
                    .helo
                    .as_ref()
                    .map(|h| h.name.clone())
                    .unwrap_or_default();
                verification = checks
                    .verify(&message, self.peer.ip(), &helo, &tx.sender)
                    .await;
                if let Some((name, value)) = &verification.header {
                    edits.push(Edit::Insert(Field::folded(name, value)));
                    protected = 2;
                    info!(queue_id = %tx.id, spf = %verification.spf, dkim = %verification.dkim, dmarc = %verification.dmarc, "origin checked");
                }
            }
            if !edits.is_empty() {
                message = Arc::new(apply_edits(&message, &edits, 1));
            }
        }
        let verification = Arc::new(verification);
        let mut envelope = Envelope {
            id: tx.id.clone(),
            received_at: chrono::Utc::now().timestamp(),
            sender: tx.sender,
            recipients: tx.recipients,
            helo: self
                .helo
                .as_ref()
                .map(|h| h.name.clone())
                .unwrap_or_default(),
            peer: self.peer.ip().to_string(),
            auth_user: self.auth.as_ref().map(|u| u.0.clone()),
            smtputf8: tx.smtputf8,
            message_len: 0,
            quarantine: None,
            filtered: false,
            dsn: tx.dsn,
            require_tls: tx.require_tls,
        };
        if self.plugins_have(Stage::Data) {
            match self
                .run_data_hook(&mut envelope, &mut message, &verification, protected)
                .await
            {
                DataHook::Spool => {}
                DataHook::Answer(reply) => return self.answer(io, reply),
                DataHook::Drop => {
                    info!(queue_id = %tx.id, "message discarded by plugin");
                    return self.answer(
                        io,
                        Reply::new(250, "2.0.0", format!("OK: queued as {}", tx.id)),
                    );
                }
            }
        }
        if let Some(user) = &self.auth {
            if let Some(signature) = self
                .server
                .message_auth
                .as_ref()
                .and_then(|m| m.sign(&message, &user.0))
            {
                let mut signed = Vec::with_capacity(signature.len() + message.len());
                signed.extend_from_slice(signature.as_bytes());
                signed.extend_from_slice(&message);
                message = Arc::new(signed);
            }
        }
        envelope.message_len = message.len() as u64;
        let size = message.len();
        let rcpts = envelope.recipients.len();
        let sender = envelope.sender.clone();
        match self.server.queue.submit(envelope, message).await {
            Ok(()) => {
                crate::telemetry::outcome::accepted(&tx.id, &sender, size, rcpts);
                self.answer(
                    io,
                    Reply::new(250, "2.0.0", format!("OK: queued as {}", tx.id)),
                )
            }
            Err(SpoolError::Full(err)) => {
                warn!(queue_id = %tx.id, "spool full: {err}");
                self.answer(io, common::storage_full())
            }
            Err(err) => {
                warn!(queue_id = %tx.id, "cannot spool: {err}");
                self.answer(io, common::local_error())
            }
        }
    }

    /// Runs the data hook and applies what the plugins decided to the envelope and message.
    async fn run_data_hook(
        &mut self,
        envelope: &mut Envelope,
        message: &mut Arc<Vec<u8>>,
        verification: &Arc<crate::message_auth::Verification>,
        protected: usize,
    ) -> DataHook {
        let info = self.session_info();
        let wit_envelope = types::Envelope {
            queue_id: envelope.id.clone(),
            sender: envelope.sender.clone(),
            recipients: envelope
                .recipients
                .iter()
                .map(|r| r.address.clone())
                .collect(),
        };
        let plugins = self.plugins.as_mut().expect("checked by plugins_have");
        let mut outcome = plugins
            .on_data(&info, &wit_envelope, message, verification)
            .await;
        match std::mem::replace(&mut outcome.verdict, Verdict::Pass) {
            Verdict::Pass => {}
            verdict => {
                let reply = self.verdict_reply(verdict).expect("not Pass");
                info!(queue_id = %envelope.id, code = reply.code, "message refused by plugin");
                return DataHook::Answer(reply);
            }
        }
        if outcome.discard {
            return DataHook::Drop;
        }
        if let Some(sender) = outcome.changes.new_sender {
            if !sender.is_empty() && Address::parse(&sender).is_none() {
                warn!(queue_id = %envelope.id, "plugin set an invalid sender {sender:?}");
                return DataHook::Answer(common::local_error());
            }
            envelope.sender = sender;
        }
        envelope.recipients.retain(|r| {
            !outcome
                .changes
                .remove_recipients
                .iter()
                .any(|x| x.eq_ignore_ascii_case(&r.address))
        });
        for added in outcome.changes.add_recipients {
            // A plugin cannot add a recipient the client could not have added itself.
            let route = Address::parse(&added)
                .ok_or(())
                .and_then(|a| self.route_for(&a).map_err(|_| ()));
            match route {
                Ok(route) => envelope.recipients.push(Recipient::new(added, route)),
                Err(()) => {
                    warn!(queue_id = %envelope.id, "plugin added a recipient the relay policy refuses: {added:?}");
                    return DataHook::Answer(common::local_error());
                }
            }
        }
        if envelope.recipients.is_empty() {
            return DataHook::Drop;
        }
        if let Some(reason) = outcome.quarantine {
            outcome
                .changes
                .edits
                .push(Edit::Insert(Field::new("X-Postern-Quarantine", &reason)));
            envelope.quarantine = Some(reason);
        }
        if !outcome.changes.edits.is_empty() {
            // Our trace fields (Received, Authentication-Results) stay first.
            *message = Arc::new(apply_edits(message, &outcome.changes.edits, protected));
        }
        DataHook::Spool
    }

    /// The Received header this server adds (RFC 5321 §4.4, protocol names from RFC 3848/6531).
    fn received_header(&self) -> String {
        let Phase::Transaction(tx) = &self.phase else {
            return String::new();
        };
        let helo = self.helo.as_ref();
        let mut protocol = String::new();
        if tx.smtputf8 {
            protocol.push_str("UTF8SMTP");
        } else if helo.is_some_and(|h| h.extended) {
            protocol.push_str("ESMTP");
        } else {
            protocol.push_str("SMTP");
        }
        if self.tls.is_some() {
            protocol.push('S');
        }
        if self.auth.is_some() {
            protocol.push('A');
        }
        let tls = self
            .tls
            .as_ref()
            .map(|t| format!("\r\n\t(using {} with cipher {})", t.version, t.cipher))
            .unwrap_or_default();
        // Who sent it is on record in the message (as Postfix's
        // smtpd_sasl_authenticated_header and Stalwart by default), not only in our log.
        let authenticated = self
            .auth
            .as_ref()
            .map(|user| format!("\r\n\t(Authenticated sender: {})", user.0))
            .unwrap_or_default();
        let for_clause = match tx.recipients.as_slice() {
            [only] => format!("\r\n\tfor <{}>", only.address),
            _ => String::new(),
        };
        format!(
            "Received: from {} ([{}]){}\r\n\tby {} (Postern) with {} id {}{}{};\r\n\t{}\r\n",
            helo.map(|h| h.name.as_str()).unwrap_or("unknown"),
            self.peer.ip(),
            authenticated,
            self.server.config.server.hostname,
            protocol,
            tx.id,
            tls,
            for_clause,
            chrono::Local::now().to_rfc2822(),
        )
    }
}

/// What the data hook leaves to do.
enum DataHook {
    /// Spool the (possibly changed) message.
    Spool,
    /// Answer this instead.
    Answer(Reply),
    /// Answer 250 and keep nothing.
    Drop,
}
