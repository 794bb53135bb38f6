//! SEARCH (RFC 9051 §6.4.4, ESEARCH of RFC 4731), SORT and ESORT (RFC 5256, RFC 5267) and THREAD (RFC 5256) over the selected folder.

use crate::imap::codec::{self, Extended};
use crate::imap::context::{Kept, Reported};
use crate::imap::search::{self, Lazy, Subject};
use crate::imap::selected::{uid_set, Selected};
use crate::store::{MailStore, MessageInfo};
use crate::stream::Io;
use imap_codec::imap_types::command::CommandBody;
use imap_codec::imap_types::core::Vec1;
use imap_codec::imap_types::extensions::thread::ThreadingAlgorithm;
use imap_codec::imap_types::search::SearchKey;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::imap::code::Code;
use crate::imap::session::*;

/// Numbers in the order given as a sequence set: runs of consecutive ascending numbers become
/// ranges, nothing is reordered (RFC 5267 §3.2 for ESORT's ALL).
pub(in crate::imap) fn ordered_set(numbers: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < numbers.len() {
        let mut j = i;
        while j + 1 < numbers.len() && numbers[j + 1] == numbers[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            numbers[i].to_string()
        } else {
            format!("{}:{}", numbers[i], numbers[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// SEARCH, SORT and THREAD take US-ASCII and UTF-8 (RFC 9051 §6.4.4); anything else is refused
/// with the charsets we take.
pub(in crate::imap) fn unsupported_charset(
    charset: &imap_codec::imap_types::core::Charset<'_>,
) -> Option<Done> {
    use imap_codec::imap_types::core::Charset;
    let name = match charset {
        Charset::Atom(atom) => atom.as_ref().to_ascii_uppercase(),
        Charset::Quoted(quoted) => quoted.as_ref().to_ascii_uppercase(),
    };
    (name != "US-ASCII" && name != "UTF-8")
        .then(|| no(Some(Code::BadCharset), "Unsupported charset"))
}

/// Headers read per store call when a search reads header fields.
const HEADER_BATCH: usize = 256;

/// The selected folder as a SEARCH, SORT or THREAD sees it, owned so it can go to a blocking
/// thread.
pub(in crate::imap) struct SearchScope {
    user: String,
    store: Arc<dyn MailStore>,
    folder: String,
    messages: Vec<MessageInfo>,
    recent: std::collections::HashSet<u32>,
    /// RFC 5182: the saved result, when the command named `$`.
    saved: Option<Vec<u32>>,
}

impl SearchScope {
    /// What matching `key` reads: (message files opened, bytes read), for `Conn::short_read`.
    pub(in crate::imap) fn reads(&self, key: &SearchKey<'_>) -> (usize, u64) {
        if search::uses_body(key) {
            let bytes = self.messages.iter().map(|m| m.size).sum();
            (self.messages.len(), bytes)
        } else if search::uses_header(key) {
            (self.messages.len(), 0)
        } else {
            (0, 0)
        }
    }

    /// Indexes of the messages `key` matches. Blocking: reads headers and bodies as needed.
    pub(in crate::imap) fn matching(&self, key: &SearchKey<'_>) -> Vec<usize> {
        let last_seq = self.messages.len() as u32;
        let last_uid = self.messages.last().map(|m| m.uid).unwrap_or(0);
        let sets = search::SetCache::new(key);
        let mut found = Vec::new();
        // Headers a batch at a time, one store call each, when the criteria read headers: a
        // backend behind a boundary is not called per message, and a large folder's headers
        // are never all in memory at once.
        let prefetch = search::uses_header(key);
        let mut headers: Vec<Option<Arc<[u8]>>> = Vec::new();
        for (i, info) in self.messages.iter().enumerate() {
            if prefetch && i % HEADER_BATCH == 0 {
                let batch: Vec<&MessageInfo> =
                    self.messages[i..].iter().take(HEADER_BATCH).collect();
                headers = self
                    .store
                    .read_headers(&self.user, &self.folder, &batch)
                    .into_iter()
                    .map(Result::ok)
                    .collect();
            }
            let subject = Subject {
                seq: i as u32 + 1,
                info,
                last_seq,
                last_uid,
                sets: &sets,
                recent: self.recent.contains(&info.uid),
                saved: self.saved.as_deref(),
            };
            let prefetched = headers.get_mut(i % HEADER_BATCH).and_then(Option::take);
            let mut load_header = || match prefetched.clone() {
                Some(header) => Some(header),
                None => self.store.read_header(&self.user, &self.folder, info).ok(),
            };
            let mut load = || self.store.read(&self.user, &self.folder, info).ok();
            let mut lazy = Lazy::new(&mut load_header, &mut load);
            if search::matches(key, &subject, &mut lazy) {
                found.push(i);
            }
        }
        found
    }

    /// The sort and thread fields of the messages `key` matches, in sequence order.
    pub(in crate::imap) fn fields(&self, key: &SearchKey<'_>) -> Vec<crate::imap::sort::Fields> {
        self.matching(key)
            .into_iter()
            .map(|i| {
                let info = &self.messages[i];
                let header = self
                    .store
                    .read_header(&self.user, &self.folder, info)
                    .unwrap_or_else(|_| Arc::from(&b""[..]));
                crate::imap::sort::Fields::read(i as u32 + 1, info, &header)
            })
            .collect()
    }
}

/// `* ESEARCH (TAG "t") [UID]`: how an ESEARCH answer to SEARCH or SORT begins (RFC 4731 §3.1).
fn esearch_head(out: &mut Vec<u8>, tag: &str, uid: bool) {
    out.extend_from_slice(b"* ESEARCH (TAG ");
    codec::string(out, tag.as_bytes());
    out.push(b')');
    if uid {
        out.extend_from_slice(b" UID");
    }
}

impl Conn {
    /// SEARCH, SORT and THREAD: the criteria in one key, the charset checked.
    pub(in crate::imap) async fn search_command<S>(
        &mut self,
        io: &mut Io<S>,
        user: &str,
        selected: &mut Selected,
        tag: &str,
        body: CommandBody<'static>,
        extended: &Extended,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        fn one_key(criteria: Vec1<SearchKey<'static>>) -> SearchKey<'static> {
            match criteria.as_ref() {
                [one] => one.clone(),
                _ => SearchKey::And(criteria),
            }
        }
        let scope = self.search_scope(user, selected);
        match body {
            CommandBody::Search {
                charset,
                criteria,
                uid,
            } => {
                if let Some(refused) = charset.as_ref().and_then(unsupported_charset) {
                    return refused;
                }
                self.search(io, selected, scope, tag, one_key(criteria), uid, extended)
                    .await
            }
            CommandBody::Sort {
                sort_criteria,
                charset,
                search_criteria,
                uid,
            } => {
                if let Some(refused) = unsupported_charset(&charset) {
                    return refused;
                }
                let criteria = sort_criteria.into_inner();
                let key = one_key(search_criteria);
                self.sort(io, scope, tag, criteria, key, uid, extended)
                    .await
            }
            CommandBody::Thread {
                algorithm,
                charset,
                search_criteria,
                uid,
            } => {
                if let Some(refused) = unsupported_charset(&charset) {
                    return refused;
                }
                let references = match algorithm {
                    ThreadingAlgorithm::References => true,
                    ThreadingAlgorithm::OrderedSubject => false,
                    ThreadingAlgorithm::Other(_) => {
                        return Done::Bad("Unknown threading algorithm".into())
                    }
                };
                self.thread(io, scope, references, one_key(search_criteria), uid)
                    .await
            }
            _ => Done::Bad("Not a search".into()),
        }
    }

    /// What a SEARCH, SORT or THREAD looks through: the selected folder as this session sees
    /// it, ready to be moved to a blocking thread.
    pub(in crate::imap) fn search_scope(&self, user: &str, selected: &Selected) -> SearchScope {
        let store = self.store.clone();
        let rev2 = self.rev2;
        SearchScope {
            user: user.to_string(),
            store,
            folder: selected.folder.clone(),
            messages: selected.messages.clone(),
            recent: if rev2 {
                Default::default()
            } else {
                selected.recent.clone()
            },
            saved: selected.saved_named.then(|| selected.saved.clone()),
        }
    }

    /// SORT (RFC 5256 §3): the messages a search finds, in the order the criteria give.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::imap) async fn sort<S>(
        &mut self,
        io: &mut Io<S>,
        scope: SearchScope,
        tag: &str,
        criteria: Vec<imap_codec::imap_types::extensions::sort::SortCriterion>,
        key: SearchKey<'static>,
        uid: bool,
        extended: &Extended,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let sorted = blocking(move || {
            let mut fields = scope.fields(&key);
            crate::imap::sort::sort(&mut fields, &criteria);
            Ok(fields)
        })
        .await;
        let sorted = match sorted {
            Ok(sorted) => sorted,
            Err(err) => return store_failure(&err),
        };
        let numbers: Vec<u32> = sorted
            .iter()
            .map(|f| if uid { f.uid } else { f.seq })
            .collect();
        let mut out = Vec::new();
        match &extended.search_return {
            // RFC 5267 §3.2 ESORT: MIN and MAX are the first and last in sort order, ALL the
            // numbers in sort order.
            Some(options) => {
                esearch_head(&mut out, tag, uid);
                let all = options.is_empty() || options.iter().any(|o| o == "ALL");
                for option in options {
                    match (option.as_str(), numbers.first(), numbers.last()) {
                        ("MIN", Some(first), _) => {
                            out.extend_from_slice(format!(" MIN {first}").as_bytes())
                        }
                        ("MAX", _, Some(last)) => {
                            out.extend_from_slice(format!(" MAX {last}").as_bytes())
                        }
                        ("COUNT", _, _) => {
                            out.extend_from_slice(format!(" COUNT {}", numbers.len()).as_bytes())
                        }
                        _ => {}
                    }
                }
                if all && !numbers.is_empty() {
                    out.extend_from_slice(format!(" ALL {}", ordered_set(&numbers)).as_bytes());
                }
            }
            None => {
                out.extend_from_slice(b"* SORT");
                for n in &numbers {
                    out.extend_from_slice(format!(" {n}").as_bytes());
                }
            }
        }
        out.extend_from_slice(b"\r\n");
        io.queue(&out);
        ok("SORT completed")
    }

    /// THREAD (RFC 5256 §3) with ORDEREDSUBJECT or REFERENCES.
    pub(in crate::imap) async fn thread<S>(
        &mut self,
        io: &mut Io<S>,
        scope: SearchScope,
        references: bool,
        key: SearchKey<'static>,
        uid: bool,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let rendered = blocking(move || {
            let fields = scope.fields(&key);
            let threads = if references {
                crate::imap::thread::references(&fields)
            } else {
                crate::imap::thread::ordered_subject(&fields)
            };
            let mut out = b"* THREAD ".to_vec();
            crate::imap::thread::render(&mut out, &threads, &|m| {
                if uid {
                    fields[m].uid
                } else {
                    fields[m].seq
                }
            });
            out.extend_from_slice(b"\r\n");
            Ok(out)
        })
        .await;
        match rendered {
            Ok(out) => {
                io.queue(&out);
                ok("THREAD completed")
            }
            Err(err) => store_failure(&err),
        }
    }

    /// SEARCH with ESEARCH's return options (RFC 4731), SAVE (RFC 5182), PARTIAL (RFC 9394)
    /// and UPDATE (RFC 5267 §4). IMAP4rev2 sessions always get ESEARCH.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::imap) async fn search<S>(
        &mut self,
        io: &mut Io<S>,
        selected: &mut Selected,
        scope: SearchScope,
        tag: &str,
        key: SearchKey<'static>,
        uid: bool,
        extended: &Extended,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let options = match ReturnOptions::read(extended, self.rev2) {
            Ok(options) => options,
            Err(text) => {
                selected.saved.clear();
                return Done::Bad(text.into());
            }
        };
        let by_modseq = search::uses_modseq(&key);
        if by_modseq {
            self.enable_condstore(io, Some(selected));
        }
        let kept_key = options.update.then(|| key.clone());
        let (files, bytes) = scope.reads(&key);
        let short = self.short_read(&scope.user, scope.messages.len(), files, bytes);
        let found = reading(short, move || {
            Ok(scope
                .matching(&key)
                .into_iter()
                .map(|i| (i, scope.messages[i].uid, scope.messages[i].modseq))
                .collect::<Vec<_>>())
        })
        .await;
        let found = match found {
            Ok(found) => found,
            Err(err) => {
                // RFC 5182 §2.1: a SEARCH that fails leaves `$` empty.
                selected.saved.clear();
                return store_failure(&err);
            }
        };
        let numbers: Vec<u32> = found
            .iter()
            .map(
                |(index, message_uid, _)| {
                    if uid {
                        *message_uid
                    } else {
                        *index as u32 + 1
                    }
                },
            )
            .collect();
        // MIN and MAX alone: the messages the answer is about (RFC 4731 §3.2), which are also
        // all that SAVE keeps (RFC 5182 §2.4).
        let ends: Option<Vec<&(usize, u32, u64)>> = options.only_ends().then(|| {
            let mut ends: Vec<_> = [
                options.min.then(|| found.first()).flatten(),
                options.max.then(|| found.last()).flatten(),
            ]
            .into_iter()
            .flatten()
            .collect();
            ends.dedup();
            ends
        });
        // RFC 7162 §3.1.5: a search by MODSEQ tells the highest mod-sequence of what it returns:
        // of the MIN and MAX messages when only those are asked for (RFC 4731 §3.2), else of
        // every message found.
        let modseq = if !by_modseq || found.is_empty() {
            None
        } else if let Some(ends) = &ends {
            ends.iter().map(|(_, _, m)| *m).max()
        } else {
            found.iter().map(|(_, _, m)| *m).max()
        };
        let partial = options
            .partial
            .map(|range| (range, range.pick(found.len())));
        if options.save {
            // RFC 5182 §2.4: with MIN or MAX (and neither ALL nor COUNT) only those are saved;
            // with PARTIAL, the part returned.
            let saved: Vec<u32> = if let Some((_, (start, end))) = partial {
                found[start..end].iter().map(|(_, uid, _)| *uid).collect()
            } else if let Some(ends) = &ends {
                ends.iter().map(|(_, uid, _)| *uid).collect()
            } else {
                found.iter().map(|(_, uid, _)| *uid).collect()
            };
            selected.saved = saved;
        }
        let mut out = Vec::new();
        if !options.esearch {
            out.extend_from_slice(b"* SEARCH");
            for n in &numbers {
                out.extend_from_slice(format!(" {n}").as_bytes());
            }
            if let Some(modseq) = modseq {
                out.extend_from_slice(format!(" (MODSEQ {modseq})").as_bytes());
            }
            out.extend_from_slice(b"\r\n");
        } else if !options.save_only() {
            esearch_head(&mut out, tag, uid);
            if options.min && !numbers.is_empty() {
                out.extend_from_slice(format!(" MIN {}", numbers[0]).as_bytes());
            }
            if options.max && !numbers.is_empty() {
                out.extend_from_slice(format!(" MAX {}", numbers[numbers.len() - 1]).as_bytes());
            }
            if options.count {
                out.extend_from_slice(format!(" COUNT {}", numbers.len()).as_bytes());
            }
            if options.all && !numbers.is_empty() {
                out.extend_from_slice(format!(" ALL {}", uid_set(numbers.clone())).as_bytes());
            }
            if let Some((range, (start, end))) = partial {
                let part = if start < end {
                    uid_set(numbers[start..end].to_vec())
                } else {
                    "NIL".into()
                };
                out.extend_from_slice(format!(" PARTIAL ({range} {part})").as_bytes());
            }
            if let Some(modseq) = modseq {
                out.extend_from_slice(format!(" MODSEQ {modseq}").as_bytes());
            }
            out.extend_from_slice(b"\r\n");
        }
        io.queue(&out);
        let Some(key) = kept_key else {
            return ok("SEARCH completed");
        };
        if selected.kept.len() >= crate::imap::context::MAX_UPDATES {
            return Done::Ok(
                Some(Code::NoUpdate(tag.to_string())),
                "SEARCH completed, too many searches kept up to date".into(),
            );
        }
        selected.kept.retain(|kept| kept.tag != tag);
        selected.kept.push(Kept {
            tag: tag.to_string(),
            key,
            uid,
            reported: options.reported(),
            result: found.iter().map(|(_, uid, _)| *uid).collect(),
            seen: crate::imap::context::fingerprint(&selected.messages),
        });
        ok("SEARCH completed")
    }

    /// RFC 5267 §4.3: after a command (or an IDLE wake-up) that changed the view, each search
    /// kept up to date runs again and tells what changed.
    pub(in crate::imap) async fn kept_searches(
        &mut self,
        user: &str,
        selected: &mut Selected,
    ) -> Vec<u8> {
        if selected.kept.is_empty() {
            return Vec::new();
        }
        let now = crate::imap::context::fingerprint(&selected.messages);
        let stale: Vec<usize> = (0..selected.kept.len())
            .filter(|i| selected.kept[*i].seen != now)
            .collect();
        if stale.is_empty() {
            return Vec::new();
        }
        let keys: Vec<SearchKey<'static>> = stale
            .iter()
            .map(|i| selected.kept[*i].key.clone())
            .collect();
        selected.saved_named = false;
        let scope = self.search_scope(user, selected);
        let results = blocking(move || {
            Ok(keys
                .iter()
                .map(|key| {
                    scope
                        .matching(key)
                        .into_iter()
                        .map(|i| scope.messages[i].uid)
                        .collect::<Vec<u32>>()
                })
                .collect::<Vec<_>>())
        })
        .await;
        let Ok(results) = results else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, result) in stale.into_iter().zip(results) {
            let Selected { kept, messages, .. } = &mut *selected;
            kept[i].changed(&mut out, messages, result);
            kept[i].seen = now;
        }
        out
    }

    /// RFC 5267 §4.2 CANCELUPDATE: the searches with these tags are no longer kept.
    pub(in crate::imap) fn cancel_update(
        &mut self,
        selected: &mut Selected,
        tags: &[String],
    ) -> Done {
        selected.kept.retain(|kept| !tags.contains(&kept.tag));
        ok("CANCELUPDATE completed")
    }
}

/// A SEARCH's return options (RFC 4731 §3.1, RFC 5182 §2, RFC 5267 §4, RFC 9394).
#[derive(Default)]
struct ReturnOptions {
    /// The answer is an ESEARCH (RETURN given, or an IMAP4rev2 session).
    esearch: bool,
    min: bool,
    max: bool,
    count: bool,
    all: bool,
    save: bool,
    update: bool,
    partial: Option<Partial>,
}

impl ReturnOptions {
    fn read(extended: &Extended, rev2: bool) -> Result<ReturnOptions, &'static str> {
        let Some(names) = &extended.search_return else {
            return Ok(ReturnOptions {
                esearch: rev2,
                all: rev2,
                ..Default::default()
            });
        };
        let mut options = ReturnOptions {
            esearch: true,
            ..Default::default()
        };
        for name in names {
            match name.as_str() {
                "MIN" => options.min = true,
                "MAX" => options.max = true,
                "COUNT" => options.count = true,
                "ALL" => options.all = true,
                "SAVE" => options.save = true,
                "UPDATE" => options.update = true,
                // RFC 5267 §4.2: a hint that more searches will follow; nothing to do.
                "CONTEXT" => {}
                "PARTIAL" => {
                    let range = extended.search_partial.as_deref().unwrap_or_default();
                    options.partial = Some(Partial::parse(range).ok_or("Invalid PARTIAL range")?);
                }
                _ if extended.search_partial.as_deref() == Some(name.as_str()) => {}
                _ => return Err("Unknown SEARCH return option"),
            }
        }
        // RFC 9394 §3.1: PARTIAL and ALL exclude each other.
        if options.partial.is_some() && options.all {
            return Err("PARTIAL and ALL cannot be combined");
        }
        // RETURN () is RETURN (ALL) (RFC 4731 §3.1); so is UPDATE alone (RFC 5267 §4.1).
        if !(options.min || options.max || options.count || options.partial.is_some())
            && (names.is_empty() || options.update || !options.save)
        {
            options.all = true;
        }
        Ok(options)
    }

    /// Only MIN and/or MAX were asked for.
    fn only_ends(&self) -> bool {
        (self.min || self.max) && !self.count && !self.all && self.partial.is_none()
    }

    /// RFC 5182 §2.1: SAVE alone returns no ESEARCH.
    fn save_only(&self) -> bool {
        self.save && !(self.min || self.max || self.count || self.all || self.partial.is_some())
    }

    fn reported(&self) -> Reported {
        if self.all || self.partial.is_some() {
            Reported::All
        } else {
            Reported::Summary {
                min: self.min,
                max: self.max,
                count: self.count,
            }
        }
    }
}

/// RFC 9394 §3.1: a PARTIAL range of positions in the result, 1-based; negative positions
/// count from the end (`-1` is the last).
#[derive(Clone, Copy)]
struct Partial {
    low: i64,
    high: i64,
}

impl Partial {
    fn parse(text: &str) -> Option<Partial> {
        let (a, b) = text.split_once(':')?;
        let (a, b): (i64, i64) = (a.parse().ok()?, b.parse().ok()?);
        // Both ends on the same side of zero, never zero (`*` does not parse).
        if a == 0
            || b == 0
            || (a < 0) != (b < 0)
            || a.abs() > u32::MAX as i64
            || b.abs() > u32::MAX as i64
        {
            return None;
        }
        Some(Partial {
            low: a.min(b),
            high: a.max(b),
        })
    }

    /// The slice `start..end` of a result of `len` messages the range covers.
    fn pick(self, len: usize) -> (usize, usize) {
        let len = len as i64;
        let (start, end) = if self.low > 0 {
            (self.low - 1, self.high)
        } else {
            (len + self.low, len + self.high + 1)
        };
        let clamp = |n: i64| n.clamp(0, len) as usize;
        (clamp(start), clamp(end).max(clamp(start)))
    }
}

impl std::fmt::Display for Partial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.low, self.high)
    }
}
