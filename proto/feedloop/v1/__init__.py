"""Generated gRPC/protobuf modules for package feedloop.v1 (see proto/generate.sh)."""
