"""The Generation service: validate, resolve defaults and the seed, hand over to the batcher.

Everything here is cheap and runs on the loop; the model runs in the model process (batcher.py).
"""

from __future__ import annotations

import logging
import random
import secrets
import time

import grpc

from feedloop.core.sampling import InvalidSamplingParams, SamplingParams
from feedloop.core.tokenizer import split_words
from feedloop.server.auth import Authenticator, rate_limited
from feedloop.server.batcher import Batcher, GenerateJob
from feedloop.server.config import ServeConfig
from feedloop.server.errors import InvalidArgument, require_text
from feedloop.server.generation_log import GenerationLog
from feedloop.server.limits import require_version
from feedloop.server.live_model import LiveModel
from feedloop.server.metrics import ServerMetrics
from feedloop.server.ratelimit import RateLimiter
from feedloop.server.rpc import unary
from feedloop.v1 import feedloop_pb2 as pb
from feedloop.v1 import feedloop_pb2_grpc as pb_grpc

MAX_REQUEST_ID_CHARS = 128
MAX_ROUTING_KEY_CHARS = 128
SEED_BITS = 63  # fits a signed 64-bit column in every store


def resolve_params(request: pb.GenerateRequest, config: ServeConfig) -> SamplingParams:
    """The request's sampling parameters, defaults filled in; InvalidArgument if out of range."""
    s = request.sampling
    # Proto3 reads an unset number as 0: a 0 here asks for the default. Temperature tracks
    # presence instead, because a set 0 asks for greedy decoding.
    given = {name: value for name in ("top_k", "top_p") if (value := getattr(s, name))}
    if s.HasField("temperature"):
        given["temperature"] = s.temperature
    try:
        params = SamplingParams(
            **given,
            max_tokens=s.max_tokens or config.default_max_tokens,
            seed=s.seed or (random.getrandbits(SEED_BITS) or 1),
        )
    except InvalidSamplingParams as exc:
        raise InvalidArgument(f"sampling.{exc.field}", exc.problem) from None
    if params.max_tokens > config.max_tokens_cap:
        raise InvalidArgument(
            "sampling.max_tokens", f"must be 1 to {config.max_tokens_cap}, got {s.max_tokens}"
        )
    return params


