"""``loramix serve`` / ``loramix serve-config``: deploy an artifact on Ray Serve.

Settings come from the artifact's ``serve.json`` (the run's `serve` section), then
``key.path=value`` overrides relative to the `serve` section (``experts.num_gpus=1``), then
flags. The key comes from ``--api-key`` or ``LORAMIX_API_KEY``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import ray
import yaml
from ray import serve
from ray.serve.schema import ApplicationStatus

from loramix.config import ConfigError, apply_overrides
from loramix.serve_config import ServeConfig
from loramix.versions import resolve, verify
from pipelines.run import connect
from serve_app.app import build_app, deployments, initial_replicas, load_serve_config, resource_demand, serve_config

logger = logging.getLogger(__name__)

APP_NAME = "loramix"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def settings(artifact: str, overrides: list[str] = (), **flags) -> ServeConfig:
    """The artifact's serve settings with ``overrides`` and non-None ``flags`` applied."""
    changes = apply_overrides({}, list(overrides))
    changes.update({k: v for k, v in flags.items() if v is not None})
    return load_serve_config(artifact, changes)


SECTIONS = ("ingress", "fused", "router", "experts")


def fit_to_cluster(artifact: str, cfg: ServeConfig, cpus: float, gpus: float) -> ServeConfig:
    """Shrink the CPU reservations a user left at their defaults until the initial replicas fit a
    cluster that nothing will grow (a local instance), or say which settings to change.

    Replicas of this size mostly wait on each other, so sharing cores costs little; a cluster
    too small even for explicit settings is an error now rather than an app that never starts.
    """
    demand = resource_demand(artifact, cfg)
    if demand["GPU"] > gpus:
        raise ConfigError(
            f"the app's replicas ask for {demand['GPU']:g} GPUs but the cluster has {gpus:g}. Lower "
            "`serve.*.num_gpus` (e.g. experts.num_gpus=0) or serve on a cluster with GPUs."
        )
    if demand["CPU"] <= cpus:
        return cfg
    fixed = {  # what the user set, in the run's `serve` section or an override (others are defaults)
        s: getattr(cfg, s)
        for s in SECTIONS
        if s in cfg.model_fields_set and "num_cpus" in getattr(cfg, s).model_fields_set
    }
    flexible = [s for s in SECTIONS if s not in fixed]
    opts = deployments(artifact, cfg)
    replicas = {s: sum(initial_replicas(o) for n, o in opts.items() if _section(n) == s) for s in SECTIONS}
    taken = sum(replicas[s] * fixed[s].num_cpus for s in fixed)
    share = sum(replicas[s] for s in flexible)
    room = cpus - taken
    if share == 0 or room <= 0.05 * share:
        settings = ", ".join(f"`serve.{s}.num_cpus`" for s in SECTIONS if replicas[s])
        raise ConfigError(
            f"the app's {sum(replicas.values())} initial replicas ask for {demand['CPU']:g} CPUs but this cluster has "
            f"{cpus:g} and nothing will add more. Lower {settings}, or start fewer expert replicas "
            "(`serve.experts.autoscaling.min_replicas=0`), or serve `--topology fused`."
        )
    each = round(min(room / share, 1.0), 3)
    what = "/".join(flexible)
    logger.warning(
        "the app asks for %g CPUs on a %g-CPU cluster: %s replicas reserve %g CPU each", demand["CPU"], cpus, what, each
    )
    return cfg.model_copy(update={s: getattr(cfg, s).model_copy(update={"num_cpus": each}) for s in flexible})


def _section(deployment: str) -> str:
    return "experts" if deployment.startswith("expert-") else deployment


def deploy(
    artifact: str, cfg: ServeConfig, address: str | None = None, *, version: int | None = None, start_timeout_s=120.0
) -> str:
    """Start (or update) the application serving ``version`` of ``artifact`` (default: the one it
    names) and wait until it runs; returns its base URL.

    On a local instance (no autoscaler) the replicas are first fitted to its CPUs; an app still not
    running after ``start_timeout_s`` is an error naming the deployments it waits for.
    """

    source = os.path.abspath(artifact)
    local = connect(address)
    if local:
        resources = ray.cluster_resources()
        cfg = fit_to_cluster(str(resolve(source, version)), cfg, resources.get("CPU", 0.0), resources.get("GPU", 0.0))
    serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s})
    run_app(build_app({"artifact": source, "version": version, "serve": cfg.model_dump()}))
    wait_running(start_timeout_s if local else None)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}"


def run_app(app) -> None:
    """Deploy ``app`` without waiting for it (:func:`wait_running` waits, noticing Ctrl-C and time-outs).

    Not ``serve.run`` in a thread, as before: a thread still waiting after Ray was shut down
    reconnects through Serve's client, which starts a new local Ray in this process. Two CI runs
    died that way, by all signs: a second cluster started by the test process beside the next
    test's own ``ray.init``, then the process exited on a lost GCS with nothing printed."""
    serve._run(app, _blocking=False, name=APP_NAME, route_prefix="/")  # `serve run`'s own non-blocking deploy


