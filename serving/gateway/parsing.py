"""A request body as the gateway reads it: checked as far as routing needs (the engine validates the
rest), the prompt's text for records, and the key of prefix affinity."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from serving.gateway.errors import bad_request

CHAT = "chat.completions"
COMPLETIONS = "completions"

# Without a session, requests whose prompts open alike go to one replica (vLLM's prefix cache): the key is
# the messages before the last one (a system prompt, a conversation so far), or the opening characters
# of a lone prompt.
PREFIX_CHARS = 256
_PREFIX_MAX_CHARS = 16384

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def body_parse(raw: bytes, endpoint: str) -> dict[str, Any]:
    """The request's JSON, checked as far as routing needs; the engine validates the rest."""
    if not raw:
        raise bad_request("The request body is empty; expected a JSON object.", param=None)
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}.", param=None) from None
    except RecursionError:
        raise bad_request("The request body is nested too deeply.", param=None) from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.", param=None)
    # JSON may escape half of a UTF-16 surrogate pair ("\ud800"): valid JSON, but no text, and the body
    # could not be encoded again for the engine (nor the prompt hashed). Only bodies with such an escape
    # pay for the check; escaped emoji are whole pairs and pass.
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise bad_request(
                "The request body has an unpaired UTF-16 surrogate escape (\\ud800 to \\udfff) in a "
                "string; that is not text.",
                param=None,
            ) from None
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required: the public alias to call, as a string.", param="model")
    if endpoint == CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("'messages' is required: a non-empty list of messages.", param="messages")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise bad_request(
                    f"messages[{index}] must be an object with a 'role'.", param=f"messages[{index}]"
                )
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not prompt):
            raise bad_request("'prompt' is required: a string or a non-empty list.", param="prompt")
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            # Whether it fits the model's context is the engine's to say; a count of tokens is ours.
            raise bad_request(f"'{name}' must be a whole number of tokens, at least 1.", param=name)
    if "stream" in body and not isinstance(body["stream"], bool):
        raise bad_request("'stream' must be true or false.", param="stream")
    if (
        "stream_options" in body
        and body["stream_options"] is not None
        and not isinstance(body["stream_options"], dict)
    ):
        raise bad_request("'stream_options' must be an object.", param="stream_options")
    if "user" in body and body["user"] is not None and not isinstance(body["user"], str):
        raise bad_request("'user' must be a string.", param="user")
    return body


def prompt_text(body: dict[str, Any], endpoint: str) -> str:
    if endpoint == COMPLETIONS:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return prompt
        return "\n".join(p if isinstance(p, str) else json.dumps(p) for p in prompt or ())
    parts = []
    for message in body.get("messages") or ():
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(c.get("text", "") for c in content if isinstance(c, dict))
        parts.append(f"{message.get('role')}: {content if isinstance(content, str) else ''}")
    return "\n".join(parts)


def prefix_key(body: dict[str, Any], endpoint: str) -> str:
    """What requests sharing a prompt prefix have in common, hashed; the affinity key without a session."""
    if endpoint == CHAT:
        messages = body.get("messages") or ()
        if len(messages) > 1:
            lead = json.dumps(messages[:-1], ensure_ascii=False, separators=(",", ":"), default=str)[
                :_PREFIX_MAX_CHARS
            ]
        else:
            content = messages[0].get("content") if messages else ""
            lead = (content if isinstance(content, str) else json.dumps(content, default=str))[:PREFIX_CHARS]
    else:
        prompt = body.get("prompt")
        lead = (prompt if isinstance(prompt, str) else json.dumps(prompt, default=str))[:PREFIX_CHARS]
    return hashlib.blake2b(lead.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
