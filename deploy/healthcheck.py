#!/usr/bin/env python3
"""Container health check: exit 0 when `grpc.health.v1.Health/Check` answers SERVING, else 1.

Why a file and not `grpc_health_probe`: the image already has grpcio and
grpcio-health-checking, so the check needs no extra binary. It is the Dockerfile's
HEALTHCHECK and the exec probe to use in Kubernetes when the server runs with TLS (the
native `grpc:` probe speaks plaintext only). Health stays open without the bearer token,
so no secret is needed here.

    python healthcheck.py                       # 127.0.0.1:50051, overall status ""
    python healthcheck.py --address 127.0.0.1:50051 --service segsearch.v1.SegmentSearch
    python healthcheck.py --tls-ca /certs/ca.pem --authority segsearch.example
"""
from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_ADDRESS = os.environ.get("SEGSEARCH_HEALTH_ADDRESS", "127.0.0.1:50051")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="exit 0 if the segsearch gRPC server reports SERVING")
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="host:port (default: %(default)s)")
    parser.add_argument("--service", default="", help="health service name ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default: %(default)s)")
    parser.add_argument("--tls-ca", default=os.environ.get("SEGSEARCH_HEALTH_TLS_CA"),
                        help="PEM root certificate: connect with TLS")
    parser.add_argument("--authority", help="TLS server name to check, when it differs from --address")
    return parser.parse_args(argv)


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    if not args.tls_ca:
        return grpc.insecure_channel(args.address)
    with open(args.tls_ca, "rb") as pem:
        credentials = grpc.ssl_channel_credentials(pem.read())
    options = [("grpc.ssl_target_name_override", args.authority)] if args.authority else []
    return grpc.secure_channel(args.address, credentials, options=options)


def check(args: argparse.Namespace) -> str:
    """The status name the server reports, or the gRPC error code name when the call fails."""
    channel = open_channel(args)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError as error:
        return error.code().name
    finally:
        channel.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    status = check(args)
    print(f"{args.address} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
