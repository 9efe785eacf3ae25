"""The pytest-xdist scheduler of the clause suite (``--dist loadgroup``): groups of checks
sent whole to one worker, and each worker kept to the labs it has.

A group is a module's checks of one topology, family and firewall (a lab's checks run in
order in one worker, which builds each topology's lab once, at its first check there);
an end-to-end module's tests with their own testbeds are one group; a unit test is its
own. The group is read from the node id here, on the controller: pytest-xdist 3.8's
``xdist_group`` marks work by renaming node ids in the workers, which pytest 9.2 no
longer lets it do (pytest-xdist issue #1386), so that every check went its own way and
each of eight workers built a lab of nearly every topology (26 labs, a few seconds of CPU
each: namespaces, agents, the enforcer). When a worker asks for more, it gets the largest
group left in a topology it has a lab of, else one that needs no lab, else the largest.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import Any

from xdist.scheduler import LoadGroupScheduling

from testbed.topology import FAMILIES, TOPOLOGIES


def group_of(nodeid: str, firewalls: Iterable[str]) -> str:
    """The group of a check: ``lab-TOPOLOGY-FAMILY-FIREWALL-MODULE`` when its parameters
    name a topology (``[routed-ipv4-kernel-enforcer]``), the module of an end-to-end test,
    else the node id."""
    path, _, name = nodeid.partition("::")
    module = PurePosixPath(path)
    params = name[name.find("[") + 1:-1] if name.endswith("]") and "[" in name else ""
    tokens = params.split("-")
    topology = next((t for t in tokens if t in TOPOLOGIES), None)
    if topology is not None:
        family = next((t for t in tokens if t in FAMILIES), "")
        padded = f"-{params}-"
        firewall = max((f for f in firewalls if f"-{f}-" in padded), key=len, default="")
        return f"lab-{topology}-{family}-{firewall}-{module.stem}"
    if "e2e" in module.parts:
        return module.stem
    return nodeid


def worker_count(wanted: int, nodeids: Iterable[str], firewalls: Iterable[str]) -> int:
    """No more workers than there are groups among ``nodeids`` to give them: each worker is
    a process that collects the whole suite and builds labs of its own."""
    names = tuple(firewalls)
    return min(wanted, len({group_of(nodeid, names) for nodeid in nodeids}))


def lab_of(scope: str) -> str | None:
    """The topology of a group's lab, None for a group that needs none."""
    if not scope.startswith("lab-"):
        return None
    return scope.split("-")[1]


def pick(scopes: Iterable[str], labs: set[str]) -> str:
    """The group a worker with labs of ``labs`` takes next from ``scopes`` (the queue, the
    largest groups first): the first in one of its labs, else the first that needs no lab
    (a unit test's), else the first."""
    queue = list(scopes)
    assert queue, "no group is left to give"
    mine = [scope for scope in queue if lab_of(scope) in labs]
    labless = [scope for scope in queue if lab_of(scope) is None]
    return (mine or labless or queue)[0]


class LabAffinityScheduling(LoadGroupScheduling):  # type: ignore[misc]  # (xdist is untyped)
    """``loadgroup`` with the suite's groups, each worker kept to its labs (see the module)."""

    def __init__(self, config: Any, firewalls: Iterable[str], log: Any = None) -> None:
        super().__init__(config, log)
        self.firewalls = tuple(firewalls)
        self.labs: dict[Any, set[str]] = {}

    def _split_scope(self, nodeid: str) -> str:
        return group_of(nodeid, self.firewalls)

    def _assign_work_unit(self, node: Any) -> None:
        labs = self.labs.setdefault(node, set())
        scope = pick(self.workqueue, labs)
        self.workqueue.move_to_end(scope, last=False)  # the one the base class takes
        lab = lab_of(scope)
        if lab is not None:
            labs.add(lab)
        super()._assign_work_unit(node)
