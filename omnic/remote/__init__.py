"""Remote devices through TVM's RPC tracker: the tracker client, remote sessions, local farms and
batched measurement. ``tvm.rpc`` is imported only here."""
