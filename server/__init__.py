"""feedloop.server: the asyncio gRPC server (`feedloop serve`).

app.py              wiring and lifecycle (start, seed, drain, close)
config.py           ServeConfig: every knob, with its default and why
generation.py       Generation service -> batcher.py (dynamic batching, one dispatcher thread)
model_client.py     the handle on the model process: load, sample, restart after a crash
model_process.py    the model process itself: policies sample here, outside the server's GIL
live_model.py       the live version and its hot swap (load, verify, warm up, swap)
generation_log.py   group-commit writer of served generations
feedback.py         Feedback service (validation) -> feedback_writer.py (group commit)
admin.py            ModelAdmin service
auth.py, ratelimit.py   API keys, roles, per-key token buckets (one interceptor)
rpc.py, errors.py   per-RPC metrics and the one mapping of errors to gRPC status codes
metrics.py          every Prometheus series, one registry per server instance
cli.py              `feedloop serve`
"""
