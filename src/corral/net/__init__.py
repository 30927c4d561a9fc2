"""The sandbox network: the address plan and rulesets as data (plan.py) and the gateway that applies them
(gateway.py)."""
