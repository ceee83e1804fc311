"""feedloop.client: the typed Python client for a feedloop server (grpcio and protobuf only).

    from feedloop.client import FeedloopClient

    with FeedloopClient("127.0.0.1:50051", api_key="...") as client:
        reply = client.generate("ocean sunrise", n=3)
        client.rate(reply.candidates[0].generation_id, 5, scale="stars5")

`AsyncFeedloopClient` offers the same calls for asyncio. Every failure is a FeedloopClientError
carrying the gRPC status code and the server's message.
"""

from feedloop.client.aio import AsyncFeedloopClient
from feedloop.client.client import FeedloopClient
from feedloop.client.errors import FeedloopClientError
from feedloop.client.human_eval import EvaluationTally, HumanEvaluationResult, Verdict
from feedloop.client.online import (
    OnlineEstimate,
    OnlineReportResult,
    ShadowEstimateInfo,
    TrialComparisonInfo,
    VersionOnline,
)
from feedloop.client.options import DEFAULT_TARGET, ClientOptions, RetryPolicy
from feedloop.client.types import (
    Candidate,
    Comparison,
    Correction,
    DecisionInfo,
    FeedbackResult,
    GenerateResult,
    ModelInfo,
    ModelsResult,
    Ranking,
    Rating,
    RegistryStateResult,
    SetLiveResult,
    StatusResult,
    TrialInfo,
)

__all__ = [
    "DEFAULT_TARGET",
    "AsyncFeedloopClient",
    "Candidate",
    "ClientOptions",
    "Comparison",
    "Correction",
    "DecisionInfo",
    "EvaluationTally",
    "FeedbackResult",
    "FeedloopClient",
    "FeedloopClientError",
    "GenerateResult",
    "HumanEvaluationResult",
    "ModelInfo",
    "ModelsResult",
    "OnlineEstimate",
    "OnlineReportResult",
    "Ranking",
    "Rating",
    "RegistryStateResult",
    "RetryPolicy",
    "SetLiveResult",
    "ShadowEstimateInfo",
    "StatusResult",
    "TrialComparisonInfo",
    "TrialInfo",
    "Verdict",
    "VersionOnline",
]
