"""Fuzzing: the saved crash regressions, and a short deterministic run (``make fuzz`` runs 100k).

Every input in tests/fuzz/regressions/ goes through the same judge as the fuzzer
(tests/fuzz/harness.py): only ramfs errors with a message, no step over 1 s, no allocation
over 64 MiB, no disagreement between ways of reading, no file descriptor left open.
A regression whose ``.json`` says ``"status": "open"`` is a known, unfixed bug: its test is
an expected failure (strict, so the fix shows up as XPASS: then set ``"status": "fixed"``).
A ``"expect": "opens"`` regression is a valid image that ramfs wrongly rejects.
"""

from __future__ import annotations

import os

import pytest

from fuzz import harness
from fuzz.seeds import build_seeds

REGRESSIONS = harness.load_regressions()
SHORT_CASES = int(os.environ.get("RAMFS_FUZZ_SHORT_CASES", "2000"))
SHORT_SEED = 20251127


@pytest.fixture(scope="module")
def runner():
    with harness.Runner() as r:
        yield r


def _params():
    out = []
    for name, img, meta in REGRESSIONS:
        marks = []
        if meta.get("status") == "open":
            what = "; ".join(f"{f['kind']} in {f['step']}: {f['error']}" for f in meta.get("failures", []))
            # Strict, so a fix shows up (XPASS) - unless the bug only shows some of the time.
            marks.append(pytest.mark.xfail(strict=not meta.get("flaky", False),
                                           reason=f"open bug: {what or meta.get('bug')}"[:300]))
        out.append(pytest.param(img, meta, id=name, marks=marks))
    return out


@pytest.mark.parametrize("img,meta", _params())
def test_regression(runner, img, meta):
    # An open bug only has to show (quick); a fixed one is judged in full, re-runs included.
    res = harness.replay(runner, img, meta, quick=meta.get("status") == "open")
    assert not res.failures, "\n".join(f"{f.kind} in {f.step}: {f.message}\n{f.detail}" for f in res.failures)


def test_seeds_open_cleanly(runner):
    """Every seed is a valid image (or a known bug, checked still to be one)."""
    seeds = build_seeds()
    assert len(seeds) >= 15
    harness.verify_seeds(seeds, runner)


def test_short_fuzz_run(tmp_path):
    """A bounded deterministic run: no failure other than the open bugs saved in regressions/."""
    st = harness.fuzz(SHORT_CASES, SHORT_SEED, out_dir=tmp_path, minimize_failures=False,
                      max_seconds=240, known=harness.known_signatures(), heavy=False)
    assert st.cases >= min(SHORT_CASES, 500)
    assert not st.by_signature, (
        f"{st.failures} new fuzzing failures; inputs saved in {tmp_path} (copy them to "
        f"tests/fuzz/regressions/):\n" + "\n".join(f"{n}x {s}" for s, n in st.by_signature.items()))
