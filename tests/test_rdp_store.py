"""RDP curves kept on disk: read back bit for bit, shared across processes, damage recomputed."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedspeech import privacy_ledger as pl
from fedspeech.rdp_store import CACHE_ENV, CurveStore, cache_dir

SIGMA, Q = 0.9, 0.2


@pytest.fixture()
def store_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A cache folder of the test's own, with the in-memory curves emptied before and after."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    pl._rdp_curve.cache_clear()
    yield tmp_path / "cache"
    pl._rdp_curve.cache_clear()


def _computed() -> np.ndarray:
    return np.asarray(
        pl.rdp_analysis().compute_rdp(
            q=Q, noise_multiplier=SIGMA, steps=1, orders=list(pl.RDP_ORDERS)
        ),
        dtype=np.float64,
    )


def _no_computing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(**_: object) -> None:
        raise AssertionError("computed although the curve is on disk")

    monkeypatch.setattr(pl.rdp_analysis(), "compute_rdp", refuse)


def test_a_curve_comes_back_from_disk_bit_for_bit(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = pl._rdp_curve(SIGMA, Q).copy()
    assert first.tobytes() == _computed().tobytes()
    store = pl.curve_store()
    assert store is not None and store.path(SIGMA, Q).is_file()
    assert store.path(SIGMA, Q).is_relative_to(store_dir)
    # A process that has not computed it (the memory emptied) reads it and computes nothing.
    pl._rdp_curve.cache_clear()
    _no_computing(monkeypatch)
    assert pl._rdp_curve(SIGMA, Q).tobytes() == first.tobytes()
    assert store.hits == 1


def test_another_process_calibrates_from_the_curves_this_one_kept(store_dir: Path) -> None:
    # Prepare: calibrate here, keeping the 14-15 curves of the bisection.
    sigma = pl.calibrate_noise_multiplier(
        target_epsilon=8.0, sample_rate=Q, steps=15, prior=pl.PrivacyLedger(1e-5)
    )
    # Execute: the same calibration in a fresh interpreter on the same folder.
    code = (
        "from fedspeech import privacy_ledger as pl\n"
        "s = pl.calibrate_noise_multiplier(target_epsilon=8.0, sample_rate=0.2, steps=15,"
        " prior=pl.PrivacyLedger(1e-5))\n"
        "st = pl.curve_store()\n"
        "print(repr(s), st.hits, st.misses)\n"
    )
    env = {**os.environ, CACHE_ENV: str(store_dir)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    # Assert: the same noise multiplier, every curve read, none computed.
    assert float(out[0]) == sigma
    assert int(out[1]) >= 14 and int(out[2]) == 0


@pytest.mark.parametrize("damage", ["payload", "header", "truncated", "other-request"])
def test_a_damaged_or_foreign_entry_is_computed_again_and_replaced(
    store_dir: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    expected = pl._rdp_curve(SIGMA, Q).copy()
    store = pl.curve_store()
    assert store is not None
    path = store.path(SIGMA, Q)
    data = path.read_bytes()
    head, _, payload = data.partition(b"\n")
    if damage == "payload":  # one byte of one value
        data = head + b"\n" + payload[:9] + bytes([payload[9] ^ 1]) + payload[10:]
    elif damage == "header":
        fields = json.loads(head)
        fields["code"] = "0" * 64
        data = json.dumps(fields, sort_keys=True).encode() + b"\n" + payload
    elif damage == "truncated":
        data = data[:-8]
    else:  # another (sigma, q)'s valid entry in this one's place
        store.put(SIGMA, 0.3, _computed())
        data = store.path(SIGMA, 0.3).read_bytes()
    path.write_bytes(data)
    pl._rdp_curve.cache_clear()
    with caplog.at_level(logging.WARNING, logger="fedspeech.rdp_store"):
        again = pl._rdp_curve(SIGMA, Q)
    assert again.tobytes() == expected.tobytes()
    assert store.damaged == 1
    assert str(path) in caplog.text
    assert store.get(SIGMA, Q) is not None  # replaced by the recomputed curve


def test_an_unwritable_folder_keeps_curves_in_memory_and_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    store = CurveStore(blocker, pl.RDP_ORDERS, "code")
    with caplog.at_level(logging.INFO, logger="fedspeech.rdp_store"):
        store.put(SIGMA, Q, _computed())
        store.put(SIGMA, 0.3, _computed())
    assert caplog.text.count("not kept on disk") == 1
    assert store.get(SIGMA, Q) is None


def test_an_empty_setting_turns_the_store_off_and_other_code_has_its_own_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, "")
    assert cache_dir() is None and pl.curve_store() is None
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "fedspeech"
    # Curves of another Opacus rdp.py (or other orders) never meet these.
    one = CurveStore(tmp_path, pl.RDP_ORDERS, "a" * 64)
    other = CurveStore(tmp_path, pl.RDP_ORDERS, "b" * 64)
    one.put(SIGMA, Q, _computed())
    assert one.get(SIGMA, Q) is not None and other.get(SIGMA, Q) is None
