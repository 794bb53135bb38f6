"""A Postern mailbox backend in Python (componentize-py): small and plain, to show that storage
too can be written in any language that compiles to a component. It passes the same mailbox
conformance suite as Maildir and the Rust backend.

Layout under its directory (`/data` in the sandbox), names percent-encoded:
`<mailbox>/<folder>/state.json` (UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ, each message's flags,
keywords, date, size and delivery id) and `<mailbox>/<folder>/m<uid>` (the message, CRLF);
per mailbox `subscriptions.json`, `metadata.json` and `validity`. Every change writes the files
it adds (flushed), then `state.json` whole (written aside, flushed, renamed, directory
flushed): the state on disk is always one that was acknowledged, or the one before it.

Each call reads the state from disk, so any number of instances can serve one directory.

    [[mailbox_backend]]
    name = "python-mailbox"
    path = "examples/plugins/python-mailbox/python_mailbox.wasm"
    domains = ["example.test"]
    memory_mb = 128
"""

import json
import os
import random
import urllib.parse

from componentize_py_types import Err, Ok
from wit_world import exports
from wit_world.imports import mailbox_types as t

ROOT = "/data"
CHUNK = 1 << 20
FLAG_BITS = [t.SystemFlags.SEEN, t.SystemFlags.ANSWERED, t.SystemFlags.FLAGGED,
             t.SystemFlags.DELETED, t.SystemFlags.DRAFT, t.SystemFlags.FORWARDED]


def enc(name: str) -> str:
    return urllib.parse.quote(name, safe="@-_+").replace(".", "%2E")


def bits(flags: t.SystemFlags) -> int:
    return sum(1 << i for i, f in enumerate(FLAG_BITS) if f in flags)


def flags_of(value: int) -> t.SystemFlags:
    out = t.SystemFlags(0)
    for i, f in enumerate(FLAG_BITS):
        if value & (1 << i):
            out |= f
    return out


def unique(keywords):
    out = []
    for k in keywords:
        if not any(o.lower() == k.lower() for o in out):
            out.append(k)
    return out


def is_inbox(folder: str) -> bool:
    return folder.upper() == "INBOX"


def valid_folder(folder: str) -> bool:
    if is_inbox(folder):
        return True
    parts = folder.split("/")
    return 0 < len(folder) <= 255 and all(p and p not in (".", "..") for p in parts)


def mdir(mailbox: str) -> str:
    return os.path.join(ROOT, enc(mailbox.lower()))


def fdir(mailbox: str, folder: str) -> str:
    return os.path.join(mdir(mailbox), "f" + enc("INBOX" if is_inbox(folder) else folder))


def fail(error):
    raise Err(error)


def io_error(err: OSError):
    if getattr(err, "errno", None) == 28:  # ENOSPC
        return t.StoreError_Full(str(err))
    return t.StoreError_Io(str(err))


def sync_dir(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(directory: str, name: str, data: bytes):
    tmp = os.path.join(directory, name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, name))
    sync_dir(directory)


def read_json(path: str, default):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return default


def ensure_mailbox(mailbox: str) -> str:
    d = mdir(mailbox)
    if not os.path.isdir(d):
        os.makedirs(d, exist_ok=True)
        sync_dir(ROOT)
    return d


def next_validity(mailbox: str) -> int:
    d = ensure_mailbox(mailbox)
    last = read_json(os.path.join(d, "validity"), None)
    value = (last + 1) if isinstance(last, int) else random.randint(1, 1 << 30)
    write_durably(d, "validity", json.dumps(value).encode())
    return value


def make_folder(mailbox: str, folder: str, validity=None):
    parent = ensure_mailbox(mailbox)
    d = fdir(mailbox, folder)
    os.mkdir(d)
    state = {"validity": validity or next_validity(mailbox), "next": 1, "highest": 1,
             "messages": {}, "defined": [], "delivered": []}
    write_durably(d, "state.json", json.dumps(state).encode())
    sync_dir(parent)
    return state


def load(mailbox: str, folder: str, create=False):
    d = fdir(mailbox, folder)
    state = read_json(os.path.join(d, "state.json"), None)
    if state is None:
        if create or is_inbox(folder):
            return make_folder(mailbox, folder)
        fail(t.StoreError_NoSuchFolder(folder))
    return state


