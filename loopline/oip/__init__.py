"""Open Inference Protocol (KServe V2) gRPC modules for the router <-> worker contract.

Generated from ``protos/loopline/oip/grpc_service.proto`` by ``make protos``; do not edit the
``*_pb2*`` files. The proto package is ``inference``, as the protocol requires.
"""
