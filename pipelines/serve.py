"""``loramix serve`` / ``loramix serve-config``: deploy an artifact on Ray Serve.

Settings come from the artifact's ``serve.json`` (the run's `serve` section), then
``key.path=value`` overrides relative to the `serve` section (``experts.num_gpus=1``), then
flags. The key comes from ``--api-key`` or ``LORAMIX_API_KEY``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import yaml

from loramix.config import ConfigError, apply_overrides
from loramix.serve_config import ServeConfig
from serve_app.app import build_app, load_serve_config, serve_config

logger = logging.getLogger(__name__)

APP_NAME = "loramix"


def settings(artifact: str, overrides: list[str] = (), **flags) -> ServeConfig:
    """The artifact's serve settings with ``overrides`` and non-None ``flags`` applied."""
    changes = apply_overrides({}, list(overrides))
    changes.update({k: v for k, v in flags.items() if v is not None})
    return load_serve_config(artifact, changes)


def deploy(artifact: str, cfg: ServeConfig, address: str | None = None) -> str:
    """Start (or update) the application; returns its base URL."""
    from ray import serve

    from pipelines.run import connect

    artifact = str(Path(artifact).resolve())
    connect(address)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app({"artifact": artifact, "serve": cfg.model_dump()}), name=APP_NAME, route_prefix="/")
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}"


def serve_forever(artifact: str, cfg: ServeConfig, address: str | None = None, *, detach: bool = False) -> str:
    """Deploy, print the URL, then block until Ctrl-C (``detach``: return, leaving the app up)."""
    cluster = address or os.environ.get("RAY_ADDRESS")
    if detach and not cluster:
        raise ConfigError(
            "`--detach` leaves the app on a running cluster, but none was given: pass --address or set "
            "RAY_ADDRESS (without one, the local Ray this command starts ends with it)."
        )
    url = deploy(artifact, cfg, address)
    print(f"serving {artifact} ({cfg.topology}) at {url}/v1  (OpenAI-compatible; {url}/healthz)", flush=True)
    if detach:
        return url
    from ray import serve

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        try:
            if cluster:  # a local instance goes away with this process anyway
                serve.delete(APP_NAME)
        except KeyboardInterrupt:
            pass
        print("stopped")
    return url


def write_serve_config(artifact: str, cfg: ServeConfig, output: str | None = None) -> str:
    text = yaml.safe_dump(serve_config(artifact, cfg), sort_keys=False)
    header = (
        "# Ray Serve config for a loramix mixture: `serve deploy THIS.yaml` (cluster) or `serve run THIS.yaml`.\n"
        "# Set LORAMIX_API_KEY in the cluster's environment to require a key.\n"
    )
    if output:
        Path(output).write_text(header + text)
    return header + text


def api_key_flag(value: str | None) -> str | None:
    return value or os.environ.get("LORAMIX_API_KEY") or None
