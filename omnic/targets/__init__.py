"""The device table: every device omnic can compile for, as frozen data.

Per-device behaviour (target, host, precisions, RPC key, fast/slow operators, preferred channel
multiple) lives in fields of :class:`DeviceSpec`, never in ``if device == ...`` chains.
"""
from omnic.targets.devices import DEVICES, DeviceSpec, get_device, host_target_dict, known_devices

__all__ = ["DEVICES", "DeviceSpec", "get_device", "host_target_dict", "known_devices"]
