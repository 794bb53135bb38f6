// A Postern plugin in JavaScript (componentize-js).
//
// helo: refuses HELO/EHLO names listed in `blocked_helos` (dotless names like "localhost" from
//       a remote client are a classic spambot sign).
// rcpt: tempfails recipients whose local part starts with one of `paused_prefixes`
//       ("this mailbox is paused, try later").
// data: adds `X-JS-Filter` with the message size and the number of header fields it read.
//
//   [[plugin]]
//   name = "js-filter"
//   path = "examples/plugins/js-filter/js_filter.wasm"
//   capabilities = ["config"]
//   [plugin.config]
//   blocked_helos = ["spambot.example"]
//   paused_prefixes = ["paused"]

import { get } from "postern:plugin/config@0.1.0";

// The host renders arrays as TOML; JSON.parse reads the double-quoted form it uses.
function configList(key) {
  const text = get(key);
  if (text === undefined || text === null) return [];
  try {
    const value = JSON.parse(text);
    return Array.isArray(value) ? value.map(String) : [String(value)];
  } catch {
    return [];
  }
}

export const helo = {
  onHelo(session, name, extended) {
    if (configList("blocked_helos").some((h) => h.toLowerCase() === name.toLowerCase())) {
      return { tag: "reject", val: { code: 550, enhanced: "5.7.1", text: `HELO ${name} refused by the JavaScript filter` } };
    }
    return { tag: "continue" };
  },
};

export const rcpt = {
  onRcpt(session, sender, recipient, local) {
    const localPart = recipient.split("@")[0].toLowerCase();
    if (configList("paused_prefixes").some((p) => localPart.startsWith(p.toLowerCase()))) {
      return { tag: "tempfail", val: { code: 450, enhanced: "4.2.1", text: "Mailbox paused, try again later" } };
    }
    return { tag: "continue" };
  },
};

export const data = {
  onData(session, envelope, message) {
    const fields = message.headers().length;
    return {
      decision: { tag: "continue" },
      modifications: [
        { tag: "add-header", val: { name: "X-JS-Filter", value: `size=${message.size()} fields=${fields}` } },
      ],
    };
  },
};
