//! Listing a folder's `new/` and `cur/`, and the kept listing that spares an unchanged folder
//! the directory reads (see [`Listing`]).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;

use super::*;

/// A listing of `new/` and `cur/` kept so that an unchanged folder costs two `stat` calls
/// instead of reading both directories (every snapshot lists them).
///
/// It is trusted while both directories keep the change times seen before and after it was
/// read (a listing during which either changed is not kept). Linux 6.13 and later give a
/// directory a new, fine-grained change time for any change after its time was looked at, so
/// every change by another process (mutt, a deliverer, another Postern) is seen at the next
/// snapshot. Changes this process makes update the kept listing in place and take the new
/// times, but only when the times were still those kept just before the change; a change by
/// someone else in that instant, or on a file system with coarse timestamps in the same tick,
/// could go unseen, so a listing is never trusted for longer than [`LISTING_MAX_AGE`].
pub(super) struct Listing {
    pub(super) files: Arc<HashMap<String, Listed>>,
    pub(super) stamps: DirStamps,
    pub(super) taken: std::time::Instant,
}

/// How long a kept listing may be trusted: the longest another process's change can stay
/// unseen (see [`Listing`]).
pub(super) const LISTING_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

/// Change times (seconds, nanoseconds) of `new/` and `cur/`; None for a missing directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DirStamps {
    pub(super) new: Option<(i64, i64)>,
    pub(super) cur: Option<(i64, i64)>,
}

impl DirStamps {
    pub(super) fn read(dir: &Path) -> io::Result<DirStamps> {
        use std::os::unix::fs::MetadataExt;
        let stamp = |sub: &str| match fs::metadata(dir.join(sub)) {
            Ok(meta) => Ok(Some((meta.mtime(), meta.mtime_nsec()))),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err),
        };
        Ok(DirStamps {
            new: stamp("new")?,
            cur: stamp("cur")?,
        })
    }
}

/// A message file found in `new/` or `cur/`.
#[derive(Clone)]
pub(super) struct Listed {
    /// `new/<name>` or `cur/<name>`.
    pub(super) location: String,
    pub(super) flags: Letters,
    /// CRLF size from the `,W=` part of the name, when the deliverer wrote one.
    pub(super) size: Option<u64>,
    pub(super) received_at: i64,
}

/// Lists a folder's messages by key. `new/` is read before `cur/`: a message moved from one to
/// the other between the two reads is then seen at least once (and `cur/` wins).
pub(super) fn list_files(dir: &Path) -> io::Result<HashMap<String, Listed>> {
    let mut files = HashMap::new();
    for sub in ["new", "cur"] {
        let entries = match fs::read_dir(dir.join(sub)) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        };
        for entry in entries {
            let entry = entry?;
            let Ok(name) = entry.file_name().into_string() else {
                continue; // not UTF-8: not something a Maildir deliverer writes
            };
            if name.starts_with('.') || name.contains(['\n', '\r', ' ']) {
                continue;
            }
            let (key, flags) = parse_name(&name);
            let received_at = key
                .split('.')
                .next()
                .and_then(|t| t.parse::<i64>().ok())
                .or_else(|| {
                    let modified = entry.metadata().ok()?.modified().ok()?;
                    let secs = modified.duration_since(std::time::UNIX_EPOCH).ok()?;
                    i64::try_from(secs.as_secs()).ok()
                })
                .unwrap_or(0);
            files.insert(
                key.to_string(),
                Listed {
                    location: format!("{sub}/{name}"),
                    flags,
                    size: size_field(key, ",W="),
                    received_at,
                },
            );
        }
    }
    Ok(files)
}

/// Where a message is now: its listed location, or wherever a rename took it. The folder's
/// kept listing (`kept`, when the caller holds the folder's lock) follows this process's own
/// renames, so a STORE followed by an EXPUNGE finds the file there; a file moved from `new/` to
/// `cur/` by another client keeps its flags, so that name is tried next; the folder is scanned
/// only when both miss.
pub(super) fn current_location(
    dir: &Path,
    message: &MessageInfo,
    kept: Option<&HashMap<String, Listed>>,
) -> io::Result<Option<String>> {
    if dir.join(message.handle.as_str()).exists() {
        return Ok(Some(message.handle.as_str().to_string()));
    }
    if let Some(listed) = kept.and_then(|files| files.get(&message.key)) {
        if listed.location != message.handle.as_str() && dir.join(&listed.location).exists() {
            return Ok(Some(listed.location.clone()));
        }
    }
    let renamed = format!(
        "cur/{}:2,{}",
        message.key,
        flag_letters(
            parse_name(
                message
                    .handle
                    .as_str()
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
            )
            .1
        )
    );
    if renamed != message.handle.as_str() && dir.join(&renamed).exists() {
        return Ok(Some(renamed));
    }
    locate(dir, &message.key)
}

pub(super) fn locate(dir: &Path, key: &str) -> io::Result<Option<String>> {
    Ok(list_files(dir)?.remove(key).map(|listed| listed.location))
}

impl FolderState {
    /// The folder's files: the kept listing while it is trusted, else a fresh one (kept when
    /// neither directory changed while it was read).
    pub(super) fn listed(&mut self, dir: &Path) -> io::Result<Arc<HashMap<String, Listed>>> {
        let before = DirStamps::read(dir)?;
        if let Some(kept) = &self.listing {
            if kept.stamps == before && kept.taken.elapsed() < LISTING_MAX_AGE {
                return Ok(kept.files.clone());
            }
        }
        let taken = std::time::Instant::now();
        let files = Arc::new(list_files(dir)?);
        let after = DirStamps::read(dir)?;
        self.listing = (before == after).then(|| Listing {
            files: files.clone(),
            stamps: after,
            taken,
        });
        Ok(files)
    }

    /// Before this process changes the folder's files: the kept listing, if it is still
    /// exact (so the change can be applied to it), else none (and it is dropped).
    pub(super) fn listing_before_change(&mut self, dir: &Path) -> Option<&mut Listing> {
        let exact = match (&self.listing, DirStamps::read(dir)) {
            (Some(kept), Ok(now)) => kept.stamps == now && kept.taken.elapsed() < LISTING_MAX_AGE,
            _ => false,
        };
        if !exact {
            self.listing = None;
        }
        self.listing.as_mut()
    }

    /// After this process changed the folder's files and applied the change to the kept
    /// listing: the listing takes the directories' new times.
    pub(super) fn listing_after_change(&mut self, dir: &Path) {
        if let Some(kept) = &mut self.listing {
            match DirStamps::read(dir) {
                Ok(now) => kept.stamps = now,
                Err(_) => self.listing = None,
            }
        }
    }
}