def save(mailbox: str, folder: str, state):
    write_durably(fdir(mailbox, folder), "state.json", json.dumps(state).encode())


def define(state, keywords):
    for k in keywords:
        if not any(d.lower() == k.lower() for d in state["defined"]):
            state["defined"].append(k)


def store_body(d: str, uid: int, prepend: bytes, source: t.Incoming) -> int:
    size = source.size()
    path = os.path.join(d, f"m{uid}")
    with open(path, "wb") as f:
        f.write(prepend)
        offset = 0
        while offset < size:
            chunk = source.read(offset, CHUNK)
            if not chunk:
                break
            f.write(chunk)
            offset += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    return len(prepend) + offset


def add(state, uid, size, flags, keywords, received, delivery=None):
    state["messages"][str(uid)] = {"size": size, "flags": flags, "keywords": unique(keywords),
                                   "received": received, "modseq": state["highest"] + 1}
    state["highest"] += 1
    state["next"] = max(state["next"], uid + 1)
    define(state, keywords)
    if delivery:
        state["delivered"].append(delivery)


def find(state, ref: t.MessageRef):
    m = state["messages"].get(str(ref.uid))
    return m if m is not None and ref.key == str(ref.uid) else None


def guard(call):
    """Runs a call, answering OS errors as the contract's."""
    try:
        return call()
    except OSError as err:
        raise Err(io_error(err))


