"""The ``>>>`` examples in the product's docstrings run, and print what they show.

Every module of the four packages whose source holds ``>>>`` is found on disk and imported under
the name the product uses (``client/secagg.py`` is ``fedspeech_client.secagg``; the checkout's
``fedspeech_*`` symlinks point at the same files), so no module is imported twice under two names,
as ``--doctest-modules`` over the folders would do.
"""

from __future__ import annotations

import doctest
import importlib
import io
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder in the checkout -> the package name it is installed and imported as
PACKAGES = {
    "fedspeech": "fedspeech",
    "client": "fedspeech_client",
    "server": "fedspeech_server",
    "features": "fedspeech_features",
}


def _modules_with_examples() -> list[str]:
    names = []
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if ">>>" in path.read_text(encoding="utf-8"):
                parts = path.relative_to(ROOT / folder).with_suffix("").parts
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                names.append(".".join((package, *parts)))
    return names


MODULES = _modules_with_examples()


def test_the_examples_are_found() -> None:
    # A handful of modules known to have examples (a broken search would collect none)
    assert {"fedspeech.decoding", "fedspeech_client.proximal", "fedspeech_features.mfcc"} <= set(
        MODULES
    )


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: examples that write files do it in a temporary folder (tempfile.mkdtemp, or the
    # working directory): both point into this test's tmp_path
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder().find(module)
    # Execute
    report = io.StringIO()
    runner = doctest.DocTestRunner()
    for test in tests:
        runner.run(test, out=report.write)
    # Assert: the '>>>' in the source are examples doctest sees, and none fails
    assert sum(len(t.examples) for t in tests) > 0, f"{name}: '>>>' outside any docstring"
    assert runner.failures == 0, report.getvalue()
