"""feedloop: serve a generative policy over gRPC and improve it online from users' feedback.

The package spans the repository's top-level folders: `feedloop.v1` (generated from `proto/`),
`feedloop.core` (`core/`), `feedloop.server`, `feedloop.trainer`, `feedloop.client` and
`feedloop.demo`.
"""

__version__ = "0.1.0"
