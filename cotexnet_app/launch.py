"""Starting `cotexnet app`: checks the arguments, chooses the token, prints the address, runs the gateway."""

from __future__ import annotations

import ipaddress
import logging
import math
import secrets
from pathlib import Path
from typing import Optional

from cotexnet.errors import ConfigError

from .files import DEFAULT_UPLOAD_LIMIT_MB, DataRoot
from .gateway import LOOPBACK_HOSTS, Gateway
from .recent import is_model_folder


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in LOOPBACK_HOSTS


def check_options(port: int, upload_limit_mb: float, max_sessions: int, idle_timeout: float) -> None:
    """ConfigError (one line, naming the option) for a value the gateway could not run with."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port: expected a port number from 1 to 65535 (or 0 for any free port), got {port}")
    if not (math.isfinite(upload_limit_mb) and upload_limit_mb > 0):
        raise ConfigError(f"--upload-limit-mb: expected a positive number of MiB, got {upload_limit_mb}")
    if max_sessions < 1:
        raise ConfigError(f"--max-sessions: expected at least 1, got {max_sessions}")
    if not (math.isfinite(idle_timeout) and idle_timeout >= 0):
        raise ConfigError(f"--idle-timeout: expected a number of seconds of at least 0, got {idle_timeout}")


def serve(*, data_root: str, models: list[str], host: str = "127.0.0.1", port: int = 8080,
          token: Optional[str] = None, device: str = "auto", upload_limit_mb: float = DEFAULT_UPLOAD_LIMIT_MB,
          max_sessions: int = 4, idle_timeout: float = 120.0) -> None:
    """Starts the gateway; prints the address to open once it listens. Blocks until SIGINT, SIGTERM or SIGHUP."""
    check_options(port, upload_limit_mb, max_sessions, idle_timeout)
    DataRoot(data_root, upload_limit_mb)  # a wrong --data-root fails here, not in the first session
    for model in models:
        if not is_model_folder(model):
            from cotexnet.errors import BundleError

            raise BundleError(f"--model {model}: not a CoTexNet model folder (no config.json) nor a training run "
                              "folder (no best/config.json)")
    if not is_loopback(host) and not token:
        token = secrets.token_urlsafe(24)
    session_args = ["--data-root", str(Path(data_root).resolve()), "--device", device,
                    "--upload-limit-mb", str(upload_limit_mb)]
    for model in models:
        session_args += ["--model", str(Path(model).resolve())]
    gateway = Gateway(session_args, host=host, port=port, token=token, max_sessions=max_sessions,
                      idle_timeout=idle_timeout, max_message_bytes=int(upload_limit_mb * 2**20) + (1 << 20))
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host

    def show_address(bound_port: int) -> None:
        address = f"http://{shown}:{bound_port}/" + (f"?token={token}" if token else "")
        print(f"CoTexNet app: open {address}", flush=True)
        logging.info(f"data root {Path(data_root).resolve()}; models: {', '.join(models) or 'none given'}")

    gateway.run(show_address)
