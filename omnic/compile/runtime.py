"""`DeviceModel`: a compiled artifact you can call, time, profile and export; `load` reads it back."""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import tvm
from tvm import relax

from omnic import __version__
from omnic.compile.artifact import ARTIFACT_VERSION, file_checksums, read_verified, write_metadata
from omnic.compile.build import device_source
from omnic.compile.report import CompileReport, plain
from omnic.compile.target import cpu_record, tvm_target
from omnic.core.deployment import Deployment
from omnic.core.errors import ArtifactError, DeviceUnreachableError, InputShapeError, describe
from omnic.core.measure import MeasureConfig, Measurement, time_vm
from omnic.core.quiet import native_stderr_filtered

__all__ = ["ARTIFACT_VERSION", "DeviceModel", "LocalRuntime", "attach_hint", "load", "outputs_to_torch"]


def attach_hint(deployment: Deployment) -> str:
    key = deployment.rpc_key
    return (f"device {deployment.device!r} is not this machine; attach it through a TVM RPC tracker:\n"
            f"  1. on this workstation:   omnic tracker --host 0.0.0.0 --port 9190\n"
            f"  2. on the device:         omnic serve --tracker WORKSTATION:9190 --key {key}\n"
            f"  3. in the deployment:     {{'device': '{deployment.device}', 'tracker': 'WORKSTATION:9190'}}")


class LocalRuntime:
    """Runs an executable on this machine's CPU through the Relax VM."""

    def __init__(self, executable: Any):
        self.dev = tvm.cpu(0)
        self.executable = executable
        self.vm = relax.VirtualMachine(executable, self.dev)
        self._main_fn = None

    def to_device(self, array: np.ndarray):
        return tvm.runtime.tensor(np.ascontiguousarray(array), self.dev)

    def run(self, arrays: Sequence[np.ndarray]) -> Any:
        return self._main(*[self.to_device(a) for a in arrays])

    def run_torch(self, tensors: Sequence[torch.Tensor]) -> Any:
        """Run on CPU torch tensors shared with TVM through DLPack (no copy in or out).

        The outputs come back as torch tensors over the VM's output buffers: the VM allocates
        those afresh on every call, so a later call never overwrites them.
        """
        out = self._main(*[tvm.runtime.from_dlpack(t) for t in tensors])
        return _outputs_from_dlpack(out)

    @property
    def _main(self):
        if self._main_fn is None:
            self._main_fn = self.vm["main"]
        return self._main_fn

    def measure(self, arrays: Sequence[np.ndarray], config: MeasureConfig, device_name: str) -> Measurement:
        return time_vm(self.vm, self.dev, [self.to_device(a) for a in arrays], config, device_name=device_name)

    def close(self) -> None:
        pass


def outputs_to_torch(result: Any) -> Any:
    """Relax VM outputs (a Tensor or nested Array) -> torch tensors (copied out of TVM memory)."""
    if hasattr(result, "numpy"):
        return torch.from_numpy(np.array(result.numpy(), copy=True))
    if isinstance(result, (list, tuple)) or hasattr(result, "__len__"):
        return tuple(outputs_to_torch(r) for r in result)
    raise ArtifactError(f"unexpected output type from the compiled model: {type(result).__name__}")


def _outputs_from_dlpack(result: Any) -> Any:
    if hasattr(result, "__dlpack__"):
        return torch.from_dlpack(result)
    return tuple(_outputs_from_dlpack(r) for r in result)


