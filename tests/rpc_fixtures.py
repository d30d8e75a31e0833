"""A real TVM RPC farm for tests: one tracker and two servers on 127.0.0.1, free ports.

The farm is shared by a module (starting the processes costs seconds); ``rpc_farm`` hands each
test a farm with two live servers again (a test may kill one) and the processes are killed at
the end of the module even when a test failed.
"""
from __future__ import annotations

import pytest

from omnic.remote.farm import LocalFarm

FARM_KEY = "host"


def running_farm(*, key: str = FARM_KEY, omnic_servers: int = 1):
    """A started two-server farm, stopped when the generator closes (for module fixtures).

    TVM_NUM_THREADS=1 per server: two servers share this machine's cores with everything else.
    """
    farm = LocalFarm(servers=2, key=key, threads=1, omnic_servers=omnic_servers)
    try:
        farm.start(timeout_s=120)
        yield farm
    finally:
        farm.stop()


@pytest.fixture(scope="module")
def rpc_farm_module():
    # One server is started with `omnic serve`, so the CLI's registration path is exercised too.
    yield from running_farm()


@pytest.fixture
def rpc_farm(rpc_farm_module):
    farm = rpc_farm_module
    while len(farm.alive_servers()) < 2:
        farm.add_server(wait=False)
    farm.wait_servers(2, timeout_s=120)
    return farm
