"""Keep secrets out of anything :mod:`forge.trackers` sends to a tracker.

Two nets, both applied: keys that name a secret (``hub_token``, ``api_key``, ``password``, ...)
have their value replaced whatever it is, and string values that look like a credential
(Hugging Face, W&B, OpenAI, GitHub, AWS keys, a password inside a URL) are replaced wherever
they appear, so a token pasted into an unexpected field is caught too.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml

from forge.core.safeyaml import load_yaml
from forge.errors import ForgeError

REDACTED = "<redacted>"

# A key names a secret when its last word is one of these (``hub_token``, ``wandb_api_key``).
_SECRET_KEY = re.compile(
    r"(?:^|[_\-.])(?:token|api[_-]?key|apikey|secret(?:[_-]?key)?|password|passwd|pwd|"
    r"credentials?|private[_-]?key|access[_-]?key)$",
    re.IGNORECASE,
)
# ...except the tokenizer's special tokens, which are vocabulary, not credentials.
_SPECIAL_TOKEN_KEY = re.compile(
    r"^(?:pad|eos|bos|unk|sep|cls|mask|start|end|image|audio|video|boi|eoi|special|chat|"
    r"decoder_start|additional_special)_token$",
    re.IGNORECASE,
)
_SECRET_VALUES = [
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),  # Hugging Face user access token
    re.compile(r"\bsk-[A-Za-z0-9_\-]{20,}"),  # OpenAI (and Anthropic sk-ant-) keys
    re.compile(r"\bwandb_v\d+_[A-Za-z0-9_]{20,}\b"),  # newer W&B keys
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),  # GitHub tokens
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{30,}\b"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # AWS access key id
]
# ``https://user:password@host``: keep the user and the host, drop the password.
_URL_PASSWORD = re.compile(r"(://[^/\s:@]+:)[^/\s@]+(@)")
# The classic W&B API key is 40 hex characters: the shape of a git commit hash, so under the
# keys below (``model.revision``) such a value is left alone.
_HEX40 = re.compile(r"\b(?:local-)?[0-9a-f]{40}\b")
_HASH_KEYS = {"revision", "commit", "sha", "git_sha", "commit_hash"}


def is_secret_key(key: str) -> bool:
    """Whether a config key names a credential.

    Example:
        >>> is_secret_key("hub_token"), is_secret_key("pad_token"), is_secret_key("max_tokens")
        (True, False, False)
    """
    return bool(_SECRET_KEY.search(key)) and not _SPECIAL_TOKEN_KEY.match(key)


def redact_text(text: str, *, keep_hashes: bool = False) -> str:
    """``text`` with every substring that looks like a credential replaced by ``<redacted>``.

    Args:
        text: any string (a value, a whole YAML document, a log line).
        keep_hashes: leave 40-hex strings alone (the value of a ``revision:`` key).

    Example:
        >>> redact_text("token hf_" + "a" * 34 + " and https://me:pw@mlflow.example.com")
        'token <redacted> and https://me:<redacted>@mlflow.example.com'
    """
    for pattern in _SECRET_VALUES if keep_hashes else [*_SECRET_VALUES, _HEX40]:
        text = pattern.sub(REDACTED, text)
    return _URL_PASSWORD.sub(rf"\1{REDACTED}\2", text)


def redact(obj: Any, _key: str = "") -> Any:
    """A deep copy of a config (dicts, lists, strings) with secrets replaced.

    Example:
        >>> redact({"training": {"hub_token": "abc", "learning_rate": 1e-4}})
        {'training': {'hub_token': '<redacted>', 'learning_rate': 0.0001}}
    """
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            name = str(key)
            if is_secret_key(name) and value not in (None, "", False):
                out[key] = REDACTED
            else:
                out[key] = redact(value, name)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, _key) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj, keep_hashes=_key.lower() in _HASH_KEYS)
    return copy.deepcopy(obj)


def redact_yaml(text: str) -> str:
    """A YAML document (e.g. a resolved preset) with secrets replaced; leading comments kept.

    Example:
        >>> redact_yaml("# my run\\ntraining:\\n  hub_token: abc\\n")
        '# my run\\ntraining:\\n  hub_token: <redacted>\\n'
    """
    header = ""
    for line in text.splitlines(keepends=True):
        if not line.startswith("#"):
            break
        header += line
    try:  # within a budget: a "billion laughs" run file must not hang `forge report`
        data = load_yaml(text, "preset")
    except (yaml.YAMLError, ForgeError):
        data = None
    if isinstance(data, dict):
        body = yaml.safe_dump(redact(data), sort_keys=False, allow_unicode=True)
        # Comments can hold secrets too; the text pass below covers them.
        return redact_text(header + body)
    # Not a mapping we can walk: fall back to line-wise key matching plus the value patterns.
    lines = []
    for line in text.splitlines(keepends=True):
        match = re.match(r"^(\s*-?\s*)([^\s:#][^:#]*?)(\s*:\s*)(\S.*?)(\s*)$", line)
        if match and is_secret_key(match.group(2)):
            line = f"{match.group(1)}{match.group(2)}{match.group(3)}{REDACTED}\n"
        lines.append(line)
    return redact_text("".join(lines))
