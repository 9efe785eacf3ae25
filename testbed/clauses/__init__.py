"""The conformance clause suite: one module per clause group of SPEC.md's catalog.

Every test carries ``@pytest.mark.clause(ID)`` and runs per topology variant and
address family through the ``net`` fixture of ``testbed.plugin``.
"""
