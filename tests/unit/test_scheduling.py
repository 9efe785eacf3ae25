"""The clause suite's xdist scheduler: a worker takes the largest group of a lab it has,
else a group that needs no lab, else the first (no root needed)."""

from __future__ import annotations

from testbed.scheduling import group_of, lab_of, pick, worker_count

QUEUE = ["lab-nat-ipv4-enforcer-test_afc", "lab-routed-ipv6-enforcer-test_afc", "tests/unit/test_nat.py",
         "lab-routed-ipv4-kernel-helpers-test_app", "test_peers"]


def test_a_group_s_lab_is_its_topology() -> None:
    assert lab_of("lab-split-ipv6-open-router-test_rob_ingress") == "split"
    assert lab_of("tests/unit/test_nat.py") is None and lab_of("test_peers") is None


def test_a_worker_keeps_to_its_labs_then_takes_what_needs_none_then_any() -> None:
    assert pick(QUEUE, {"routed"}) == "lab-routed-ipv6-enforcer-test_afc"
    assert pick(QUEUE[2:], {"routed"}) == "lab-routed-ipv4-kernel-helpers-test_app"
    assert pick(QUEUE, {"split"}) == "tests/unit/test_nat.py"
    assert pick(QUEUE[:2], {"split"}) == QUEUE[0]
    assert pick(QUEUE, set()) == "tests/unit/test_nat.py"


FIREWALLS = ("enforcer", "kernel-helpers", "open-router", "closed-router")


def test_a_check_s_group_is_its_module_topology_family_and_firewall() -> None:
    assert group_of("testbed/clauses/test_afc.py::test_x[routed-ipv4-kernel-enforcer]", FIREWALLS) \
        == "lab-routed-ipv4-enforcer-test_afc"
    assert group_of("test_rab.py::test_y[nat-enforcer-ipv6]", FIREWALLS) == "lab-nat-ipv6-enforcer-test_rab"
    assert group_of("test_app.py::test_z[nat-ipv4-kernel-helpers-ftplib]", FIREWALLS) \
        == "lab-nat-ipv4-kernel-helpers-test_app"
    assert group_of("test_gen.py::test_w[split-ipv6-user-open-router-never started]", FIREWALLS) \
        == "lab-split-ipv6-open-router-test_gen"


def test_an_end_to_end_module_is_one_group_and_a_unit_test_its_own() -> None:
    assert group_of("tests/e2e/test_peers.py::test_a[1]", FIREWALLS) == "test_peers"
    assert group_of("tests/unit/test_nat.py::test_b[4]", FIREWALLS) == "tests/unit/test_nat.py::test_b[4]"


def test_no_more_workers_than_groups() -> None:
    """Four checks in two groups want two workers, however many are allowed; none, none."""
    checks = [f"testbed/clauses/test_gen.py::test_{name}[{topology}-ipv4-enforcer]"
              for name in "ab" for topology in ("nat", "routed")]
    assert worker_count(8, checks, FIREWALLS) == 2
    assert worker_count(1, checks, FIREWALLS) == 1
    assert worker_count(8, [], FIREWALLS) == 0
