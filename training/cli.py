"""Commands contributed to the `kvcat` CLI (filled in by this package's issue)."""


def register(app, bench) -> None:
    pass
