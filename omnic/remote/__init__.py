"""Remote devices through TVM's RPC tracker (``tvm.rpc``; nothing here imports the compiler).

One module per concept:

- :mod:`~omnic.remote.tracker`: reach a tracker and lease servers, every wait bounded;
- :mod:`~omnic.remote.session`: upload a compiled model to a leased server, run and time it;
- :mod:`~omnic.remote.runner`: MetaSchedule's RPC runner, for tuning on a farm;
- :mod:`~omnic.remote.batch`: measure a batch of candidates over a farm in parallel;
- :mod:`~omnic.remote.farm`: a real tracker and servers on this machine (tests, benchmarks);
- :mod:`~omnic.remote.serve`: TVM's tracker and server for ``omnic tracker`` / ``omnic serve``,
  which supervises its server so that it registers again after a failed session.
"""
from omnic.core.address import DEFAULT_TRACKER_PORT, parse_address
from omnic.core.errors import LeaseTimeoutError, NoServerError, ServerConnectError
from omnic.remote.batch import BatchConfig
from omnic.remote.farm import LocalFarm, free_port
from omnic.remote.runner import make_rpc_runner
from omnic.remote.session import RemoteRuntime, export_for_upload, load_remote_vm, run_remote_vm
from omnic.remote.tracker import RpcConfig, TrackerClient, connect_tracker, queue_status, require_servers

__all__ = [
    "DEFAULT_TRACKER_PORT", "BatchConfig", "LeaseTimeoutError", "LocalFarm", "NoServerError", "RemoteRuntime",
    "RpcConfig", "ServerConnectError", "TrackerClient", "connect_tracker", "export_for_upload", "free_port",
    "load_remote_vm", "make_rpc_runner", "parse_address", "queue_status", "require_servers", "run_remote_vm",
]
