"""Progress lines: ours reach the user once from any process, Flower's once beside them."""

from __future__ import annotations

import subprocess
import sys

import pytest

_LOG_OURS = (
    "import logging\n"
    "from fedspeech.logs import show_progress\n"
    "show_progress()\n"
    "for name in ('fedspeech.server', 'fedspeech_client.local_round', 'fedspeech_server.run',"
    " 'fedspeech_features.dataset'):\n"
    "    logging.getLogger(name).info('progress of %s', name)\n"
)


def _stderr(code: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return done.stderr.splitlines()


@pytest.mark.parametrize("own_handlers", [False, True])
def test_every_package_s_progress_is_printed_once(own_handlers: bool) -> None:
    # Prepare: a Flower process (no logging set up) or the fedspeech command (set up)
    setup = "import logging; logging.basicConfig(format='OWN %(name)s: %(message)s')\n"
    # Execute
    lines = _stderr((setup if own_handlers else "") + _LOG_OURS)
    # Assert: each of our packages' INFO lines once, in the process's format where it has one
    for name in ("fedspeech.server", "fedspeech_client.local_round", "fedspeech_server.run",
                 "fedspeech_features.dataset"):  # fmt: skip
        printed = [line for line in lines if line.endswith(f"progress of {name}")]
        assert len(printed) == 1, lines
        assert printed[0].startswith("OWN " if own_handlers else "INFO ")


def test_the_local_engine_prints_flower_s_lines_once_in_the_command_s_format() -> None:
    code = (
        "import logging; logging.basicConfig(format='OWN %(name)s: %(message)s')\n"
        "import flwr.common.logger\n"
        "from fedspeech.app.local_engine import flower_lines_once\n"
        "logging.getLogger('flwr').info('before')\n"
        "with flower_lines_once():\n"
        "    logging.getLogger('flwr').info('within')\n"
        "logging.getLogger('flwr').info('after')\n"
    )
    lines = _stderr(code)
    assert [line for line in lines if "within" in line] == ["OWN flwr: within"]
    assert len([line for line in lines if "before" in line]) == 2  # Flower's own handler too
    assert len([line for line in lines if "after" in line]) == 2  # restored
