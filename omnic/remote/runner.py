"""Tuning on a farm: MetaSchedule's RPC runner pointed at the deployment's tracker and key.

MetaSchedule leases servers from the tracker itself; omnic only checks first, with bounded
waits, that the tracker answers and has servers under the key, so a wrong address fails here
and not deep inside a tuning run.
"""
from __future__ import annotations

from typing import Any, Mapping

from tvm.s_tir import meta_schedule as ms

from omnic.core.deployment import Deployment
from omnic.core.errors import DeviceUnreachableError
from omnic.remote.tracker import require_servers


def make_rpc_runner(deployment: Deployment | Mapping[str, Any],
                    evaluator_config: ms.runner.EvaluatorConfig | None = None, *, max_workers: int | None = None,
                    session_timeout_s: float = 120.0, connect_timeout_s: float = 10.0) -> ms.runner.RPCRunner:
    """A MetaSchedule ``RPCRunner`` that times tuning candidates on the deployment's device.

    The tracker is contacted first, so an unreachable one fails here (bounded) rather than
    inside the tuner. MetaSchedule's builder exports ``.tar`` files by default: the device then
    needs a C compiler to link them (for Android, give the builder an ``f_export`` that uses
    ``tvm.support.ndk.create_shared``).

    Args:
        deployment: A remote deployment (``tracker`` set) or the equivalent dict.
        evaluator_config: ``ms.runner.EvaluatorConfig`` (default: 3 runs of at least 50 ms, one
            repeat, no cache flush).
        max_workers: Concurrent leases (default: the number of servers under the key).
        session_timeout_s: The server ends a session running a candidate after this long.
        connect_timeout_s: Bound on reaching the tracker.

    Returns:
        ``tvm.s_tir.meta_schedule.runner.RPCRunner``.

    Raises:
        DeviceUnreachableError: No tracker in the deployment, the tracker is unreachable, or no
            server is registered under the key.
    """
    deployment = Deployment.coerce(deployment)
    if not deployment.is_remote:
        raise DeviceUnreachableError(
            f"make_rpc_runner needs a deployment with a tracker; {deployment.device!r} has none")
    host, port = deployment.tracker_address
    servers = require_servers((host, port), deployment.rpc_key, timeout_s=connect_timeout_s)
    if evaluator_config is None:
        evaluator_config = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50,
                                                     enable_cpu_cache_flush=False)
    rpc_config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=deployment.rpc_key,
                                     session_priority=1, session_timeout_sec=int(session_timeout_s))
    return ms.runner.RPCRunner(rpc_config=rpc_config, evaluator_config=evaluator_config,
                               max_workers=max_workers or len(servers))


__all__ = ["make_rpc_runner"]
