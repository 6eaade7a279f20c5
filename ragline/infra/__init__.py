"""Plumbing shared by the components: the circuit breaker and the one Redis client factory.

It sits below ``cache``, ``gateway`` and the rest so that every Redis user (L2, the dependency
index, the bus, the gateway's shared limits) builds its client the same way.
"""
