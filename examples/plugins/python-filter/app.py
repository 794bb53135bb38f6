"""A Postern plugin in Python (componentize-py).

rcpt: refuses recipients listed in `blocked_recipients`.
data: refuses messages whose Subject contains one of `blocked_words`; otherwise adds an
      `X-Python-Filter` header that says how many text parts it read.

    [[plugin]]
    name = "python-filter"
    path = "examples/plugins/python-filter/python_filter.wasm"
    capabilities = ["config", "log"]
    [plugin.config]
    blocked_recipients = ["blocked@example.test"]
    blocked_words = ["casino", "lottery"]
"""

import tomllib

from wit_world import exports
from wit_world.imports import config, log, types


def config_list(key: str) -> list[str]:
    text = config.get(key)
    if text is None:
        return []
    value = tomllib.loads(f"v = {text}")["v"]
    return [str(item) for item in value] if isinstance(value, list) else [str(value)]


def reject(text: str) -> types.Reply:
    return types.Reply(code=550, enhanced="5.7.1", text=text)


class Rcpt(exports.Rcpt):
    def on_rcpt(self, session: types.Session, sender: str, recipient: str, local: bool) -> types.Decision:
        if recipient.lower() in (r.lower() for r in config_list("blocked_recipients")):
            log.log(log.Level.INFO, f"python-filter: blocked recipient {recipient}")
            return types.Decision_Reject(reject("Recipient blocked by the Python filter"))
        return types.Decision_Continue()


class Data(exports.Data):
    def on_data(self, session: types.Session, envelope: types.Envelope, message: types.Message) -> types.DataVerdict:
        subject = " ".join(message.header("subject")).lower()
        for word in config_list("blocked_words"):
            if word.lower() in subject:
                return types.DataVerdict(
                    decision=types.DataDecision_Reject(reject(f"Subject contains the blocked word {word!r}")),
                    modifications=[],
                )
        parts = len(message.text_parts())
        header = types.HeaderField(name="X-Python-Filter", value=f"passed; {parts} text part(s) read")
        return types.DataVerdict(
            decision=types.DataDecision_Continue(),
            modifications=[types.Modification_AddHeader(header)],
        )
