"""Starting `cotexnet app`: checks the arguments, chooses the token, prints the address, runs the gateway."""

from __future__ import annotations

import ipaddress
import logging
import secrets
from pathlib import Path
from typing import Optional

from .files import DEFAULT_UPLOAD_LIMIT_MB, DataRoot
from .gateway import LOOPBACK_HOSTS, Gateway
from .recent import is_model_folder


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host in LOOPBACK_HOSTS


def serve(*, data_root: str, models: list[str], host: str = "127.0.0.1", port: int = 8080,
          token: Optional[str] = None, device: str = "auto", upload_limit_mb: float = DEFAULT_UPLOAD_LIMIT_MB,
          max_sessions: int = 4, idle_timeout: float = 120.0) -> None:
    """Starts the gateway; prints the address to open. Blocks until interrupted."""
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
    address = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    print(f"CoTexNet app: open {address}", flush=True)
    logging.info(f"data root {Path(data_root).resolve()}; models: {', '.join(models) or 'none given'}")
    gateway.run()
