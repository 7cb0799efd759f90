"""Where models train and run: the ``device`` run-config key (and ``--device``) -> a torch device.

Values: ``auto`` (CUDA when ``torch.cuda.is_available()``, else CPU; the default), ``cpu``,
``cuda`` (the current CUDA device) or ``cuda:N``. ``check_device_name`` checks the spelling only,
so a run config naming ``cuda`` can be parsed on a machine without a GPU (a CPU server of GPU
clients); ``resolve_device`` checks that the device exists where it runs. Weights never leave a
process on the GPU: what is sent, saved or compared is moved to the CPU first
(``fedspeech.model.plain_state_dict``, ``fedspeech.modeldir.save_model_dir``).

>>> resolve_device("cpu")
device(type='cpu')
>>> resolve_device("auto").type in ("cpu", "cuda")
True
>>> resolve_device("gpu")
Traceback (most recent call last):
...
fedspeech.devices.DeviceError: device 'gpu' is not one of auto, cpu, cuda, cuda:N (N: a CUDA device index)
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEVICE_NAMES = ("auto", "cpu", "cuda", "cuda:N")
"""The accepted values, as the error messages and the docs list them (N: a CUDA device index)."""

_CUDA_INDEX = re.compile(r"cuda:(\d+)")


class DeviceError(ValueError):
    """A device name that is misspelt, or names a device this machine does not have."""


def check_device_name(name: str, *, key: str = "device") -> str:
    """``name`` if it is one of ``DEVICE_NAMES``' forms, else ``DeviceError`` naming ``key``.

    Only the spelling is checked: whether the device exists is ``resolve_device``'s question.
    """
    if name in ("auto", "cpu", "cuda") or _CUDA_INDEX.fullmatch(name):
        return name
    raise DeviceError(
        f"{key} {name!r} is not one of {', '.join(DEVICE_NAMES)} (N: a CUDA device index)"
    )


def resolve_device(name: str = "auto", *, key: str = "device") -> torch.device:
    """The torch device ``name`` stands for on this machine.

    Args:
        name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        key: how the setting is named in messages (the run-config key, or a CLI flag).

    Raises:
        DeviceError: ``name`` is misspelt, or asks for CUDA where ``torch.cuda.is_available()``
            is False, or for a CUDA index beyond the visible devices.
    """
    import torch  # here: checking a name's spelling (run config, --help) needs no torch

    check_device_name(name, key=key)
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = (
            f"this torch {torch.__version__} is built without CUDA"
            if torch.version.cuda is None
            else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES)"
        )
        raise DeviceError(
            f"{key} {name!r} requested but torch.cuda.is_available() is False ({why}); "
            f'set {key} to "auto" (CUDA when available, else CPU) or "cpu"'
        )
    index = torch.cuda.current_device() if name in ("auto", "cuda") else int(name[5:])
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"{key} {name!r} requested but only {count} CUDA device(s) are visible "
            f"(cuda:0 to cuda:{count - 1})"
        )
    device = torch.device("cuda", index)
    log.debug("%s %r -> %s (%s)", key, name, device, torch.cuda.get_device_name(index))
    return device
