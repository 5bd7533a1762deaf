"""Kubernetes: the DRA driver `kubecash.io` (a kubelet plugin beside the broker) and what it
publishes (ResourceSlices, a DeviceClass).

Needs the `kubernetes` extra (grpcio, protobuf, the kubernetes client); the broker itself
never imports this package. Modules: `proto` (gRPC stubs generated from the kubelet's
published .proto files, see `gen`), `quantity` (resource.Quantity), `claims` (a claim's
allocation read as a tenant's table), `records` (prepared claims, kept across restarts),
`driver` (prepare/unprepare against the broker's admin socket), `servers` (the kubelet's
gRPC services on unix sockets), `slices` (ResourceSlice, DeviceClass), `main`
(`kubecash-dra`).
"""

DRIVER = "kubecash.io"
