"""What a local simulation's launcher and its ServerApp share: the launch tag, the "done" marker.

``fedspeech simulate`` (``fedspeech.app.flower_launch``) starts every Flower process with
``FEDSPEECH_LAUNCH_ID=<uuid>`` and ``FLWR_HOME=<run>/.flwr`` in its environment. When the
ServerApp has written everything a run leaves (final model, reports, the closed tracking run),
it touches ``$FLWR_HOME/server-done-<uuid>`` (``mark_server_done``); the launcher then stops the
simulation's processes at once instead of waiting ~5 s for Flower's own teardown (Ray's shutdown,
the run's status travelling back to ``flwr run``). Outside such a launch (a deployed SuperLink)
nothing is written.
"""

from __future__ import annotations

import os
from pathlib import Path

LAUNCH_ID_VAR = "FEDSPEECH_LAUNCH_ID"


def server_done_marker(flwr_home: Path, launch_id: str) -> Path:
    """The file the ServerApp of launch ``launch_id`` touches when it has finished its run."""
    return flwr_home / f"server-done-{launch_id}"


def mark_server_done() -> Path | None:
    """Touch this launch's marker (see the module docstring); None outside a local launch."""
    launch_id, flwr_home = os.environ.get(LAUNCH_ID_VAR), os.environ.get("FLWR_HOME")
    if not launch_id or not flwr_home:
        return None
    marker = server_done_marker(Path(flwr_home), launch_id)
    marker.touch()
    return marker