log = logging.getLogger("feedloop.server")


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(
        self,
        config: ServeConfig,
        batcher: Batcher,
        live_model: LiveModel,
        generation_log: GenerationLog,
        auth: Authenticator,
        metrics: ServerMetrics,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.config = config
        self.limiter = limiter
        self.batcher = batcher
        self.live_model = live_model
        self.generation_log = generation_log
        self.auth = auth
        self.metrics = metrics
        self.exploration = config.exploration
        metrics.explore_share.set(self.exploration.share)

    @unary("Generate")
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        remaining_s = context.time_remaining()
        caller = self.auth.caller_of(context)
        return await self.generate(
            request,
            client_id=caller.client_id,
            deadline=None if remaining_s is None else time.monotonic() + remaining_s,
            key_name=caller.key_name,
        )

    async def generate(
        self,
        request: pb.GenerateRequest,
        *,
        client_id: str,
        deadline: float | None,
        key_name: str | None = None,
    ) -> pb.GenerateResponse:
        """Validate a request and have the batcher serve it: every front door (gRPC, HTTP) comes
        here, so each one is checked, batched and logged alike. deadline: time.monotonic()
        after which the caller has given up (None: never). key_name: the API key whose rate
        pays for the candidates past the first (the call's own token is taken at the door);
        None: the door charged everything."""
        config = self.config
        if not request.prompt.strip():
            raise InvalidArgument("prompt", "must not be empty")
        if len(request.prompt) > config.max_prompt_chars:
            raise InvalidArgument("prompt", f"at most {config.max_prompt_chars} characters")
        if len(split_words(request.prompt)) > config.max_prompt_tokens:
            raise InvalidArgument(
                "prompt", f"at most {config.max_prompt_tokens} words and punctuation marks"
            )
        num_candidates = request.num_candidates or 1
        if not 1 <= num_candidates <= config.max_candidates:
            raise InvalidArgument(
                "num_candidates", f"must be 1 to {config.max_candidates}, got {num_candidates}"
            )
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidArgument("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters")
        if len(request.routing_key) > MAX_ROUTING_KEY_CHARS:
            raise InvalidArgument("routing_key", f"at most {MAX_ROUTING_KEY_CHARS} characters")
        if len(request.end_user) > MAX_ROUTING_KEY_CHARS:
            raise InvalidArgument("end_user", f"at most {MAX_ROUTING_KEY_CHARS} characters")
        require_text(request.end_user, "end_user")
        require_version(request.model_version, "model_version")
        require_text(request.prompt, "prompt")
        require_text(request.request_id, "request_id")
        params = resolve_params(request, config)
        self._charge_candidates(key_name, num_candidates)
        pinned = request.model_version or None
        if pinned is not None:
            self.live_model.get(pinned)  # NotFound now rather than after queueing
        params, explore, explore_version = self.exploration_arm(request, params)
        self.generation_log.check_room()
        job = GenerateJob(
            prompt=request.prompt,
            params=params,
            num_candidates=num_candidates,
            request_id=request.request_id or secrets.token_hex(16),
            client_id=client_id,
            pinned_version=pinned,
            routing_key=request.routing_key,
            end_user=request.end_user,
            deadline=deadline,
            return_token_logprobs=request.return_token_logprobs,
            explore=explore,
            explore_version=explore_version,
        )
        reply: pb.GenerateResponse = await self.batcher.generate(job)
        if log.isEnabledFor(logging.DEBUG):  # one line a request: built only when wanted
            log.debug(
                "generated %d candidates for %s",
                len(reply.candidates),
                client_id,
                extra={
                    "request_id": reply.request_id,
                    "generation_ids": [c.generation_id for c in reply.candidates],
                    "version": reply.model_version,
                },
            )
        return reply

    def _charge_candidates(self, key_name: str | None, num_candidates: int) -> None:
        """Take a token for each candidate past the first (RESOURCE_EXHAUSTED, taking none,
        when the key's bucket holds too few): n candidates cost n rows of compute."""
        limiter = self.limiter
        if (
            key_name is None
            or limiter is None
            or not limiter.enabled
            or not self.config.rate_limit_per_candidate
            or num_candidates <= 1
        ):
            return
        if not limiter.allow(key_name, cost=num_candidates - 1):
            self.metrics.rate_limited.labels("Generate").inc()
            raise rate_limited(limiter, key_name, f"one token per candidate, {num_candidates}")

    def exploration_arm(
        self, request: pb.GenerateRequest, params: SamplingParams
    ) -> tuple[SamplingParams, bool, str | None]:
        """The parameters to serve `request` with, whether it is explored, and the older version
        that explores it (None: the live version, at the exploration parameters).

        Only a request that leaves sampling to the server (no temperature, top-k, top-p or
        seed; max_tokens may be set) and pins no version is eligible: a caller who chose a
        distribution, a seed to reproduce, or a version gets exactly that. Of the explored
        requests, exploration.version_share go to the older versions held beside live, in turn,
        sampled with the request's own parameters (core/exploration.py).
        """
        if not exploration_eligible(request):
            self.metrics.explore_requests.labels("ineligible").inc()
            return params, False, None
        exploration = self.exploration
        if exploration.explores(random.random()):
            if exploration.by_version(random.random()):
                older = self.live_model.next_explorer()
                if older is not None:
                    self.metrics.explore_requests.labels("older_version").inc()
                    return params, True, older.version
            self.metrics.explore_requests.labels("exploration").inc()
            return exploration.params(params), True, None
        self.metrics.explore_requests.labels("policy").inc()
        return params, False, None


def exploration_eligible(request: pb.GenerateRequest) -> bool:
    """Whether the request left every sampling choice but max_tokens to the server."""
    s = request.sampling
    return not (s.HasField("temperature") or s.top_k or s.top_p or s.seed or request.model_version)
