"""``fedspeech config show``: the resolved run configuration, each key's value and its source.

The run configuration is one flat table of kebab-case keys (``[tool.flwr.app.config]`` in
``pyproject.toml``), layered defaults <- pyproject <- ``--preset`` <- ``--run-config``
(``fedspeech.config.resolve_run_config_sources``); this command lists every key, which is how the
keys ``--run-config`` accepts are found from the command line.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from fedspeech.app.cli_common import add_format_option, add_run_config_options

_DESCRIPTION = (
    "Print the resolved run configuration: every key the run config accepts (the keys of "
    '--run-config "KEY=VALUE ..." on simulate, train, audit and demo, of presets and of '
    "[tool.flwr.app.config] in pyproject.toml), with its value and its source: default, "
    "pyproject, preset or command line (--run-config). Values are printed as TOML/JSON "
    "literals, ready to paste into --run-config. Exit status 2 for an unknown key or a bad value."
)


def register(sub: Any) -> None:
    """Add the ``config`` command group to the top-level subparsers."""
    config = sub.add_parser(
        "config",
        help="the run configuration: every key, its value and its source",
        description="The run configuration. " + _DESCRIPTION,
    )
    csub = config.add_subparsers(required=True, metavar="ACTION")
    p = csub.add_parser(
        "show",
        help="print every run-config key with its value and source",
        description=_DESCRIPTION,
    )
    add_run_config_options(p, example="num-server-rounds=5 dp=false")
    add_format_option(p)
    p.set_defaults(handler=_show)


def _show(args: argparse.Namespace) -> int:
    from fedspeech.config import project_dir, resolve_run_config_sources

    cfg, sources = resolve_run_config_sources(args.preset, args.run_config, cwd=project_dir())
    flat = cfg.to_flat()
    if args.format == "json":
        table = {key: {"value": value, "source": sources[key]} for key, value in flat.items()}
        print(json.dumps(table, indent=2))
        return 0
    rows = [("KEY", "VALUE", "SOURCE")]
    rows += [(key, json.dumps(value), sources[key]) for key, value in flat.items()]
    key_width = max(len(key) for key, _, _ in rows)
    value_width = max(len(value) for _, value, _ in rows)
    for key, value, source in rows:
        print(f"{key:<{key_width}}  {value:<{value_width}}  {source}")
    return 0
