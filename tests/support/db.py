"""The tests' one way to call a storage function outside a task: in a transaction of its own."""

from storage.database.db import transaction


def in_transaction(url: str, function, *args, **kwargs):
    """`function(conn, *args, **kwargs)` in a transaction on `url`, committed when it returns."""
    with transaction(url) as conn:
        return function(conn, *args, **kwargs)


def migrated(url: str) -> str:
    """`url` as a deployment leaves it (`vtag db upgrade`): tasks check the schema, they never migrate it."""
    from storage.database.db import upgrade

    upgrade(url)
    return url
