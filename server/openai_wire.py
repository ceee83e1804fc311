"""The OpenAI wire format: a /v1/completions or /v1/chat/completions body to a GenerateRequest,
and a GenerateResponse back to OpenAI's JSON, whole or as server-sent-event chunks.

Pure translation, no I/O. Types are checked here (JSON has no schema); ranges are left to
GenerationService.generate, the check every front door shares, whose InvalidArgument fields
(`sampling.temperature`) `openai_param` renames to OpenAI's parameters (`temperature`).

feedloop's additions, which OpenAI clients keep as extra fields: every choice carries its
`generation_id` (what feedback names), and every reply a `feedloop` object with the request id,
the seed used and why its version served it (`served_as`). The model name `feedloop` means
whatever this server routes to (live, or a canary's share); a loaded version's name pins it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from feedloop.core.tokenizer import split_words
from feedloop.server.errors import InvalidArgument
from feedloop.v1 import feedloop_pb2 as pb

MODEL_ALIAS = "feedloop"
MAX_STOP_SEQUENCES = 4  # as OpenAI
SEED_LIMIT = 1 << 64  # the proto's seed is a uint64

_COMMON = frozenset(
    {"model", "n", "temperature", "top_p", "top_k", "max_tokens", "seed", "stop", "stream"}
    | {"stream_options", "user"}
)
COMPLETION_PARAMS = _COMMON | {"prompt", "logprobs"}
CHAT_PARAMS = _COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}
# OpenAI parameters feedloop does not implement, accepted only at OpenAI's default (some SDKs
# send them always); any other value is refused rather than silently ignored.
_DEFAULTS: dict[str, Any] = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": {},
    "echo": False,
    "best_of": 1,
    "suffix": None,
    "parallel_tool_calls": None,
}

# feedloop's request fields, as the shared validation names them, by OpenAI's parameter names.
_OPENAI_PARAMS = {
    "num_candidates": "n",
    "sampling.temperature": "temperature",
    "sampling.top_k": "top_k",
    "sampling.top_p": "top_p",
    "sampling.max_tokens": "max_tokens",
    "sampling.seed": "seed",
    "model_version": "model",
    "routing_key": "user",
    "end_user": "user",
}


def openai_param(field: str, *, chat: bool) -> str:
    """The OpenAI parameter a feedloop request field came from."""
    if field == "prompt":
        return "messages" if chat else "prompt"
    return _OPENAI_PARAMS.get(field, field)


@dataclass(frozen=True)
class CompletionCall:
    """One parsed /v1/completions or /v1/chat/completions body."""

    chat: bool
    request: pb.GenerateRequest
    model: str  # as the caller named it
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]


def parse_completion(body: Any, *, chat: bool) -> CompletionCall:
    """The call a JSON body asks for; InvalidArgument naming OpenAI's parameter if malformed."""
    if not isinstance(body, dict):
        raise InvalidArgument("body", "must be a JSON object")
    params = {name: value for name, value in body.items() if value is not None}  # null: unset
    known = CHAT_PARAMS if chat else COMPLETION_PARAMS
    for name, value in params.items():
        if name not in known and (name not in _DEFAULTS or value != _DEFAULTS[name]):
            raise InvalidArgument(name, "is not supported by feedloop")
    model = _string(params, "model", required=True)
    request = pb.GenerateRequest(
        prompt=_chat_prompt(params) if chat else _prompt(params),
        model_version="" if model == MODEL_ALIAS else model,
        routing_key=_string(params, "user"),
        end_user=_string(params, "user"),
    )
    if "n" in params:
        request.num_candidates = _integer(params, "n", low=1)
    sampling = request.sampling
    if "temperature" in params:
        sampling.temperature = _number(params, "temperature")
    if "top_p" in params:  # the proto reads 0 as "default": refuse it here instead
        sampling.top_p = _number(params, "top_p", positive=True)
    if "top_k" in params:
        sampling.top_k = _integer(params, "top_k", low=0)
    max_tokens_param = (
        "max_completion_tokens" if "max_completion_tokens" in params else "max_tokens"
    )
    if chat and {"max_tokens", "max_completion_tokens"} <= params.keys():
        raise InvalidArgument("max_tokens", "give max_tokens or max_completion_tokens, not both")
    if max_tokens_param in params:
        sampling.max_tokens = _integer(params, max_tokens_param, low=1)
    if "seed" in params:
        seed = _integer(params, "seed", low=0)
        if seed >= SEED_LIMIT:
            raise InvalidArgument("seed", "must be below 2**64")
        sampling.seed = seed
    request.return_token_logprobs = _logprobs(params, chat=chat)
    stream = _boolean(params, "stream")
    options = params.get("stream_options", {})
    if not isinstance(options, dict) or (options and not stream):
        raise InvalidArgument("stream_options", "an object, and only with stream: true")
    return CompletionCall(
        chat=chat,
        request=request,
        model=model,
        stream=stream,
        include_usage=_boolean(options, "include_usage"),
        stop=_stop(params),
    )