def update(run: str, version: int, address: str | None = None, *, timeout_s: float = 300.0) -> dict:
    """``loramix serve-update``: move the app running on the cluster to ``version`` of ``run``.

    The app is rebuilt from the source and settings its ingress reports, so only the version
    differs: Serve reconfigures the replicas in place (:func:`serve_app.app.build_app`). Requests
    planned before the switch finish on the old version, later ones use the new one; nothing is
    refused. Returns ``{"from", "to", "seconds"}``.
    """
    target = resolve(run, version)  # the version exists ...
    verify(target)  # ... and is whole, before the running app is touched
    cluster = address or os.environ.get("RAY_ADDRESS")
    if not cluster and not ray.is_initialized():
        raise ConfigError(
            "`serve-update` changes an app running on a cluster: pass --address or set RAY_ADDRESS "
            "(the cluster `loramix serve --detach` deployed to)."
        )
    connect(address)
    if APP_NAME not in serve.status().applications:
        raise ConfigError(f"no `{APP_NAME}` app runs on this cluster; start one with `loramix serve {run} --detach`.")
    running = serve.get_app_handle(APP_NAME).describe.remote().result()
    if resolve(running["source"], version) != target:
        raise ConfigError(
            f"the running app serves {running['source']!r}, not {str(run)!r}: serve-update moves an app between "
            "versions of one run; start the other run with `loramix serve`."
        )
    t0 = time.perf_counter()
    run_app(build_app({"artifact": running["source"], "version": version, "serve": running["serve"]}))
    time.sleep(1.0)  # let the controller take the new config before waiting for it to settle
    wait_running(timeout_s)
    return {"from": running["version"], "to": version, "seconds": time.perf_counter() - t0}


def wait_running(timeout_s: float | None, poll_s: float = 1.0) -> None:
    """Until the app runs; raises when it failed or (with ``timeout_s``) is still not running, naming
    the deployments that are not, and prints what it waits for every 30 s."""

    t0, said = time.monotonic(), 0.0
    while True:
        app = serve.status().applications.get(APP_NAME)
        status = app.status if app else ApplicationStatus.NOT_STARTED
        # An update is done when only the new replicas are left: during a rolling update the old
        # ones keep answering (with the old settings) while the app already reports RUNNING.
        settled = app is not None and all(set(d.replica_states) <= {"RUNNING"} for d in app.deployments.values())
        if status == ApplicationStatus.RUNNING and settled:
            return
        waiting = sorted(n for n, d in (app.deployments if app else {}).items() if d.status != "HEALTHY")
        if status == ApplicationStatus.DEPLOY_FAILED:
            raise ConfigError(f"the app failed to deploy: {app.message}")
        elapsed = time.monotonic() - t0
        if timeout_s is not None and elapsed > timeout_s:
            raise ConfigError(
                f"the app is not running after {timeout_s:.0f} s; still starting: {', '.join(waiting) or 'the app'}. "
                "Its replicas may not fit this cluster: lower `serve.*.num_cpus` / `num_gpus` or the replica counts."
            )
        if elapsed - said > 30:
            said = elapsed
            print(f"loramix: waiting for {', '.join(waiting) or 'the app'} to start ({elapsed:.0f} s)", file=sys.stderr)
        time.sleep(poll_s)


def check_detach(address: str | None, detach: bool) -> str | None:
    """The cluster to serve on (``--address`` or ``RAY_ADDRESS``); ``--detach`` needs one."""
    cluster = address or os.environ.get("RAY_ADDRESS")
    if detach and not cluster:
        raise ConfigError(
            "`--detach` leaves the app on a running cluster, but none was given: pass --address or set "
            "RAY_ADDRESS (without one, the local Ray this command starts ends with it)."
        )
    return cluster


def serve_forever(
    artifact: str, cfg: ServeConfig, address: str | None = None, *, version: int | None = None, detach: bool = False
) -> str:
    """Deploy, print the URL, then block until Ctrl-C (``detach``: return, leaving the app up)."""
    cluster = check_detach(address, detach)
    if cfg.api_key is None and cfg.host not in LOOPBACK:
        print(
            f"loramix: warning: serving on {cfg.host} without an API key: anyone who reaches the port can use it. "
            "Set LORAMIX_API_KEY (preferred over --api-key, which `ps` shows).",
            file=sys.stderr,
        )
    try:
        url = deploy(artifact, cfg, address, version=version)
        served = resolve(artifact, version)
        print(f"serving {served} ({cfg.topology}) at {url}/v1  (OpenAI-compatible; {url}/healthz)", flush=True)
        if detach:
            return url
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr, flush=True)
        return ""
    finally:
        if not detach:
            stop(cluster)


def stop(cluster: str | None) -> None:
    """Take down what this command started: the app on a cluster; the whole local instance otherwise
    (GCS, raylet, Serve controller, replicas: nothing is left holding the ports)."""

    if not ray.is_initialized():
        return
    try:
        if cluster:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
    except Exception as err:  # shutting down anyway
        logger.warning("while stopping Serve: %s", err)
    finally:
        ray.shutdown()


def write_serve_config(
    artifact: str, cfg: ServeConfig, output: str | None = None, *, version: int | None = None
) -> str:
    text = yaml.safe_dump(serve_config(artifact, cfg, version=version), sort_keys=False)
    header = (
        "# Ray Serve config for a loramix mixture: `serve deploy THIS.yaml` (cluster) or `serve run THIS.yaml`.\n"
        "# Set LORAMIX_API_KEY in the cluster's environment to require a key.\n"
    )
    if output:
        Path(output).write_text(header + text)
    return header + text


def api_key_flag(value: str | None) -> str | None:
    """The key from ``--api-key``, else ``LORAMIX_API_KEY``; a blank one is an error, not an open server."""
    if value is not None:
        key, source = value, "--api-key"
    elif "LORAMIX_API_KEY" in os.environ:
        key, source = os.environ["LORAMIX_API_KEY"], "LORAMIX_API_KEY"
    else:
        return None
    if not key.strip():
        raise ConfigError(f"{source} is empty or blank, which would leave the server open; set a real key.")
    return key