class Mailbox(exports.Mailbox):
    def deliver(self, batch):
        results = []
        for d in batch:
            try:
                state = load(d.mailbox, d.folder, create=True)
                if d.delivery_id not in state["delivered"]:
                    uid = state["next"]
                    size = store_body(fdir(d.mailbox, d.folder), uid, d.prepend, d.message)
                    sync_dir(fdir(d.mailbox, d.folder))
                    add(state, uid, size, 0, [], d.received_at, d.delivery_id)
                    save(d.mailbox, d.folder, state)
                results.append(Ok(None))
            except Err as err:
                results.append(err)
            except OSError as err:
                results.append(Err(io_error(err)))
        return results

    def snapshot(self, mailbox, folder):
        def run():
            s = load(mailbox, folder)
            messages = [
                t.MessageInfo(uid=int(uid), key=uid, handle="", size=m["size"],
                              flags=flags_of(m["flags"]), keywords=m["keywords"],
                              received_at=m["received"], modseq=m["modseq"])
                for uid, m in sorted(s["messages"].items(), key=lambda kv: int(kv[0]))
            ]
            return t.FolderSnapshot(uid_validity=s["validity"], uid_next=s["next"],
                                    messages=messages, keywords=s["defined"],
                                    more_keywords=True, highest_modseq=s["highest"])
        return guard(run)

    def read(self, mailbox, folder, message, offset, len):
        def run():
            m = find(load(mailbox, folder), message)
            if m is None:
                fail(t.StoreError_Gone(message.key))
            with open(os.path.join(fdir(mailbox, folder), f"m{message.uid}"), "rb") as f:
                f.seek(offset)
                return f.read(min(len, CHUNK, max(0, m["size"] - offset)))
        return guard(run)

    def read_headers(self, mailbox, folder, messages):
        out = []
        for ref in messages:
            try:
                whole = self.read(mailbox, folder, ref, 0, CHUNK)
                end = whole.find(b"\r\n\r\n")
                out.append(Ok(whole[:end + 4] if end >= 0 else whole))
            except Err as err:
                out.append(err)
        return out

    def change_flags(self, mailbox, folder, messages, change, unchanged_since):
        def run():
            s = load(mailbox, folder)
            outcome = t.FlagOutcome(updated=[], refused=[])
            wanted = bits(change.flags)
            changed = False
            for ref in messages:
                m = find(s, ref)
                if m is None:
                    continue
                if unchanged_since is not None and m["modseq"] > unchanged_since:
                    outcome.refused.append(ref.uid)
                    continue
                if change.mode == t.FlagMode.ADD:
                    new = (m["flags"] | wanted, unique(m["keywords"] + change.keywords))
                elif change.mode == t.FlagMode.REMOVE:
                    gone = {k.lower() for k in change.keywords}
                    new = (m["flags"] & ~wanted, [k for k in m["keywords"] if k.lower() not in gone])
                else:
                    new = (wanted, unique(change.keywords))
                same = new[0] == m["flags"] and {k.lower() for k in new[1]} == {k.lower() for k in m["keywords"]}
                if not same:
                    s["highest"] += 1
                    m["flags"], m["keywords"], m["modseq"] = new[0], new[1], s["highest"]
                    define(s, new[1])
                    changed = True
                outcome.updated.append(t.Updated(uid=ref.uid, flags=flags_of(m["flags"]),
                                                 keywords=m["keywords"], modseq=m["modseq"]))
            if changed:
                save(mailbox, folder, s)
            return outcome
        return guard(run)

    def append(self, mailbox, folder, message, flags, keywords, received_at):
        def run():
            s = load(mailbox, folder)
            uid = s["next"]
            size = store_body(fdir(mailbox, folder), uid, b"", message)
            sync_dir(fdir(mailbox, folder))
            add(s, uid, size, bits(flags), keywords, received_at)
            save(mailbox, folder, s)
            return (s["validity"], uid)
        return guard(run)

    def copy(self, mailbox, folder, messages, target):
        def run():
            source = load(mailbox, folder)
            dest = load(mailbox, target)
            pairs = []
            for ref in messages:
                m = find(source, ref)
                if m is None:
                    continue
                uid = dest["next"]
                with open(os.path.join(fdir(mailbox, folder), f"m{ref.uid}"), "rb") as f:
                    data = f.read()
                with open(os.path.join(fdir(mailbox, target), f"m{uid}"), "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                add(dest, uid, m["size"], m["flags"], m["keywords"], m["received"])
                pairs.append((ref.uid, uid))
            sync_dir(fdir(mailbox, target))
            save(mailbox, target, dest)
            return (dest["validity"], pairs)
        return guard(run)

    def remove(self, mailbox, folder, messages):
        def run():
            s = load(mailbox, folder)
            gone = [ref for ref in messages if find(s, ref) is not None]
            if not gone:
                return None
            for ref in gone:
                del s["messages"][str(ref.uid)]
            s["highest"] += 1
            save(mailbox, folder, s)
            for ref in gone:
                try:
                    os.remove(os.path.join(fdir(mailbox, folder), f"m{ref.uid}"))
                except FileNotFoundError:
                    pass
            return None
        return guard(run)

    def _folders(self, mailbox):
        try:
            names = os.listdir(mdir(mailbox))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            if name.startswith("f") and os.path.exists(os.path.join(mdir(mailbox), name, "state.json")):
                out.append(urllib.parse.unquote(name[1:]))
        return out

    def folders(self, mailbox):
        return guard(lambda: [f for f in self._folders(mailbox) if not is_inbox(f)])

    def create_folder(self, mailbox, folder):
        if is_inbox(folder) or not valid_folder(folder):
            fail(t.StoreError_InvalidName(folder))
        if os.path.exists(fdir(mailbox, folder)):
            fail(t.StoreError_Exists(folder))
        guard(lambda: make_folder(mailbox, folder))

    def _drop(self, mailbox, folder):
        d = fdir(mailbox, folder)
        doomed = os.path.join(mdir(mailbox), f"trash{random.getrandbits(48)}")
        os.rename(d, doomed)
        sync_dir(mdir(mailbox))
        for name in os.listdir(doomed):
            os.remove(os.path.join(doomed, name))
        os.rmdir(doomed)

    def delete_folder(self, mailbox, folder):
        if is_inbox(folder):
            fail(t.StoreError_InvalidName(folder))
        if not os.path.isdir(fdir(mailbox, folder)):
            fail(t.StoreError_NoSuchFolder(folder))
        guard(lambda: self._drop(mailbox, folder))

    def rename_folder(self, mailbox, from_, to):
        if is_inbox(to) or not valid_folder(to):
            fail(t.StoreError_InvalidName(to))
        if os.path.exists(fdir(mailbox, to)):
            fail(t.StoreError_Exists(to))
        if is_inbox(from_):
            self.create_folder(mailbox, to)
            listed = self.snapshot(mailbox, "INBOX").messages
            refs = [t.MessageRef(uid=m.uid, key=m.key, handle=m.handle) for m in listed]
            self.copy(mailbox, "INBOX", refs, to)
            self.remove(mailbox, "INBOX", refs)
            return
        if not os.path.isdir(fdir(mailbox, from_)):
            fail(t.StoreError_NoSuchFolder(from_))

        def run():
            for name in self._folders(mailbox):
                if name == from_ or name.startswith(from_ + "/"):
                    os.rename(fdir(mailbox, name), fdir(mailbox, to + name[len(from_):]))
            sync_dir(mdir(mailbox))
        guard(run)

    def subscriptions(self, mailbox):
        return guard(lambda: read_json(os.path.join(mdir(mailbox), "subscriptions.json"), []))

    def set_subscribed(self, mailbox, folder, subscribed):
        def run():
            d = ensure_mailbox(mailbox)
            names = [n for n in read_json(os.path.join(d, "subscriptions.json"), []) if n != folder]
            if subscribed:
                names.append(folder)
            write_durably(d, "subscriptions.json", json.dumps(names).encode())
        guard(run)

    def recent_boundary(self, mailbox, folder, validity, claim):
        def run():
            load(mailbox, folder)
            path = os.path.join(fdir(mailbox, folder), "recent.json")
            known, boundary = read_json(path, [validity, 0])
            boundary = boundary if known == validity else 0
            if claim is not None and claim > boundary:
                with open(path, "w") as f:  # advisory: not flushed
                    f.write(json.dumps([validity, claim]))
            return boundary
        return guard(run)

    def _metadata_path(self, mailbox, folder):
        if folder is None:
            return os.path.join(ensure_mailbox(mailbox), "metadata.json")
        load(mailbox, folder)
        return os.path.join(fdir(mailbox, folder), "metadata.json")

    def metadata(self, mailbox, folder):
        def run():
            entries = read_json(self._metadata_path(mailbox, folder), {})
            return [(k, bytes.fromhex(v)) for k, v in sorted(entries.items())]
        return guard(run)

    def set_metadata(self, mailbox, folder, changes):
        def run():
            path = self._metadata_path(mailbox, folder)
            entries = read_json(path, {})
            for name, value in changes:
                if value is None:
                    entries.pop(name, None)
                else:
                    entries[name] = value.hex()
            write_durably(os.path.dirname(path), "metadata.json", json.dumps(entries).encode())
        guard(run)

    def import_messages(self, mailbox, folder, numbers, messages):
        if not valid_folder(folder):
            fail(t.StoreError_InvalidName(folder))

        def run():
            d = fdir(mailbox, folder)
            s = read_json(os.path.join(d, "state.json"), None)
            if s is None:
                s = make_folder(mailbox, folder, numbers.uid_validity)
            elif s["validity"] != numbers.uid_validity:
                if s["messages"] or s["next"] > 1:
                    fail(t.StoreError_Exists(folder))
                s["validity"] = numbers.uid_validity
            last = max((int(u) for u in s["messages"]), default=0)
            for m in messages:
                if str(m.uid) in s["messages"]:
                    continue
                if m.uid <= last:
                    fail(t.StoreError_Exists(f"{folder}: UID {m.uid}"))
                size = store_body(d, m.uid, b"", m.message)
                add(s, m.uid, size, bits(m.flags), m.keywords, m.received_at)
                last = m.uid
            sync_dir(d)
            s["next"] = max(s["next"], numbers.uid_next, last + 1)
            s["highest"] = max(s["highest"], numbers.highest_modseq)
            save(mailbox, folder, s)
        guard(run)

    def usage(self, mailbox):
        def run():
            total = t.MailboxUsage(bytes=0, messages=0)
            for name in self._folders(mailbox):
                s = load(mailbox, name)
                total.messages += len(s["messages"])
                total.bytes += sum(m["size"] for m in s["messages"].values())
            return total
        return guard(run)