def _string(params: dict[str, Any], name: str, *, required: bool = False) -> str:
    value = params.get(name, "")
    if not isinstance(value, str) or (required and not value):
        raise InvalidArgument(name, "a non-empty string is required" if required else "a string")
    return value


def _integer(params: dict[str, Any], name: str, *, low: int) -> int:
    value = params[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidArgument(name, f"must be an integer >= {low}, got {value!r}")
    return value


def _number(params: dict[str, Any], name: str, *, positive: bool = False) -> float:
    value = params[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or (positive and value <= 0):
        raise InvalidArgument(name, f"must be a number{' > 0' if positive else ''}, got {value!r}")
    return float(value)


def _boolean(params: dict[str, Any], name: str) -> bool:
    value = params.get(name, False)
    if not isinstance(value, bool):
        raise InvalidArgument(name, f"must be true or false, got {value!r}")
    return value


def _prompt(params: dict[str, Any]) -> str:
    prompt = params.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]  # a batch of one
    if not isinstance(prompt, str):
        raise InvalidArgument("prompt", "one prompt, as a string, is required")
    return prompt


def _chat_prompt(params: dict[str, Any]) -> str:
    """The last user message's text: the policy maps a few keywords to a phrase and takes no
    conversation, so earlier messages (and system prompts) do not reach it."""
    messages = params.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgument("messages", "a non-empty list of messages is required")
    for message in reversed(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidArgument("messages", "each message is an object with a role")
        if message["role"] == "user":
            return _message_text(message.get("content"))
    raise InvalidArgument("messages", "no message with role 'user'")


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = [p.get("text") for p in content if isinstance(p, dict)]
        if all(p.get("type") == "text" for p in content) and all(isinstance(t, str) for t in texts):
            return " ".join(texts)  # type: ignore[arg-type]
    raise InvalidArgument("messages", "a user message's content must be text")


def _logprobs(params: dict[str, Any], *, chat: bool) -> bool:
    if chat:
        if "top_logprobs" in params and _integer(params, "top_logprobs", low=0) > 0:
            raise InvalidArgument("top_logprobs", "feedloop returns no alternatives: 0 only")
        return _boolean(params, "logprobs")
    if "logprobs" not in params:
        return False
    _integer(params, "logprobs", low=0)  # how many alternatives: none are returned
    return True


def _stop(params: dict[str, Any]) -> tuple[str, ...]:
    stop = params.get("stop", [])
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP_SEQUENCES
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise InvalidArgument(
            "stop", f"a non-empty string or a list of at most {MAX_STOP_SEQUENCES} of them"
        )
    return tuple(stops)


# -- replies ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """One candidate as OpenAI shows it: cut at a stop sequence, with its finish reason."""

    generation_id: str
    text: str
    finish_reason: str  # "stop" (end of phrase or a stop sequence) or "length" (max_tokens)
    tokens: list[str]
    token_logprobs: list[float]
    text_offsets: list[int]


def choice_of(candidate: pb.Candidate, stop: Sequence[str]) -> Choice:
    """The candidate, cut before its first stop sequence (and its tokens with it).

    The generation log keeps the phrase as sampled: that is what the behaviour policy did.
    """
    text = candidate.text
    offsets = _token_offsets(text, candidate.tokens)
    finish_reason = "stop" if candidate.finished else "length"
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=-1)
    tokens, logprobs = list(candidate.tokens), list(candidate.token_logprobs)
    if cut >= 0:
        text, finish_reason = text[:cut], "stop"
        kept = sum(1 for t, o in zip(tokens, offsets, strict=True) if o + len(t) <= cut)
        tokens, logprobs, offsets = tokens[:kept], logprobs[:kept], offsets[:kept]
    return Choice(candidate.generation_id, text, finish_reason, tokens, logprobs, offsets)


def _token_offsets(text: str, tokens: Sequence[str]) -> list[int]:
    """Where each token starts in the detokenised text (tokens appear in it in order)."""
    offsets, at = [], 0
    for token in tokens:
        found = text.find(token, at)
        at = found if found >= 0 else at
        offsets.append(at)
        at += len(token) if found >= 0 else 0
    return offsets


def _logprobs_json(choice: Choice, *, chat: bool) -> dict[str, Any]:
    if chat:
        return {
            "content": [
                {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                for t, lp in zip(choice.tokens, choice.token_logprobs, strict=True)
            ]
        }
    return {
        "tokens": choice.tokens,
        "token_logprobs": choice.token_logprobs,
        "top_logprobs": None,
        "text_offset": choice.text_offsets,
    }


def usage(prompt: str, response: pb.GenerateResponse) -> dict[str, int]:
    """Token counts: the prompt's word pieces (at least one, as the policy encodes it) and every
    candidate's tokens, end-of-phrase included (the policy generated it)."""
    prompt_tokens = max(1, len(split_words(prompt)))
    completion = sum(len(c.tokens) + int(c.finished) for c in response.candidates)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def _envelope(
    call: CompletionCall, response: pb.GenerateResponse, *, chunk: bool
) -> dict[str, Any]:
    kind = "chat.completion" if call.chat else "text_completion"
    return {
        "id": ("chatcmpl-" if call.chat else "cmpl-") + response.request_id,
        "object": kind + ".chunk" if chunk and call.chat else kind,
        "created": int(time.time()),
        "model": response.model_version,
        "system_fingerprint": None,
        "feedloop": {
            "request_id": response.request_id,
            "seed": response.seed,
            "served_as": response.served_as,
        },
    }


def completion_json(call: CompletionCall, response: pb.GenerateResponse) -> dict[str, Any]:
    """The whole reply, as a non-streaming OpenAI response."""
    choices = []
    for index, candidate in enumerate(response.candidates):
        choice = choice_of(candidate, call.stop)
        logprobs = (
            _logprobs_json(choice, chat=call.chat) if call.request.return_token_logprobs else None
        )
        entry: dict[str, Any] = {"index": index}
        if call.chat:
            entry["message"] = {"role": "assistant", "content": choice.text}
        else:
            entry["text"] = choice.text
        entry |= {
            "logprobs": logprobs,
            "finish_reason": choice.finish_reason,
            "generation_id": choice.generation_id,
        }
        choices.append(entry)
    return _envelope(call, response, chunk=False) | {
        "choices": choices,
        "usage": usage(call.request.prompt, response),
    }


def completion_chunks(
    call: CompletionCall, response: pb.GenerateResponse
) -> Iterator[dict[str, Any]]:
    """The reply as stream chunks: each choice whole (the policy samples a phrase in one batched
    pass, so there is nothing to send before it is done), then its finish reason, then usage if
    asked for. The caller sends each as a server-sent event, then `data: [DONE]`."""
    whole = completion_json(call, response)
    envelope = _envelope(call, response, chunk=True)
    for entry in whole["choices"]:
        extra = {"logprobs": entry["logprobs"], "generation_id": entry["generation_id"]}
        if call.chat:
            content = {"role": "assistant", "content": entry["message"]["content"]}
            first = {"index": entry["index"], "delta": content, "finish_reason": None}
            last = {"index": entry["index"], "delta": {}, "finish_reason": entry["finish_reason"]}
            yield envelope | {"choices": [first | extra]}
            yield envelope | {"choices": [last | {"generation_id": entry["generation_id"]}]}
        else:
            yield envelope | {"choices": [entry]}
    if call.include_usage:
        yield envelope | {"choices": [], "usage": whole["usage"]}
