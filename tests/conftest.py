"""Shared pytest configuration; service fixtures live in tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.redis_server",
    "tests.fixtures.upstream",
    "tests.fixtures.rag",
    "tests.fixtures.postgres",
]
