"""Fixtures the enforcer's end-to-end modules share: ``tb``, the routed standard topology
for a module that names its testbed's tag (``TESTBED_TAG``), up for the module's tests;
and ``enforcer``, the enforcer running in it for one test, stopped after unless the test
did. (Modules with a testbed of their own define their own ``tb``.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.build import Testbed
from testbed.lab import EnforcerProcess
from testbed.plugin import require_e2e
from testbed.topology import standard


@pytest.fixture(scope="module")
def tb(request: pytest.FixtureRequest) -> Iterator[Testbed]:
    require_e2e()
    with Testbed.up(standard("routed"), tag=request.module.TESTBED_TAG) as built:
        yield built


@pytest.fixture
def enforcer(tb: Testbed, tmp_path: Path) -> Iterator[EnforcerProcess]:
    proc = EnforcerProcess(tb, tmp_path)
    proc.start()
    yield proc
    if proc.running:
        proc.stop()
