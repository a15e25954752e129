"""Build the Serve application from an artifact, and the Serve config YAML that deploys it.

    serve run serve_app.app:build_app artifact=out/quickstart/artifact
    loramix serve-config out/quickstart/artifact > serve.yaml && serve deploy serve.yaml

``build_app`` is a Serve application builder: ``args`` are ``artifact`` (required), ``version``
and ``serve`` (a ``ServeConfig`` dict; default: the artifact's ``serve.json`` written by
``loramix run``, else the defaults).
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from loramix.artifact import read_json
from loramix.checkpoint import read_manifest
from loramix.config import ConfigError, format_errors
from loramix.names import safe_key
from loramix.serve_config import SERVE_JSON, DeploymentConfig, ServeConfig
from loramix.versions import resolve


def load_serve_config(artifact: str | Path, overrides: dict | None = None) -> ServeConfig:
    """The artifact's saved serve settings (or defaults) updated with ``overrides`` (nested dict)."""
    saved = Path(artifact) / SERVE_JSON
    data = read_json(saved) if saved.is_file() else {}
    merged = _deep_update(data, overrides or {})
    try:
        return ServeConfig(**merged)
    except ValidationError as err:
        raise ConfigError(format_errors(err, f"serve settings of {str(artifact)!r}")) from None


def _deep_update(base: dict, new: dict) -> dict:
    out = dict(base)
    for key, value in new.items():
        out[key] = _deep_update(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def deployment_options(d: DeploymentConfig, graceful_shutdown_s: float = 20.0) -> dict:
    """One ``DeploymentConfig`` as Serve ``.options(...)``: what the autoscaler sees."""
    opts = {
        "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
        "max_ongoing_requests": d.max_ongoing_requests,
        "max_queued_requests": d.max_queued_requests,
        "graceful_shutdown_timeout_s": graceful_shutdown_s,
    }
    if d.autoscaling is None:
        opts["num_replicas"] = d.num_replicas
    else:
        opts["autoscaling_config"] = {
            "min_replicas": d.autoscaling.min_replicas,
            "initial_replicas": max(1, d.autoscaling.min_replicas),
            "max_replicas": d.autoscaling.max_replicas,
            "target_ongoing_requests": d.autoscaling.target_ongoing_requests,
        }
    return opts


def expert_deployment_name(expert: str) -> str:
    return f"expert-{safe_key(expert)}"


def deployments(artifact: str, cfg: ServeConfig) -> dict[str, dict]:
    """Deployment name -> Serve options, for the chosen topology."""
    names = {"ingress": cfg.ingress, "fused": cfg.fused}
    if cfg.topology == "routed":
        names["router"] = cfg.router
        for expert in read_manifest(artifact)["expert_names"]:
            names[expert_deployment_name(expert)] = cfg.experts
    return {name: deployment_options(d, cfg.graceful_shutdown_s) for name, d in names.items()}


def initial_replicas(opts: dict) -> int:
    auto = opts.get("autoscaling_config")
    return auto["initial_replicas"] if auto else opts["num_replicas"]


def resource_demand(artifact: str, cfg: ServeConfig) -> dict[str, float]:
    """CPUs and GPUs the application's initial replicas reserve (what must fit for it to start)."""
    demand = {"CPU": 0.0, "GPU": 0.0}
    for opts in deployments(artifact, cfg).values():
        n = initial_replicas(opts)
        demand["CPU"] += n * opts["ray_actor_options"]["num_cpus"]
        demand["GPU"] += n * opts["ray_actor_options"]["num_gpus"]
    return demand


def build_app(args: dict):
    """Serve application builder (``import_path: serve_app.app:build_app``).

    ``args``: ``artifact`` (a run folder, ``OUTPUT/artifact`` or ``OUTPUT/artifacts/vN``: the app's
    source), ``version`` (default: the one ``artifact`` names) and ``serve`` (settings). The
    deployments' init args do not depend on the version; it reaches them as ``user_config:
    {version: N}``, and every request carries the version it was planned for, so replicas of
    different versions side by side during an update (``loramix serve-update``) never mix them.
    """
    from serve_app.deployments import (  # the deployments import torch; building the app's config does not
        ModelDeployment,
        RouterDeployment,
    )
    from serve_app.ingress import IngressDeployment  # the deployments import torch; building the app's config does not

    if "artifact" not in args:
        raise ConfigError("build_app needs `artifact`: a run folder, OUTPUT/artifact or OUTPUT/artifacts/vN.")
    source = os.path.abspath(args["artifact"])
    artifact = resolve(source, args.get("version"))
    manifest = read_manifest(artifact)
    live = {"user_config": {"version": (manifest.get("release") or {}).get("version")}}
    cfg = load_serve_config(artifact, args.get("serve"))
    if cfg.topology == "routed" and manifest.get("router") is None:
        raise ConfigError(f"{artifact!r} has no router, so `serve.topology: routed` cannot dispatch; use `fused`.")
    opts = deployments(artifact, cfg)
    limits = (cfg.max_running_requests, cfg.max_batched_tokens, cfg.cuda_graphs)

    def bind(cls, name: str, *init):
        return cls.options(name=name, **live, **opts[name]).bind(*init)

    fused = bind(ModelDeployment, "fused", source, None, *limits)
    router, experts = None, {}
    if cfg.topology == "routed":
        router = bind(RouterDeployment, "router", source, cfg.max_batch_size, cfg.batch_wait_timeout_s)
        experts = {
            e: bind(ModelDeployment, expert_deployment_name(e), source, e, *limits) for e in manifest["expert_names"]
        }
    return bind(IngressDeployment, "ingress", source, cfg.model_dump(), fused, router, experts)


def serve_config(
    artifact: str | Path, cfg: ServeConfig, *, version: int | None = None, app_name: str = "loramix"
) -> dict:
    """A Serve config (``serve run`` / ``serve deploy``) for ``version`` of ``artifact`` (default: the
    one it names); the API key is left out on purpose: set ``LORAMIX_API_KEY`` in the cluster's
    environment instead. Deploying the config of another version over it is a rolling update."""
    source = os.path.abspath(artifact)
    concrete = resolve(source, version)
    version = (read_manifest(concrete).get("release") or {}).get("version")
    settings = cfg.model_dump(exclude={"api_key"})
    live = {"user_config": {"version": version}}
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s},
        "applications": [
            {
                "name": app_name,
                "route_prefix": "/",
                "import_path": "serve_app.app:build_app",
                "args": {"artifact": source, "version": version, "serve": settings},
                "deployments": [{"name": name, **opts, **live} for name, opts in deployments(concrete, cfg).items()],
            }
        ],
    }