class DeviceModel:
    """A model compiled for one deployment.

    Call it like the PyTorch model (torch tensors or numpy arrays in, torch tensors out), ask
    for its latency, or export it. ``report`` holds the compile report (device, precision,
    tuning done, kernels, output difference to PyTorch): a :class:`CompileReport` after a
    compile, its ``to_dict()`` form after :func:`load`.
    """

    def __init__(self, *, executable: Any, deployment: Deployment, input_shapes: Sequence[tuple[int, ...]],
                 input_dtypes: Sequence[str], output_is_tuple: bool, structural_hash: str,
                 report: CompileReport | dict[str, Any], module: Any = None, runtime: Any = None):
        self.executable = executable
        self.deployment = deployment
        self.input_shapes = [tuple(int(d) for d in s) for s in input_shapes]
        self.input_dtypes = list(input_dtypes)
        self.output_is_tuple = output_is_tuple
        self.structural_hash = structural_hash
        self.report = report
        self.module = module  # the final Relax IRModule (None after load)
        self._runtime = runtime
        self._latency: Measurement | None = None

    # ------------------------------------------------------------------ running
    @property
    def runtime(self):
        if self._runtime is None:
            if self.deployment.is_remote:
                from omnic.remote.session import RemoteRuntime

                self._runtime = RemoteRuntime(self.executable, self.deployment, module=self.module)
            elif self.deployment.spec.local:
                self._runtime = LocalRuntime(self.executable)
            else:
                raise DeviceUnreachableError(attach_hint(self.deployment))
        return self._runtime

    def _arrays(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        if len(inputs) == 1 and isinstance(inputs[0], (tuple, list)):
            inputs = tuple(inputs[0])
        if len(inputs) != len(self.input_shapes):
            raise InputShapeError(
                f"the compiled model takes {len(self.input_shapes)} input(s) of shape "
                f"{self.input_shapes}, got {len(inputs)}")
        arrays = []
        for i, (x, shape, dtype) in enumerate(zip(inputs, self.input_shapes, self.input_dtypes)):
            arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
            if tuple(arr.shape) != shape:
                raise InputShapeError(
                    f"input {i} has shape {tuple(arr.shape)} but the model was compiled for {shape}; "
                    "compile again with example inputs of the new shape (shapes are static in TVM)")
            if arr.dtype.kind != np.dtype(dtype).kind:
                # int64 pixels into a float32 model are a mistake (or a missing x.float()), not
                # something to cast quietly; float64 -> float32 (numpy's default) still converts
                raise InputShapeError(
                    f"input {i} is {arr.dtype}, the model was compiled for {dtype}: pass x.to(torch.{dtype}) "
                    f"(omnic casts between float widths only)")
            arrays.append(arr.astype(dtype, copy=False))
        return arrays

    def _shared_tensors(self, inputs: Sequence[Any]) -> list[torch.Tensor] | None:
        """The inputs as they are, when TVM can read them in place (CPU torch tensors of the
        compiled shape and dtype, contiguous and 64-byte aligned as TVM requires); else None."""
        if len(inputs) != len(self.input_shapes):
            return None
        out = []
        for x, shape, dtype in zip(inputs, self.input_shapes, self.input_dtypes):
            if not (isinstance(x, torch.Tensor) and x.device.type == "cpu" and tuple(x.shape) == shape
                    and str(x.dtype) == f"torch.{dtype}" and x.is_contiguous() and x.data_ptr() % 64 == 0):
                return None
            out.append(x.detach())
        return out

    def __call__(self, *inputs: Any) -> Any:
        """Run the compiled artifact on the deployment's device."""
        runtime = self.runtime
        shared = self._shared_tensors(inputs) if isinstance(runtime, LocalRuntime) else None
        if shared is not None:  # the fast path: no copies between torch and TVM
            out = runtime.run_torch(shared)
        else:
            out = outputs_to_torch(runtime.run(self._arrays(inputs)))
        if isinstance(out, tuple) and not self.output_is_tuple and len(out) == 1:
            return out[0]
        return out

    def random_inputs(self, seed: int = 0) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [rng.standard_normal(s).astype(d) for s, d in zip(self.input_shapes, self.input_dtypes)]

    def measure(self, config: MeasureConfig | None = None) -> Measurement:
        """Time the artifact on its device (median over repeats after warm-up, with spread)."""
        self._latency = self.runtime.measure(self.random_inputs(), config or MeasureConfig(),
                                             self.deployment.device)
        return self._latency

    def get_latency(self) -> float:
        """Measured latency in milliseconds (median); see :meth:`measure` for the spread."""
        return float((self._latency or self.measure()).median_ms)

    # ------------------------------------------------------------------ export / load
    def export(self, directory: str | os.PathLike) -> Path:
        """Write the deployable library and ``metadata.json`` (plus kernel source for GPUs).

        The metadata records the sha256 and size of every file and the CPU the build needs
        (architecture, ``mcpu``, instruction-set features), which :func:`load` checks before it
        loads anything.

        Returns:
            The directory written.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        spec = self.deployment.spec
        lib_name = f"model.{spec.export_format}"
        with native_stderr_filtered():  # TVM's "Scope Saving" lines, one per memory scope
            self.executable.export_library(str(out / lib_name))
        files = [lib_name]
        source = device_source(self.executable)
        if source is not None:
            kind, text = source
            src_name = "kernels.cu" if kind == "cuda" else "kernels.cl"
            (out / src_name).write_text(text)
            files.append(src_name)
        target = tvm_target(spec, num_threads=self.deployment.threads)
        meta = {
            "artifact_version": ARTIFACT_VERSION,
            "library": lib_name,
            "files": files,
            "checksums": file_checksums(out, files),
            "device": spec.name,
            "target": str(target),
            "cpu": cpu_record(target),
            "deployment": self.deployment.to_dict(),
            "precision": self.deployment.precision,
            "inputs": [{"shape": list(s), "dtype": d} for s, d in zip(self.input_shapes, self.input_dtypes)],
            "output_is_tuple": self.output_is_tuple,
            "structural_hash": self.structural_hash,
            "omnic_version": __version__,
            "tvm_version": tvm.__version__,
            "torch_version": torch.__version__,
            "built_on": platform.platform(),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "report": _jsonable(plain(self.report)),
        }
        write_metadata(out, meta)
        return out


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def load(directory: str | os.PathLike) -> DeviceModel:
    """Load an artifact written by :meth:`DeviceModel.export`, after verifying it.

    Nothing is loaded before the checks pass: the metadata's keys and types, its version, the
    sha256 and size of every file, and, for builds that run here, this CPU's architecture and
    instruction-set features (see :func:`omnic.compile.artifact.read_verified`). Host artifacts
    load and run here; artifacts for other devices load their metadata and run through the
    deployment's tracker (when it is attached).

    Args:
        directory: The folder :meth:`DeviceModel.export` wrote.

    Returns:
        The loaded model; its ``report`` is the compile report's dict form.

    Raises:
        ArtifactError: A missing or damaged file, metadata that is not what export writes, an
            artifact from a newer omnic, a build this CPU cannot run, or a library this machine
            cannot load; the message names the file (and key) and what to do.
    """
    meta, deployment = read_verified(directory)
    lib_path = Path(directory) / meta["library"]
    if deployment.spec.local and not deployment.is_remote:
        try:
            executable = tvm.runtime.load_module(str(lib_path))
        except Exception as exc:  # TVM raises its own error types for a library it cannot load
            raise ArtifactError(f"cannot load {lib_path} on this machine ({describe(exc)}); compile the "
                                "model again here and export it") from exc
    else:
        executable = _FileExecutable(lib_path)
    return DeviceModel(executable=executable, deployment=deployment,
                       input_shapes=[tuple(i["shape"]) for i in meta["inputs"]],
                       input_dtypes=[i["dtype"] for i in meta["inputs"]],
                       output_is_tuple=meta["output_is_tuple"], structural_hash=meta["structural_hash"],
                       report=meta.get("report", {}))


class _FileExecutable:
    """An exported library for another device: it can be re-exported (copied) or uploaded."""

    def __init__(self, path: Path):
        self.path = path
        self.mod = None

    def export_library(self, file_name: str, **_: Any) -> None:
        shutil.copyfile(self.path, file_name)
