"""The tests, by tier: unit, contract, kvm, system (see conftest.py)."""
