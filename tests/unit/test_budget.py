"""ByteBudget: caps on bytes held, a flow's inside its client's inside the total (pure)."""

from __future__ import annotations

import pytest

from enforcer.core.budget import ByteBudget, ClientBudgets


def test_a_byte_budget_counts_at_every_level() -> None:
    total = ByteBudget(100)
    client = ByteBudget(60, parent=total)
    flow_a, flow_b = ByteBudget(50, parent=client), ByteBudget(50, parent=client)
    other = ByteBudget(100, parent=total)
    assert flow_a.take(50) and not flow_a.take(1)     # the flow's own cap
    assert flow_b.room == 10 and not flow_b.take(11)  # the client's
    assert other.take(40) and other.room == 10        # the total's
    assert (client.used, total.used) == (50, 90)
    flow_a.give(30)
    assert flow_b.take(11) and (client.used, total.used) == (31, 71)
    flow_b.charge(40)  # past the client's cap: takes fail until enough is given back
    assert (client.used, flow_b.room) == (71, -11) and not flow_b.take(0)


@pytest.mark.parametrize("misuse", ["take -1", "charge -1", "give more than held", "limit -1"])
def test_negative_amounts_and_giving_back_too_much_are_refused(misuse: str) -> None:
    budget = ByteBudget(10, parent=ByteBudget(100))
    budget.take(5)
    with pytest.raises(ValueError):
        {"take -1": lambda: budget.take(-1), "charge -1": lambda: budget.charge(-1),
         "give more than held": lambda: budget.give(6),
         "limit -1": lambda: ByteBudget(-1)}[misuse]()
    assert (budget.used, budget.parent.used if budget.parent else None) == (5, 5)


def test_client_budgets_sit_inside_the_total_and_go_when_empty() -> None:
    budgets = ClientBudgets(per_client=100, total=150)
    a, b = budgets.of("192.0.2.11"), budgets.of("192.0.2.12")
    assert budgets.of("192.0.2.11") is a
    assert a.take(100) and not a.take(1)  # the client's cap
    assert not b.take(60) and b.take(50)  # the total's
    status = budgets.status()
    assert status["buffered_bytes_total"] == {"cap": 150, "used": 150}
    assert status["buffered_bytes_per_client"]["highest"] == 100
    assert status["buffered_bytes_per_client"]["top"] == [["192.0.2.11", 100], ["192.0.2.12", 50]]
    b.give(50)
    budgets.prune()
    assert set(budgets.clients) == {"192.0.2.11"} and budgets.total.used == 100
