"""Configuration of the embedded development stack."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel


class StackConfig(BaseModel):
    host: str = "127.0.0.1"
    kafka_port: int = 19092
    redis_port: int = 6379
    # pid files, logs and the record of what this stack started.
    run_dir: Path = Path(".freshrec/stack")
    # When redis-server is missing and we run as root, install Debian's package with apt-get.
    install_redis: bool = True
