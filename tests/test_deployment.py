import pytest

import omnic
from omnic import Deployment


def test_seed_style_dict_is_accepted_and_frozen():
    d = Deployment.coerce({"device": "S888", "precision": "int8"})
    assert d.device == "S888" and d.precision == "int8"
    assert d.rpc_key == "S888"
    with pytest.raises(AttributeError):
        d.device = "host"  # frozen


def test_unknown_device_lists_known_ones():
    with pytest.raises(omnic.UnknownDeviceError) as info:
        Deployment(device="pixel9000")
    msg = str(info.value)
    for name in omnic.known_devices():
        assert name in msg
    assert isinstance(info.value, omnic.OmnicError)


def test_unsupported_precision_lists_supported():
    with pytest.raises(omnic.UnsupportedPrecisionError) as info:
        Deployment(device="S888-gpu", precision="int8")
    assert "fp32" in str(info.value) and "fp16" in str(info.value)


@pytest.mark.parametrize("fields", [
    {"device": "host", "threads": 0},
    {"device": "host", "batch": -1},
    {"device": "host", "tuning_trials": -5},
    {"device": "host", "tracker": "no-port"},
    {"device": "host", "input_shape": (1, 0, 3)},
    {"device": "host", "colour": "blue"},
])
def test_bad_fields_are_typed_errors(fields):
    with pytest.raises(omnic.DeploymentError):
        Deployment.coerce(fields)


def test_tracker_and_key():
    d = Deployment.coerce({"device": "rasp4b", "tracker": "127.0.0.1:9190"})
    assert d.tracker_address == ("127.0.0.1", 9190)
    assert d.is_remote and d.rpc_key == "rasp4b"
    assert d.replace(key="pi-lab").rpc_key == "pi-lab"


def test_round_trip_through_dict():
    d = Deployment(device="host", input_shape=(1, 3, 8, 8), threads=2, tuning_trials=16)
    assert Deployment.coerce(d.to_dict()) == d
