"""Drives the Flower pod API from Python, as a runtime in another language would.

Usage: pod_api_client.py STUBS_DIR PODS_SOCKET
STUBS_DIR holds stubs generated from the repository's pods.proto with
grpc_tools.protoc. Prints the registered pod's endpoint on the last line.
"""

import sys

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402

from flower.protocol import pods_pb2, pods_pb2_grpc, switchboard_pb2  # noqa: E402

# The HTTP/2 server refuses a socket path as :authority; say "localhost", as
# Kubernetes and grpc-go do for Unix sockets.
channel = grpc.insecure_channel(
    "unix:" + sys.argv[2], options=[("grpc.default_authority", "localhost")]
)
grpc.channel_ready_future(channel).result(timeout=10)
pods = pods_pb2_grpc.PodsStub(channel)


def fails(code, call, field=None):
    try:
        call()
    except grpc.RpcError as e:
        assert e.code() == code, (e.code(), e.details())
        if field is not None:
            assert e.details().startswith(field), e.details()
        return
    raise AssertionError("the call should have failed with %s" % code)


request = pods_pb2.RegisterPodRequest(
    uid="py-pod", namespace="py", name="worker", attempt=3, labels={"app": "py"}
)
pod = pods.RegisterPod(request, timeout=10)
assert pod.uid == "py-pod", pod
assert pod.endpoint.endswith("/py-pod/switchboard"), pod.endpoint
assert dict(pod.in_labels) == {
    "app": "py",
    "server_kubernetes_namespace": "py",
    "server_kubernetes_pod_name": "worker",
    "server_kubernetes_pod_uid": "py-pod",
    "server_kubernetes_pod_attempt": "3",
}, pod.in_labels
assert dict(pod.out_labels)["client_kubernetes_pod_attempt"] == "3"
assert list(pod.rights) == [
    switchboard_pb2.CLIENT_CONNECT,
    switchboard_pb2.SERVER_START,
    switchboard_pb2.LIST,
], pod.rights

# A resync is idempotent; another identity under the same uid is refused.
assert pods.RegisterPod(request, timeout=10).endpoint == pod.endpoint
other = pods_pb2.RegisterPodRequest(uid="py-pod", namespace="py", name="impostor")
fails(grpc.StatusCode.ALREADY_EXISTS, lambda: pods.RegisterPod(other, timeout=10))
bad = pods_pb2.RegisterPodRequest(uid="no spaces", namespace="py", name="x")
fails(grpc.StatusCode.INVALID_ARGUMENT, lambda: pods.RegisterPod(bad, timeout=10), "uid")
bad = pods_pb2.RegisterPodRequest(uid="ok", name="x")
fails(grpc.StatusCode.INVALID_ARGUMENT, lambda: pods.RegisterPod(bad, timeout=10), "namespace")
fails(
    grpc.StatusCode.NOT_FOUND,
    lambda: pods.UnregisterPod(pods_pb2.UnregisterPodRequest(uid="nobody"), timeout=10),
)

container = pods.RegisterContainer(
    pods_pb2.RegisterContainerRequest(pod_uid="py-pod", name="main", attempt=1), timeout=10
)
assert container.in_labels["server_kubernetes_container_name"] == "main"

listed = pods.ListPods(pods_pb2.ListPodsRequest(), timeout=10).pods
assert [p.uid for p in listed] == ["py-pod"], listed
assert [c.name for c in listed[0].containers] == ["main"]

# grpc.health.v1.Health/Check with an empty request: status SERVING (1) is b"\x08\x01".
check = channel.unary_unary(
    "/grpc.health.v1.Health/Check",
    request_serializer=lambda _: b"",
    response_deserializer=lambda b: b,
)
assert check(None, timeout=10) == b"\x08\x01"

print(pod.endpoint)
