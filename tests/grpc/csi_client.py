"""A CSI client on grpc-core (Python grpcio), driven by tests/grpc_clients.rs.

    python csi_client.py PROTO_DIR SOCKET [AUTHORITY]

Generates the stubs from PROTO_DIR/csi.proto into a temporary directory, connects to
unix:SOCKET with grpcio's default channel options (plus `grpc.default_authority` when
AUTHORITY is given, which is what grpc-java sends: the raw socket path), calls Identity,
Controller and Node RPCs, and prints one JSON object: for each call either its response
(as protobuf JSON) or its status code and details. The Rust test judges the answers; this
script only reports them, and exits non-zero only when it cannot run at all.
"""

import importlib
import json
import sys
import tempfile

import grpc
from google.protobuf import json_format
from grpc_tools import protoc


def stubs(proto_dir, out_dir):
    # `grpc_tools.protoc.main` does not add the well-known types' include path (only
    # `python -m grpc_tools.protoc` does), and csi.proto imports descriptor, wrappers
    # and timestamp.
    import grpc_tools

    well_known = grpc_tools.__path__[0] + "/_proto"
    rc = protoc.main(
        [
            "protoc",
            f"-I{proto_dir}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"{proto_dir}/csi.proto",
        ]
    )
    if rc != 0:
        sys.exit(f"protoc failed with {rc}")
    sys.path.insert(0, out_dir)
    return importlib.import_module("csi_pb2"), importlib.import_module("csi_pb2_grpc")


def main():
    proto_dir, socket = sys.argv[1], sys.argv[2]
    authority = sys.argv[3] if len(sys.argv) > 3 else None
    with tempfile.TemporaryDirectory() as out_dir:
        pb, rpc = stubs(proto_dir, out_dir)
        options = [("grpc.default_authority", authority)] if authority else []
        with grpc.insecure_channel(f"unix:{socket}", options=options) as channel:
            identity = rpc.IdentityStub(channel)
            controller = rpc.ControllerStub(channel)
            node = rpc.NodeStub(channel)
            mount = pb.VolumeCapability(
                mount=pb.VolumeCapability.MountVolume(fs_type="ext4"),
                access_mode=pb.VolumeCapability.AccessMode(
                    mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
                ),
            )
            results = {}

            def call(name, method, request):
                try:
                    reply = method(request, timeout=20)
                    results[name] = {"ok": json_format.MessageToDict(reply)}
                    return reply
                except grpc.RpcError as e:
                    results[name] = {"code": e.code().name, "details": e.details()}
                    return None

            call("GetPluginInfo", identity.GetPluginInfo, pb.GetPluginInfoRequest())
            call("Probe", identity.Probe, pb.ProbeRequest())
            call(
                "ControllerGetCapabilities",
                controller.ControllerGetCapabilities,
                pb.ControllerGetCapabilitiesRequest(),
            )
            created = call(
                "CreateVolume",
                controller.CreateVolume,
                pb.CreateVolumeRequest(
                    name="pvc-grpcio",
                    capacity_range=pb.CapacityRange(required_bytes=1 << 30),
                    volume_capabilities=[mount],
                ),
            )
            if created is not None:
                call(
                    "DeleteVolume",
                    controller.DeleteVolume,
                    pb.DeleteVolumeRequest(volume_id=created.volume.volume_id),
                )
            call("NodeGetInfo", node.NodeGetInfo, pb.NodeGetInfoRequest())
            call(
                "NodeGetCapabilities",
                node.NodeGetCapabilities,
                pb.NodeGetCapabilitiesRequest(),
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
