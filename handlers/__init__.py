"""The ``convstore`` command line and, later, the aiohttp endpoints."""

__all__: list[str] = []
