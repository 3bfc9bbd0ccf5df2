#!/usr/bin/env python3
"""The standard gRPC health and reflection clients (grpcio's, not ours) against a node.

  standard_clients.py check ADDR SERVICE...   one line per service: `SERVICE STATUS`
  standard_clients.py watch ADDR SERVICE      one line per status Watch streams, flushed
  standard_clients.py reflect ADDR v1|v1alpha services, then `method Service.Method` for
                                              every method of every locus.v1 service

Used by tests/standard.rs; needs `pip install grpcio grpcio-health-checking
grpcio-reflection` (.ci/run installs them).
"""
import sys

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(addr, services):
    with grpc.insecure_channel(addr) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for s in services:
            name = "" if s == "-" else s
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
            except grpc.RpcError as e:
                status = "ERROR:" + e.code().name
            print(s, status, flush=True)


def watch(addr, service):
    name = "" if service == "-" else service
    with grpc.insecure_channel(addr) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        try:
            for r in stub.Watch(health_pb2.HealthCheckRequest(service=name), timeout=120):
                print(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status), flush=True)
        except grpc.RpcError as e:
            print("END", e.code().name, flush=True)


def reflect(addr, version):
    # grpcio-reflection ships the v1alpha client; v1's messages are the same on the wire,
    # so v1 is called by its method path with the same message classes.
    from grpc_reflection.v1alpha import reflection_pb2 as pb
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )
    from google.protobuf.descriptor_pool import DescriptorPool

    path = {
        "v1": "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "v1alpha": "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    }[version]
    with grpc.insecure_channel(addr) as ch:
        info = ch.stream_stream(
            path,
            request_serializer=pb.ServerReflectionRequest.SerializeToString,
            response_deserializer=pb.ServerReflectionResponse.FromString,
        )

        def ask(req):
            return next(iter(info(iter([req]), timeout=10)))

        listed = ask(pb.ServerReflectionRequest(list_services="*"))
        if listed.HasField("error_response"):
            sys.exit(f"list_services: {listed.error_response}")
        services = sorted(s.name for s in listed.list_services_response.service)
        for s in services:
            print("service", s, flush=True)
        if version == "v1alpha":
            # `describe` as tools do it: a descriptor pool fed by reflection.
            pool = DescriptorPool(ProtoReflectionDescriptorDatabase(ch))
            for s in services:
                if s.startswith("locus."):
                    for m in pool.FindServiceByName(s).methods:
                        print("method", f"{s}.{m.name}", flush=True)
            return
        for s in services:
            if not s.startswith("locus."):
                continue
            r = ask(pb.ServerReflectionRequest(file_containing_symbol=s))
            for raw in r.file_descriptor_response.file_descriptor_proto:
                fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
                for svc in fd.service:
                    if f"{fd.package}.{svc.name}" == s:
                        for m in svc.method:
                            print("method", f"{s}.{m.name}", flush=True)


def main():
    cmd, addr = sys.argv[1], sys.argv[2]
    if cmd == "check":
        check(addr, sys.argv[3:])
    elif cmd == "watch":
        watch(addr, sys.argv[3])
    elif cmd == "reflect":
        reflect(addr, sys.argv[3])
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
