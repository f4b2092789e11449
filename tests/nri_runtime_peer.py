"""The runtime side of NRI, written independently of the Rust code from the upstream
definitions: containerd/nri pkg/net/multiplex (frames of a big-endian u32 connection
id and u32 length; connection 1 carries the plugin's service, 2 the runtime's) and
containerd/ttrpc PROTOCOL.md (messages of a big-endian u32 length, u32 stream id,
u8 type, u8 flags; odd client stream ids). Messages come from the vendored upstream
api.proto compiled with grpcio-tools at test time.

Usage: nri_runtime_peer.py STUBS_DIR SOCKET. Listens on SOCKET, accepts one plugin,
answers RegisterPlugin, sends Configure, prints one JSON line, then reads commands
from stdin (sync | run | create | stop | remove), relays each to the plugin and prints
one JSON line with the reply and how long it took.
"""

import json
import os
import socket
import struct
import sys
import time

sys.path.insert(0, sys.argv[1])
from google.protobuf import json_format  # noqa: E402
from nri import api_pb2  # noqa: E402
from ttrpc import request_pb2  # noqa: E402

PLUGIN_CONN, RUNTIME_CONN = 1, 2
REQUEST, RESPONSE = 1, 2
PLUGIN = "nri.pkg.api.v1alpha1.Plugin"
RUNTIME = "nri.pkg.api.v1alpha1.Runtime"
TIMEOUT_NS = 2_000_000_000


class Trunk:
    def __init__(self, sock):
        self.sock = sock
        self.streams = {PLUGIN_CONN: b"", RUNTIME_CONN: b""}

    def read_exact(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError("plugin closed the connection")
            data += chunk
        return data

    def send(self, conn, stream_id, kind, data):
        message = struct.pack(">IIBB", len(data), stream_id, kind, 0) + data
        self.sock.sendall(struct.pack(">II", conn, len(message)) + message)

    def next_message(self):
        """The next whole ttrpc message on any connection: (conn, stream, type, data)."""
        while True:
            for conn, buf in self.streams.items():
                if len(buf) >= 10:
                    length, stream_id, kind, _flags = struct.unpack(">IIBB", buf[:10])
                    if len(buf) >= 10 + length:
                        self.streams[conn] = buf[10 + length:]
                        return conn, stream_id, kind, buf[10:10 + length]
            conn, length = struct.unpack(">II", self.read_exact(8))
            payload = self.read_exact(length)
            if conn in self.streams:
                self.streams[conn] += payload


def main():
    path = sys.argv[2]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(10)
    sock, _ = listener.accept()
    sock.settimeout(10)
    trunk = Trunk(sock)

    # The plugin registers first, calling the runtime's service on connection 2.
    conn, stream_id, kind, data = trunk.next_message()
    assert (conn, kind, stream_id % 2) == (RUNTIME_CONN, REQUEST, 1), (conn, kind, stream_id)
    request = request_pb2.Request.FromString(data)
    assert (request.service, request.method) == (RUNTIME, "RegisterPlugin"), request
    registration = api_pb2.RegisterPluginRequest.FromString(request.payload)
    reply = request_pb2.Response(payload=api_pb2.Empty().SerializeToString())
    reply.status.code = 0
    trunk.send(RUNTIME_CONN, stream_id, RESPONSE, reply.SerializeToString())

    next_stream = [1]

    def call(method, message, response_type):
        stream_id = next_stream[0]
        next_stream[0] += 2
        envelope = request_pb2.Request(
            service=PLUGIN, method=method, payload=message.SerializeToString(), timeout_nano=TIMEOUT_NS
        )
        started = time.monotonic()
        trunk.send(PLUGIN_CONN, stream_id, REQUEST, envelope.SerializeToString())
        conn, got_stream, kind, data = trunk.next_message()
        took = time.monotonic() - started
        assert (conn, got_stream, kind) == (PLUGIN_CONN, stream_id, RESPONSE), (conn, got_stream, kind)
        response = request_pb2.Response.FromString(data)
        if response.status.code != 0:
            return {"code": response.status.code, "message": response.status.message, "seconds": took}
        decoded = response_type.FromString(response.payload)
        return {"code": 0, "reply": json_format.MessageToDict(decoded), "seconds": took}

    configured = call(
        "Configure",
        api_pb2.ConfigureRequest(
            runtime_name="python-peer", runtime_version="1", registration_timeout=5000, request_timeout=2000
        ),
        api_pb2.ConfigureResponse,
    )
    print(json.dumps({"name": registration.plugin_name, "index": registration.plugin_idx, **configured}), flush=True)

    pod = api_pb2.PodSandbox(id="sandbox-py", name="py-1", uid="7e57c0de-0000-4000-8000-00000000b0b0", namespace="lang")
    pod.labels["app"] = "py"
    pod.annotations["flower/endpoint"] = "true"
    container = api_pb2.Container(id="ctr-py", pod_sandbox_id="sandbox-py", name="main")
    commands = {
        "sync": lambda: call("Synchronize", api_pb2.SynchronizeRequest(pods=[pod]), api_pb2.SynchronizeResponse),
        "run": lambda: call("RunPodSandbox", api_pb2.RunPodSandboxRequest(pod=pod), api_pb2.RunPodSandboxResponse),
        "create": lambda: call(
            "CreateContainer",
            api_pb2.CreateContainerRequest(pod=pod, container=container),
            api_pb2.CreateContainerResponse,
        ),
        "stop": lambda: call("StopPodSandbox", api_pb2.StopPodSandboxRequest(pod=pod), api_pb2.StopPodSandboxResponse),
        "remove": lambda: call(
            "RemovePodSandbox", api_pb2.RemovePodSandboxRequest(pod=pod), api_pb2.RemovePodSandboxResponse
        ),
    }
    for line in sys.stdin:
        print(json.dumps(commands[line.strip()]()), flush=True)
    sock.close()
    os.unlink(path)


if __name__ == "__main__":
    main()
