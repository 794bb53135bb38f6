//! SEARCH (RFC 9051 §6.4.4, ESEARCH of RFC 4731), SORT and ESORT (RFC 5256, RFC 5267) and THREAD (RFC 5256) over the selected folder.

use crate::imap::codec::{self, Extended};
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

/// The selected folder as a SEARCH, SORT or THREAD sees it, owned so it can go to a blocking
/// thread.
pub(in crate::imap) struct SearchScope {
    user: String,
    store: Arc<dyn MailStore>,
    folder: String,
    messages: Vec<MessageInfo>,
    keywords: Vec<String>,
    recent: std::collections::HashSet<u32>,
}

impl SearchScope {
    /// Indexes of the messages `key` matches. Blocking: reads headers and bodies as needed.
    pub(in crate::imap) fn matching(&self, key: &SearchKey<'_>) -> Vec<usize> {
        let last_seq = self.messages.len() as u32;
        let last_uid = self.messages.last().map(|m| m.uid).unwrap_or(0);
        let sets = search::SetCache::new(key);
        let mut found = Vec::new();
        for (i, info) in self.messages.iter().enumerate() {
            let subject = Subject {
                seq: i as u32 + 1,
                info,
                last_seq,
                last_uid,
                keywords: &self.keywords,
                sets: &sets,
                recent: self.recent.contains(&info.uid),
            };
            let mut load_header = || self.store.read_header(&self.user, &self.folder, info).ok();
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
        let store = self.server.store.clone();
        let rev2 = self.rev2;
        SearchScope {
            user: user.to_string(),
            store,
            folder: selected.folder.clone(),
            messages: selected.messages.clone(),
            keywords: selected.keywords.clone(),
            recent: if rev2 {
                Default::default()
            } else {
                selected.recent.clone()
            },
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
        let sorted = blocking(self.id, move || {
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
        let rendered = blocking(self.id, move || {
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

    #[allow(clippy::too_many_arguments)]
    pub(in crate::imap) async fn search<S>(
        &mut self,
        io: &mut Io<S>,
        selected: &Selected,
        scope: SearchScope,
        tag: &str,
        key: SearchKey<'static>,
        uid: bool,
        extended: &Extended,
    ) -> Done
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let by_modseq = search::uses_modseq(&key);
        if by_modseq {
            self.enable_condstore(io, Some(selected));
        }
        let found = blocking(self.id, move || {
            Ok(scope
                .matching(&key)
                .into_iter()
                .map(|i| {
                    let info = &scope.messages[i];
                    (if uid { info.uid } else { i as u32 + 1 }, info.modseq)
                })
                .collect::<Vec<_>>())
        })
        .await;
        let found = match found {
            Ok(found) => found,
            Err(err) => return store_failure(&err),
        };
        let returns = match &extended.search_return {
            Some(options) => Some(options.clone()),
            None if self.rev2 => Some(vec!["ALL".into()]),
            None => None,
        };
        // RFC 7162 §3.1.5: a search by MODSEQ tells the highest mod-sequence of what it returns:
        // of the MIN and MAX messages when only those are asked for (RFC 4731 §3.2), else of
        // every message found.
        let only_ends = returns.as_ref().is_some_and(|options| {
            !options.is_empty() && options.iter().all(|o| o == "MIN" || o == "MAX")
        });
        let modseq = if !by_modseq || found.is_empty() {
            None
        } else if only_ends {
            let options = returns.as_deref().unwrap_or_default();
            let min = found.iter().min_by_key(|(n, _)| *n);
            let max = found.iter().max_by_key(|(n, _)| *n);
            [
                options.iter().any(|o| o == "MIN").then_some(min).flatten(),
                options.iter().any(|o| o == "MAX").then_some(max).flatten(),
            ]
            .into_iter()
            .flatten()
            .map(|(_, modseq)| *modseq)
            .max()
        } else {
            found.iter().map(|(_, modseq)| *modseq).max()
        };
        let found: Vec<u32> = found.into_iter().map(|(n, _)| n).collect();
        let mut out = Vec::new();
        match returns {
            None => {
                out.extend_from_slice(b"* SEARCH");
                for n in &found {
                    out.extend_from_slice(format!(" {n}").as_bytes());
                }
                if let Some(modseq) = modseq {
                    out.extend_from_slice(format!(" (MODSEQ {modseq})").as_bytes());
                }
                out.extend_from_slice(b"\r\n");
            }
            Some(mut options) => {
                if options.is_empty() {
                    options.push("ALL".into());
                }
                esearch_head(&mut out, tag, uid);
                for option in &options {
                    match option.as_str() {
                        "MIN" if !found.is_empty() => out.extend_from_slice(
                            format!(" MIN {}", found.iter().min().unwrap_or(&0)).as_bytes(),
                        ),
                        "MAX" if !found.is_empty() => out.extend_from_slice(
                            format!(" MAX {}", found.iter().max().unwrap_or(&0)).as_bytes(),
                        ),
                        "COUNT" => {
                            out.extend_from_slice(format!(" COUNT {}", found.len()).as_bytes())
                        }
                        "ALL" if !found.is_empty() => out.extend_from_slice(
                            format!(" ALL {}", uid_set(found.clone())).as_bytes(),
                        ),
                        _ => {}
                    }
                }
                if let Some(modseq) = modseq {
                    out.extend_from_slice(format!(" MODSEQ {modseq}").as_bytes());
                }
                out.extend_from_slice(b"\r\n");
            }
        }
        io.queue(&out);
        ok("SEARCH completed")
    }
}
