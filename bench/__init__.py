"""Benchmarks behind `make bench`: figures printed and written to bench/results/, never asserted.

The load generators and the reference servers (the fake upstream, the echo server) are meant to
run gRPC as its users do, with its defaults, while the services under test set their own
(`services/__init__.py` sets `GRPC_EXPERIMENTS` when a service module is first imported; child
processes inherit it). gRPC reads that variable once, when grpc is imported, so grpc is imported
here, before any benchmark imports a service module, and reference servers are started with the
value the user gave (`USER_GRPC_EXPERIMENTS`, empty for gRPC's defaults).
"""

import os

USER_GRPC_EXPERIMENTS = os.environ.get("GRPC_EXPERIMENTS", "")

import grpc  # noqa: E402, F401  (imported first on purpose, see above)
