//! THREAD (RFC 5256 §3): ORDEREDSUBJECT and REFERENCES over the messages a search found, and the
//! thread-list answer of §4. Pure: the session gives each message's [`Fields`].

use std::collections::HashMap;

use super::sort::Fields;

/// A thread node: a message (by its index in the input) or a dummy holding children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub message: Option<usize>,
    pub children: Vec<Node>,
}

/// RFC 5256 §2.2 sent-date order: the Date field (or the internal date), then the sequence
/// number. A dummy sorts as its first child.
fn key(messages: &[Fields], node: &Node) -> (i64, u32) {
    match node.message {
        Some(m) => (messages[m].sent, messages[m].seq),
        None => node
            .children
            .first()
            .map_or((i64::MAX, u32::MAX), |c| key(messages, c)),
    }
}

/// ORDEREDSUBJECT: by base subject, then sent date; one thread per subject, its first message
/// the parent of all the others; threads in the sent-date order of their first messages.
pub fn ordered_subject(messages: &[Fields]) -> Vec<Node> {
    let mut order: Vec<usize> = (0..messages.len()).collect();
    order.sort_by(|a, b| {
        let (a, b) = (&messages[*a], &messages[*b]);
        (&a.subject, a.sent, a.seq).cmp(&(&b.subject, b.sent, b.seq))
    });
    let mut threads: Vec<Node> = Vec::new();
    let mut current: Option<&str> = None;
    for m in order {
        let subject = messages[m].subject.as_str();
        let leaf = Node {
            message: Some(m),
            children: Vec::new(),
        };
        match (current, threads.last_mut()) {
            (Some(s), Some(thread)) if s == subject => thread.children.push(leaf),
            _ => {
                threads.push(leaf);
                current = Some(subject);
            }
        }
    }
    threads.sort_by_key(|t| key(messages, t));
    threads
}

/// REFERENCES (RFC 5256 §3, after Zawinski's algorithm): link by Message-ID, References and
/// In-Reply-To; prune dummies; merge threads of the same base subject; sort siblings by date.
pub fn references(messages: &[Fields]) -> Vec<Node> {
    // Containers: one per Message-ID seen (as a message or a reference), plus one per message
    // without a (unique) Message-ID.
    struct Container {
        message: Option<usize>,
        parent: Option<usize>,
        children: Vec<usize>,
    }
    let mut containers: Vec<Container> = Vec::new();
    let mut by_id: HashMap<String, usize> = HashMap::new();
    let mut container_of = |id: &str, containers: &mut Vec<Container>| -> usize {
        *by_id.entry(id.to_string()).or_insert_with(|| {
            containers.push(Container {
                message: None,
                parent: None,
                children: Vec::new(),
            });
            containers.len() - 1
        })
    };
    fn is_descendant(containers: &[Container], node: usize, of: usize) -> bool {
        // Walks up from `node`: is `of` an ancestor of it (or itself)?
        let mut at = Some(node);
        let mut steps = 0;
        while let Some(n) = at {
            if n == of {
                return true;
            }
            at = containers[n].parent;
            steps += 1;
            if steps > containers.len() {
                return true; // a loop: treat as related, link nothing
            }
        }
        false
    }
    fn unlink(containers: &mut [Container], child: usize) {
        if let Some(parent) = containers[child].parent.take() {
            containers[parent].children.retain(|c| *c != child);
        }
    }
    fn link(containers: &mut [Container], parent: usize, child: usize) {
        containers[child].parent = Some(parent);
        containers[parent].children.push(child);
    }
    for (m, fields) in messages.iter().enumerate() {
        // (1B) the message's own container; a missing or repeated Message-ID gets its own.
        let own = match &fields.message_id {
            Some(id) => {
                let c = container_of(id, &mut containers);
                if containers[c].message.is_some() {
                    containers.push(Container {
                        message: None,
                        parent: None,
                        children: Vec::new(),
                    });
                    containers.len() - 1
                } else {
                    c
                }
            }
            None => {
                containers.push(Container {
                    message: None,
                    parent: None,
                    children: Vec::new(),
                });
                containers.len() - 1
            }
        };
        containers[own].message = Some(m);
        // (1A) each reference the parent of the next; existing links stay; no loops.
        let refs: Vec<usize> = fields
            .references
            .iter()
            .map(|id| container_of(id, &mut containers))
            .collect();
        for pair in refs.windows(2) {
            let (parent, child) = (pair[0], pair[1]);
            if parent != child
                && containers[child].parent.is_none()
                && !is_descendant(&containers, parent, child)
            {
                link(&mut containers, parent, child);
            }
        }
        // (1B) the last reference is the parent, replacing any link made before.
        unlink(&mut containers, own);
        if let Some(&parent) = refs.last() {
            if parent != own && !is_descendant(&containers, parent, own) {
                link(&mut containers, parent, own);
            }
        }
    }
    // (2) the root set; (4) dummies pruned (children promoted, but at the root only a single
    // child).
    fn build(containers: &[Container], c: usize) -> Vec<Node> {
        let mut children: Vec<Node> = Vec::new();
        for &child in &containers[c].children {
            children.extend(build(containers, child));
        }
        match containers[c].message {
            Some(m) => vec![Node {
                message: Some(m),
                children,
            }],
            None => children,
        }
    }
    let mut roots: Vec<Node> = Vec::new();
    for (c, container) in containers.iter().enumerate() {
        if container.parent.is_some() {
            continue;
        }
        let mut children: Vec<Node> = Vec::new();
        for &child in &container.children {
            children.extend(build(&containers, child));
        }
        match container.message {
            Some(m) => roots.push(Node {
                message: Some(m),
                children,
            }),
            None if children.len() == 1 => roots.extend(children),
            None if children.is_empty() => {}
            None => roots.push(Node {
                message: None,
                children,
            }),
        }
        let _ = c;
    }
    // (5) the root set by sent date (a dummy by its earliest child).
    for root in roots.iter_mut().filter(|r| r.message.is_none()) {
        root.children.sort_by_key(|c| key(messages, c));
    }
    roots.sort_by_key(|r| key(messages, r));
    // (6) threads of the same base subject merged.
    let subject_of = |node: &Node| -> Option<usize> {
        node.message
            .or_else(|| node.children.first().and_then(|c| c.message))
    };
    let mut table: HashMap<String, usize> = HashMap::new();
    for (i, root) in roots.iter().enumerate() {
        let Some(m) = subject_of(root) else { continue };
        let subject = &messages[m].subject;
        if subject.is_empty() {
            continue;
        }
        match table.get(subject) {
            None => {
                table.insert(subject.clone(), i);
            }
            Some(&held) => {
                let held_node = &roots[held];
                let replace = held_node.message.is_some()
                    && (root.message.is_none()
                        || (held_node
                            .message
                            .is_some_and(|h| messages[h].subject_is_reply)
                            && root.message.is_some_and(|r| !messages[r].subject_is_reply)));
                if replace {
                    table.insert(subject.clone(), i);
                }
            }
        }
    }
    let mut merged: Vec<Option<Node>> = roots.into_iter().map(Some).collect();
    for i in 0..merged.len() {
        let Some(root) = &merged[i] else { continue };
        let Some(m) = subject_of(root) else { continue };
        let subject = messages[m].subject.clone();
        if subject.is_empty() {
            continue;
        }
        let Some(&held) = table.get(&subject) else {
            continue;
        };
        if held == i || merged[held].is_none() {
            continue;
        }
        let current = merged[i].take().expect("present");
        let target = merged[held].as_mut().expect("present");
        let current_reply = current
            .message
            .is_some_and(|c| messages[c].subject_is_reply);
        let target_reply = target.message.is_some_and(|t| messages[t].subject_is_reply);
        match (target.message.is_none(), current.message.is_none()) {
            (true, true) => target.children.extend(current.children),
            (true, false) => target.children.push(current),
            _ if current_reply && !target_reply => target.children.push(current),
            _ => {
                let old = std::mem::replace(
                    target,
                    Node {
                        message: None,
                        children: Vec::new(),
                    },
                );
                target.children = vec![old, current];
            }
        }
    }
    let mut roots: Vec<Node> = merged.into_iter().flatten().collect();
    // (7) every set of siblings by sent date, the deepest first; the root set last.
    fn sort_children(messages: &[Fields], node: &mut Node) {
        for child in &mut node.children {
            sort_children(messages, child);
        }
        node.children.sort_by_key(|c| key(messages, c));
    }
    for root in &mut roots {
        sort_children(messages, root);
    }
    roots.sort_by_key(|r| key(messages, r));
    roots
}

