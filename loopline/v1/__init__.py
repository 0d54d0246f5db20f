"""Loopline public API (``loopline.v1``): generated protobuf and gRPC modules.

Generated from ``protos/loopline/v1/*.proto`` by ``make protos``; do not edit the ``*_pb2*`` files.
"""