/// The THREAD response's thread lists (RFC 5256 §4), numbering each message with `number`.
pub fn render(out: &mut Vec<u8>, threads: &[Node], number: &dyn Fn(usize) -> u32) {
    fn members(out: &mut Vec<u8>, node: &Node, number: &dyn Fn(usize) -> u32) {
        match node.message {
            Some(m) => {
                out.extend_from_slice(number(m).to_string().as_bytes());
                match node.children.as_slice() {
                    [] => {}
                    [only] => {
                        out.push(b' ');
                        members(out, only, number);
                    }
                    children => {
                        out.push(b' ');
                        for child in children {
                            out.push(b'(');
                            members(out, child, number);
                            out.push(b')');
                        }
                    }
                }
            }
            None => {
                for child in &node.children {
                    out.push(b'(');
                    members(out, child, number);
                    out.push(b')');
                }
            }
        }
    }
    for thread in threads {
        out.push(b'(');
        members(out, thread, number);
        out.push(b')');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u32, id: &str, refs: &[&str], subject: &str, sent: i64) -> Fields {
        Fields {
            seq,
            uid: seq,
            sent,
            subject: subject.to_ascii_uppercase(),
            message_id: Some(id.into()),
            references: refs.iter().map(|r| r.to_string()).collect(),
            ..Fields::default()
        }
    }

    fn text(threads: &[Node], messages: &[Fields]) -> String {
        let mut out = Vec::new();
        render(&mut out, threads, &|m| messages[m].seq);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn references_link_replies_and_missing_parents() {
        let messages = vec![
            msg(1, "<a>", &[], "topic", 10),
            msg(2, "<b>", &["<a>"], "topic", 20),
            msg(3, "<c>", &["<a>", "<b>"], "topic", 30),
            msg(4, "<d>", &["<a>"], "topic", 25),
            msg(5, "<e>", &["<gone>"], "other", 40),
            msg(6, "<f>", &["<gone>"], "other", 50),
            msg(7, "<g>", &[], "lonely", 5),
        ];
        let threads = references(&messages);
        assert_eq!(text(&threads, &messages), "(7)(1 (2 3)(4))((5)(6))");
    }

    #[test]
    fn ordered_subject_groups_by_subject() {
        let messages = vec![
            msg(1, "<a>", &[], "b", 30),
            msg(2, "<b>", &[], "a", 20),
            msg(3, "<c>", &[], "b", 10),
            msg(4, "<d>", &[], "a", 40),
            msg(5, "<e>", &[], "a", 50),
        ];
        assert_eq!(
            text(&ordered_subject(&messages), &messages),
            "(3 1)(2 (4)(5))"
        );
    }
}
