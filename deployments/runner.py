"""`warmserve run`: check what can be checked before Ray starts, deploy the config, exit clearly if it fails.

The order is the one an operator wants: a mistake in the model, the weights, the backend, the cache's trust or
the port is reported in one line before any Ray process exists; a deployment that fails anyway ends the command
with the replica's own reason, and Ray is shut down again.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import requests

from warmserve.cache.errors import CacheError
from warmserve.deployments import ledger, pool, ports
from warmserve.deployments.auth import sign_rollout
from warmserve.deployments.errors import StartError
from warmserve.deployments.host import host_cpus
from warmserve.serve.errors import WarmserveError
from warmserve.serve.settings import Settings

SERVE_NAMESPACE = "serve"
RUN_MARKER = "WARMSERVE_RUN"  # in the environment of a local Ray's processes: which `warmserve run` started them
logger = logging.getLogger(__name__)


def say(message: str, stream: TextIO | None = None) -> None:
    print(f"warmserve: {message}", file=stream or sys.stderr, flush=True)


def app_entry(config: dict[str, Any]) -> dict[str, Any]:
    apps = config.get("applications") or []
    if len(apps) != 1:
        raise StartError(f"the config must hold exactly one application, it holds {len(apps)}")
    return apps[0]  # type: ignore[no-any-return]


def bind_weights(config: dict[str, Any], *, explicit: bool, resume: bool) -> str | None:
    """Apply the rollout record of this app and model: serve its weights (unless weights were given
    explicitly, or ``resume`` is off), and carry its version labels, so that a label keeps naming one content
    across restarts (explicit weights get their digest pinned, and a label already bound to other weights is
    refused). Returns what to tell the operator, or None."""
    from warmserve.serve.weights import weights_digest

    app = app_entry(config)
    settings = Settings.load(args=app.get("args"))
    directory = settings.cache.cache_dir
    found = ledger.last(directory, str(app.get("name", "warmserve")), settings.model.model)
    record, path = found if found else (None, None)
    history = dict(record.versions) if record else {}
    note = None
    for dep in app.get("deployments") or []:
        uc = dep.setdefault("user_config", {})
        for label, digest in (uc.get("versions") or {}).items():
            if history.setdefault(str(label), str(digest)) != digest:
                raise StartError(
                    f"the config binds version {label} to other weights than the rollout record {path} does; "
                    "a version label names one content: fix the config's versions"
                )
        if record and resume and not explicit:
            uc.update(record.user_config())
        weights, version = uc.get("weights"), uc.get("weights_version")
        if weights and version and not uc.get("weights_sha256"):
            try:
                sha256 = weights_digest(str(weights))
            except WarmserveError as e:
                raise StartError(f"the deployment's weights: {e}") from e
            if history.get(str(version), sha256) != sha256:
                raise StartError(
                    f"version {version} already names other weights (sha256 {history[str(version)][:16]}..., in "
                    f"{path}); a version label names one content: give these weights another --weights-version"
                )
            uc["weights_sha256"] = sha256
        if weights and version:
            history[str(version)] = str(uc["weights_sha256"])
            token = settings.admin_token
            uc.pop("signature", None)
            if token:  # replicas with an admin token take only signed weights, a restart's included
                uc["signature"] = sign_rollout(token, str(weights), str(version), str(uc["weights_sha256"]))
        uc["versions"] = dict(history)
    if record:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.at))
        if resume and not explicit:
            note = (
                f"resuming the last rollout: weights {record.version} ({record.weights}, sha256 {record.sha256[:12]}, "
                f"rolled out {when}; recorded in {path}); --no-resume serves the config's weights instead"
            )
        else:
            why = "--weights was given" if explicit else "--no-resume"
            note = f"not resuming the last rollout ({record.version}, {when}, recorded in {path}): {why}"
    return note


def preflight(config: dict[str, Any], *, local: bool) -> Settings:
    """Everything a replica would fail on, checked here first: settings, model, weights (readable, digest,
    fitting the model), and on this machine the backend, the cache's trust and the HTTP port."""
    from warmserve.serve import backends
    from warmserve.serve.model import build_model
    from warmserve.serve.weights import expected_tensors, read_weights, validate
    from warmserve.serve.worker import check_precision, output_specs, pick_device

    app = app_entry(config)
    try:
        settings = Settings.load(args=app.get("args"))
        model = build_model(settings.model.model, meta=True)
        expected = expected_tensors(model)
        wanted = [(settings.model.weights, None, "--weights")]
        for dep in app.get("deployments") or []:
            uc = dep.get("user_config") or {}
            wanted.append((uc.get("weights"), uc.get("weights_sha256"), "the deployment's user_config weights"))
        checked = set()
        for uri, sha256, where in wanted:
            if uri and uri not in checked:  # each file read once, with its pinned digest if it has one
                checked.add(uri)
                try:
                    validate(read_weights(str(uri), sha256).state, expected)
                except WarmserveError as e:
                    raise StartError(f"{where}: {e}") from e
        output_specs(settings.model)  # a forward that does not take the declared inputs fails here, not in Ray
        if local:
            device = pick_device(settings.device)
            backends.resolve(settings.backend, device)
            check_precision(settings.model.precision, settings.model.torch_dtype, device)
            settings.cache.require_trust()
    except StartError:
        raise
    except (WarmserveError, CacheError, ValueError) as e:
        raise StartError(str(e)) from e
    if local:
        http = config.get("http_options") or {}
        host = str(http.get("host", "127.0.0.1"))
        check_port(host, int(http.get("port", 8000)))
        if grpc_port(config):
            check_port(host, grpc_port(config), flag="--grpc-port")
    return settings


def grpc_port(config: Mapping[str, Any]) -> int:
    """The gRPC port the config serves on, 0 when it serves no gRPC."""
    grpc = config.get("grpc_options") or {}
    return int(grpc.get("port", 0) or 0) if grpc.get("grpc_servicer_functions") else 0


def check_port(host: str, port: int, flag: str = "--port") -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise StartError(busy_port(host, port, flag)) from e
            raise StartError(f"cannot listen on {host}:{port} ({e.strerror}); choose --host/{flag}") from e


def busy_port(host: str, port: int, flag: str) -> str:
    """Why ``port`` cannot be had, naming the process that holds it where this user can see it: an HAProxy
    that Ray Serve left behind (an earlier run killed before it could stop it) is said to be one, with its pid
    and how to stop it."""
    held = ports.holders(port)
    orphans = [h for h in held if h.is_serve_haproxy and h.orphaned]
    if orphans:
        pids = " ".join(str(h.pid) for h in orphans)
        return (
            f"port {port} on {host} is held by Ray Serve's HAProxy left behind by an earlier run "
            f"({orphans[0].describe()}); stop it with `kill {pids}`, or pick another port with {flag}"
        )
    if any(h.is_serve_haproxy for h in held):
        return (
            f"port {port} on {host} is served by a running Ray Serve's HAProxy (another warmserve run?; "
            f"{held[0].describe()}); stop that service or pick another port with {flag}"
        )
    if held:
        return f"port {port} on {host} is already in use by {held[0].describe()}; stop it or pick another with {flag}"
    return f"port {port} on {host} is already in use (another warmserve or server?); pick a free one with {flag}"


# Ray Serve's replica settings for a local cluster (the operator's own values win).
SERVE_TUNING = {
    # User code runs on the replica's own event loop, not on a second loop in a thread of its own: every request
    # crossed between the two. One client's 1-row request took 2.63 ms instead of 3.95 over HTTP and 3.33 instead
    # of 4.54 over gRPC, 32 rows over gRPC 50 ms instead of 90 (H200, bench/results/latency-split-*); 64 clients
    # got 3,544 answers/s instead of 3,218 (H100, bench/results/haproxy-watch-*). The replicas it once appeared
    # to kill were killed for perf_analyzer's own memory (bench/results/perf-analyzer-cuda-h100-same-thread-*).
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
}

# Ray Serve's HAProxy settings for a local cluster (the operator's own values win).
HAPROXY_TUNING = {
    # A replica that stops stays reachable this long, so that HAProxy has dropped it before it goes. Serve's
    # 30 s is for HAProxies on other nodes; on one host its HAProxy reloads within a second, and 30 s made
    # every stop outlast serve.shutdown's own 30 s wait (the controller cut off, Ray killed mid-shutdown).
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    # gRPC requests are large (a 224x224 FP32 row is 602 KB): with HTTP/2's 64 KB stream windows and 16 KB
    # buffers, HAProxy relayed them in many round trips, and gRPC ran slower than HTTP through the same
    # replicas (bench/results/perf-analyzer-*). On the 2-core CPU, with no Ray (bench/results/haproxy-relay-cpu.md,
    # one run), 256 KB buffers added 7.3 ms to a 32-row gRPC request (19 MB) where 64 KB ones added 13.1, and 1 MB
    # ones 17.8; HTTP was within the spread. Each request in flight holds a few such buffers: four times the
    # memory of 64 KB ones.
    "RAY_SERVE_HAPROXY_H2_FE_INITIAL_WINDOW_SIZE": str(1 << 20),
    "RAY_SERVE_HAPROXY_H2_BE_INITIAL_WINDOW_SIZE": str(1 << 20),
    "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": str(1 << 18),
}

# HAProxy's own listeners on every interface, beside the service port: Ray's default ports.
HAPROXY_PORTS = {
    "RAY_SERVE_HAPROXY_METRICS_PORT": ("metrics", 9101),
    "RAY_SERVE_HAPROXY_STATS_PORT": ("stats", 8404),
}


def ingress_env(local: bool, ingress: str, environ: Mapping[str, str]) -> dict[str, str]:
    """What the Ray processes of a local cluster need in their environment for ``ingress`` (with HAProxy,
    Serve's replica settings `SERVE_TUNING` too); nothing for a cluster we join (its nodes chose when they
    started). HAProxy's metrics and stats listeners stay on Ray's default ports when those are free, else move
    to free ones: a second service on this host, or an HAProxy left behind by a killed Ray, would otherwise make
    HAProxy exit at start with 'Address already in use'."""
    if not local:
        return {}
    if ingress != "haproxy":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    env = {name: environ.get(name, value) for name, value in SERVE_TUNING.items()}  # measured behind HAProxy
    env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    for name, value in HAPROXY_TUNING.items():
        env[name] = environ.get(name, value)
    for name, (what, default) in HAPROXY_PORTS.items():
        if name in environ:
            continue
        try:
            check_port("0.0.0.0", default)
        except StartError:
            with socket.socket() as s:
                s.bind(("", 0))
                env[name] = str(s.getsockname()[1])
            say(f"HAProxy's {what} port {default} is taken; it listens on {env[name]} instead")
    return env


def ray_address(environ: dict[str, str] | None = None) -> tuple[str | None, str]:
    """The Ray cluster ``ray.init`` would join (None: it starts a local one) and where that address came
    from. An address that does not answer is an error now, not minutes of retries later."""
    import os

    env = os.environ if environ is None else environ
    address, source = env.get("RAY_ADDRESS") or None, "RAY_ADDRESS"
    if address == "local":
        return None, ""
    if address in (None, "auto"):
        from ray._private.utils import read_ray_address

        address, source = read_ray_address(), "the last `ray start` on this machine"
        if not address:
            return None, ""
    if "://" in address:  # ray:// clients and the like: leave them to Ray
        return address, source
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=3):
            pass
    except (OSError, ValueError) as e:
        fix = (
            "start that cluster, or unset RAY_ADDRESS to start a local one"
            if source == "RAY_ADDRESS"
            else "run `ray stop --force` to forget it (a local cluster then starts), or start it again"
        )
        raise StartError(f"the Ray cluster at {address} (from {source}) does not answer ({e}); {fix}") from e
    return address, source


def failure_reason(message: str) -> str:
    """The one line that says why a deployment failed, out of Ray's message and tracebacks."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Unavailable|Refused)\w*: ", ln)]
    ours = [ln for ln in errors if "Traceback" not in ln and not ln.startswith(("RuntimeError: Traceback",))]
    if ours:
        return re.sub(r"^(?:[\w]+\.)+", "", ours[-1])
    return lines[-1] if lines else "unknown reason (see the Serve logs)"


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C, so `kill` shuts Serve down too; and SIGINT stops it even where the process
    began with SIGINT ignored, as a job that a script puts in the background does (`kill -INT` did nothing)."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(
    config: dict[str, Any],
    *,
    verbose: bool = False,
    ready_timeout: float | None = None,
    ingress: str = "serve",
    notes: Sequence[str] = (),
    json_lines: bool = False,
) -> int:
    """Start (or join) Ray, deploy ``config``, report readiness, then serve until interrupted. ``ingress``
    "haproxy" starts a local Ray with Ray Serve's HAProxy ingress; a cluster we join keeps its own. ``notes``
    (what was resumed, the layout chosen) are said once the checks have passed: a mistake is one line.
    ``json_lines``: readiness, or the error that ended the service, is also one JSON line on stdout."""

    def failed(message: str) -> int:
        say(f"error: {message}")
        if json_lines:
            print(json.dumps({"error": message, "exit_code": 1}), file=out, flush=True)
        return 1

    address, source = ray_address()
    local = address is None
    settings = preflight(config, local=local)
    cpus = host_cpus()
    options = ray_options(config, local=local, cpus=cpus)
    for note in notes:
        say(note)
    if options["_system_config"]:
        say(
            "Ray's worker processes import torch and the app as they start, so a new replica does not "
            "(WARMSERVE_PRELOAD=0 turns this off)"
        )
    if options["num_cpus"]:
        say(
            f"Ray counts {options['num_cpus']} CPUs instead of {cpus}, so that it starts such a worker ahead for "
            "each replica a scale-up may add; no replica lands on the extra ones (WARMSERVE_PRELOAD_POOL=0 keeps "
            "the host's count)"
        )
    out = _json_stream() if json_lines else sys.stdout
    # Read by every Ray Serve process when it starts, so set before Ray starts: they inherit it.
    os.environ.update(ingress_env(local, ingress, os.environ))
    if local:  # every process of the local Ray inherits it: what `_shutdown` finds them by, if Ray cannot stop them
        os.environ[RUN_MARKER] = f"{os.getpid()}-{time.time_ns()}"
    http = config.get("http_options") or {}
    url = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
    app = app_entry(config)
    name = str(app.get("name", "warmserve"))

    import ray
    from ray import serve as ray_serve
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions

    say(f"starting a local Ray cluster for {url}" if local else f"joining the Ray cluster at {address} ({source})")
    try:
        context = ray.init(
            address=address or "local",
            namespace=SERVE_NAMESPACE,
            log_to_driver=verbose,
            **options,
        )
    except KeyboardInterrupt:
        return 0
    except Exception as e:  # Ray's many start failures: one line, not its traceback
        logger.debug("ray.init failed", exc_info=True)
        return failed(f"Ray did not start: {one_line(e)}")
    dashboard = f"http://{context.dashboard_url}" if getattr(context, "dashboard_url", None) else None
    lost: str | None = None  # why a local Ray ended under the service (`_watch`)
    node_id = ray.get_runtime_context().get_node_id() if local else None
    session = ports.session_dir(RUN_MARKER, os.environ[RUN_MARKER]) if local else None  # for `_shutdown`
    # After ray.init, which installs a crash handler for SIGTERM: `kill` must shut down cleanly too.
    with _stop_on_signals():
        try:
            schema = serve_schema(config)
            client = serve_api.serve_start(
                http_options=schema.http_options.model_dump(),
                proxy_location=schema.proxy_location,
                grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
            )
            client.deploy_apps(schema, _blocking=False)
            _wait_ready(ray_serve, name, ready_timeout)
            grpc_at = f"{http.get('host', '127.0.0.1')}:{grpc_port(config)}" if grpc_port(config) else None
            _wait_answering(url, grpc_at, ready_timeout)
            meta = _metadata(url, settings)
            say(f"ready on {url}: {_describe(meta, settings)}")
            if json_lines:
                print(json.dumps({"ready": url, "grpc_port": grpc_port(config) or None, **meta}), file=out, flush=True)
            if grpc_port(config):
                where = http.get("host", "127.0.0.1") if ingress == "haproxy" else "every interface"
                say(f"gRPC (Open Inference Protocol, tritonclient.grpc) on port {grpc_port(config)}, {where}")
            if dashboard:
                default = dashboard.rstrip("/") == "http://127.0.0.1:8265"
                say(f"Ray dashboard {dashboard}" + ("" if default else f" (warmserve rollout --address {dashboard})"))
            if settings.model.weights is None and not _user_weights(app):
                say("these are seeded demo weights, so labels are random; serve yours with --weights FILE")
            _remember(app, settings)
            gcs = ray.get_runtime_context().gcs_address if local else None
            lost = _watch(url, gcs)
            return failed(f"{lost}; stopping what is left of it")
        except KeyboardInterrupt:
            say("shutting down")
            return 0
        except StartError as e:
            return failed(str(e))
        except Exception as e:  # Serve refusing the config, the controller dying...: one line, then shut down
            logger.debug("serving failed", exc_info=True)
            return failed(one_line(e))
        finally:
            app_only = name if not local else None  # a cluster we joined keeps running
            _shutdown(ray, ray_serve, app_only, haproxy_node=node_id, lost=lost is not None, session=session)


def preloads(config: dict[str, Any], *, local: bool, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the Ray workers of this service import torch and the app as they start (deployments/preload.py).
    A replica Serve starts on such a worker skips seconds of imports, which is what a scale-up waits on; the
    price is every Ray worker process of the node importing them too, at the cluster's start. So: on a local
    cluster whose replicas autoscale on a GPU, where cores are many; ``WARMSERVE_PRELOAD`` 1 or 0 decides
    instead. A cluster we join keeps its own settings."""
    environ = os.environ if environ is None else environ
    choice = environ.get("WARMSERVE_PRELOAD", "")
    if choice not in ("", "0", "1"):
        raise StartError(f"WARMSERVE_PRELOAD must be 0 or 1, got {choice!r}")
    if not local:
        return False
    if choice:
        return choice == "1"
    deployments = app_entry(config).get("deployments") or []
    return any(d.get("autoscaling_config") and (d.get("ray_actor_options") or {}).get("num_gpus") for d in deployments)


def ray_system_config(
    config: dict[str, Any], *, local: bool, environ: Mapping[str, str] | None = None
) -> dict[str, Any] | None:
    """Ray's ``_system_config`` for the local cluster `warmserve run` starts (None for one it joins)."""
    if not preloads(config, local=local, environ=environ):
        return None
    return {"preload_python_modules": ["warmserve.deployments.preload"]}


def ray_options(
    config: dict[str, Any], *, local: bool, cpus: int, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """``ray.init``'s ``num_cpus`` and ``_system_config`` (None: Ray's own) on a host of ``cpus`` cores: with
    preloading, a CPU count raised so that Ray starts a worker for every replica a scale-up may add
    (deployments/pool.py), and a start-up concurrency to match: Ray starts no more workers with the cluster
    than that. Both variables are checked whether they apply or not."""
    environ = os.environ if environ is None else environ
    raised = pool.raised_cpus(app_entry(config), cpus, environ)
    system_config = ray_system_config(config, local=local, environ=environ)
    if system_config is None or raised is None:
        return {"num_cpus": None, "_system_config": system_config}
    return {"num_cpus": raised, "_system_config": {**system_config, "worker_maximum_startup_concurrency": raised}}


def serve_schema(config: dict[str, Any]) -> Any:
    """Ray Serve's own check of ``config``, as its ServeDeploySchema. An autoscaling config's
    ``metrics_interval_s`` is the only way to have replicas report their load more often than every 10 s:
    Ray 2.60 deprecates it for environment variables that nothing of it reads yet, so that warning is not
    passed on."""
    from ray.serve.schema import ServeDeploySchema

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The `metrics_interval_s` field", category=DeprecationWarning)
        return ServeDeploySchema.model_validate(config)


def _json_stream() -> TextIO:
    """Standard output for JSON lines alone: what anything else writes there (Ray's own messages, from Python
    or C++) goes to standard error from now on."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture): nothing to keep apart
        return sys.stdout
    sys.stdout.flush()
    out = os.fdopen(os.dup(fd), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), fd)
    return out


def one_line(e: BaseException, limit: int = 400) -> str:
    """An error in one line: a Ray task's error by the exception it carries (its own first line says only
    where the task ran, e.g. HAProxyManager.ready(), not why), its text's whitespace collapsed."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException) and cause is not e:
        e = cause
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}" if text else type(e).__name__


def _shutdown(
    ray: Any,
    ray_serve: Any,
    app: str | None,
    timeout: float = 60.0,
    haproxy_node: str | None = None,
    lost: bool = False,
    session: str | None = None,
) -> None:
    """Stop Serve (or only ``app`` on a cluster we joined) and Ray, within ``timeout``: a Ray whose
    processes are already gone must not keep the command from exiting. A second Ctrl-C or SIGTERM does not cut
    this short. Then, for a local Ray (``haproxy_node``: its node id), an HAProxy of it that is still alive is
    stopped: Serve can lose one that a reload started while its manager was stopping it. ``lost``: the local
    Ray's GCS is gone, so no Serve call can succeed: Ray is stopped within 10 s. Where it was lost, or did not
    stop in time, the local Ray's processes still alive (`RUN_MARKER`, or a file open in its ``session``
    directory) are stopped too: without a GCS, Ray's agents linger a minute or more."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if lost:
        timeout = min(timeout, 10.0)
    stopped = _stop_ray(ray, None if lost else ray_serve, app, timeout)
    if haproxy_node:
        for h in ports.stop_haproxies(haproxy_node):
            say(f"stopped Ray Serve's HAProxy that outlived Ray ({h.describe()})")
        if (lost or not stopped) and os.environ.get(RUN_MARKER):
            left = ports.stop_marked(RUN_MARKER, os.environ[RUN_MARKER], session)
            if left:
                names = sorted({h.command.split()[0].rpartition("/")[2] for h in left})
                say(f"stopped {len(left)} process(es) of the local Ray that outlived it: {', '.join(names)}")
    signal.signal(signal.SIGINT, previous[0])
    signal.signal(signal.SIGTERM, previous[1])
    if not stopped:
        say(f"Ray did not shut down within {timeout:.0f}s; exiting anyway (`ray stop --force` cleans up)")
        sys.stderr.flush()
        os._exit(1)  # Ray's own threads and exit hooks may hang too


def _stop_ray(ray: Any, ray_serve: Any | None, app: str | None, timeout: float) -> bool:
    """Whether Serve (unless ``ray_serve`` is None) and Ray stopped within ``timeout``."""

    def stop() -> None:
        # Each step is tried whatever the one before it raised (a Ray half gone raises from both); what they
        # raised is logged (-vv shows it), not shown: the stop goes on either way.
        if ray_serve is not None:
            try:
                if app is None:
                    ray_serve.shutdown()
                else:
                    ray_serve.delete(app)
            except Exception:
                logger.debug("stopping Serve failed", exc_info=True)
        try:
            ray.shutdown()
        except Exception:
            logger.debug("ray.shutdown failed", exc_info=True)

    worker = threading.Thread(target=stop, daemon=True, name="shutdown")
    worker.start()
    worker.join(timeout)
    return not worker.is_alive()


WATCH_INTERVAL_S = 2.0
GCS_CHECKS = 3  # connections to the GCS, WATCH_INTERVAL_S apart, that fail before the service ends


def _watch(url: str, gcs: str | None, interval: float = WATCH_INTERVAL_S) -> str:
    """Serve until the local Ray is gone (``gcs``: its GCS's address; None for a cluster we joined, which may
    restart its GCS), and return why. Meanwhile say when the service stops answering at ``url`` (its
    ``/-/healthz``: HAProxy or Serve's proxy gone, or, behind HAProxy, no replica ready) and when it answers
    again, so that a user's terminal shows an outage while Serve repairs it. Ray's driver gives up on a lost
    GCS only after a minute, and then ends this process (exit 1, a line of its own log) and leaves HAProxy
    holding the port; `GCS_CHECKS` failed connections to the GCS, ``interval`` apart, end the service here
    first, so that it stops cleanly."""
    refused = 0
    down: float | None = None
    while True:
        time.sleep(interval)
        if gcs is not None:
            refused = 0 if _connects(gcs) else refused + 1
            if refused >= GCS_CHECKS:
                return f"the local Ray cluster stopped under the service (its GCS at {gcs} takes no connections)"
        problem = _unhealthy(url)
        if problem is not None and down is None:
            down = time.monotonic()
            say(f"the service at {url} is not answering: {problem}")
        elif problem is None and down is not None:
            say(f"the service at {url} answers again, after {time.monotonic() - down:.0f}s")
            down = None


def _connects(address: str, timeout: float = 1.0) -> bool:
    """Whether ``host:port`` (``[v6]:port`` too, as Ray writes an IPv6 address) takes a TCP connection."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def _unhealthy(url: str, timeout: float = 2.0) -> str | None:
    """What is wrong with the service at ``url``, from its ``/-/healthz``; None where it answers 200. HAProxy
    answers 503 there while no replica is ready; Serve's own proxy answers 200 once it runs."""
    try:
        with requests.Session() as session:
            session.trust_env = False  # the service's own port: never through an HTTP proxy of the environment
            r = session.get(f"{url}/-/healthz", timeout=timeout)
    except requests.Timeout:  # before ConnectionError: a connect timeout is both
        return f"no answer within {timeout:.0f}s"
    except requests.ConnectionError:
        return "it refuses connections (Ray Serve restarts its ingress)"
    except requests.RequestException as e:
        return one_line(e, 200)
    if r.status_code == 503:
        return "no replica is ready behind it (HTTP 503 from /-/healthz)"
    return None if r.status_code == 200 else f"HTTP {r.status_code} from /-/healthz ({' '.join(r.text.split())[:100]})"


def _remember(app: dict[str, Any], settings: Settings) -> None:
    """Record the weights every replica now serves, so a plain restart serves them again."""
    uc = next((d.get("user_config") or {} for d in app.get("deployments") or []), {})
    if not (uc.get("weights") and uc.get("weights_version") and uc.get("weights_sha256")):
        return
    directory = settings.cache.cache_dir
    record = ledger.Rollout(
        str(app.get("name", "warmserve")),
        settings.model.model,
        str(uc["weights"]),
        str(uc["weights_version"]),
        str(uc["weights_sha256"]),
        versions=dict(uc.get("versions") or {}),
    )
    try:
        ledger.record(directory, record)
    except OSError as e:
        say(f"warning: could not record the weights served for the next start: {e}")


def _user_weights(app: dict[str, Any]) -> bool:
    return any((d.get("user_config") or {}).get("weights") for d in app.get("deployments") or [])


def _wait_ready(ray_serve: Any, name: str, timeout: float | None) -> None:
    """Until the application is RUNNING; a failed deployment raises ``StartError`` with its reason."""
    t0 = time.monotonic()
    last_note = t0
    while True:
        status = ray_serve.status().applications.get(name)
        state = str(getattr(status, "status", "NOT_STARTED"))
        if state.endswith("RUNNING"):
            return
        if state.endswith(("DEPLOY_FAILED", "UNHEALTHY")):
            messages = [status.message, *(d.message for d in status.deployments.values())]
            raise StartError(f"the deployment failed: {failure_reason(chr(10).join(m for m in messages if m))}")
        elapsed = time.monotonic() - t0
        if timeout is not None and elapsed > timeout:
            raise StartError(f"the application was not ready after {timeout:.0f}s (state {state})")
        if time.monotonic() - last_note >= 15:
            say(f"still starting after {elapsed:.0f}s (a first start compiles the model; later ones load it)")
            last_note = time.monotonic()
        time.sleep(0.5)


ANSWER_TIMEOUT_S = 120.0  # from Serve's RUNNING to both ports answering; HAProxy took seconds


def _wait_answering(url: str, grpc_target: str | None, timeout: float | None) -> None:
    """Until the service answers ready through its ports (HTTP, and gRPC where it is on): Serve says RUNNING
    before its ingress routes to the replicas (HAProxy took up to seconds more for gRPC), and a client that
    starts on the ready line must not see those failures. A port that does not answer within ``timeout``
    (`ANSWER_TIMEOUT_S` if None) is a `StartError` with the last thing it said."""
    import grpc

    from warmserve.deployments import oip_grpc

    limit = ANSWER_TIMEOUT_S if timeout is None else timeout
    deadline = time.monotonic() + limit
    pending: dict[str, str] = {"HTTP": "no answer yet"}  # port -> what it last said
    if grpc_target:
        pending["gRPC"] = "no answer yet"
    with contextlib.ExitStack() as stack:
        ready = None
        if grpc_target:
            channel = stack.enter_context(grpc.insecure_channel(grpc_target))
            ready = channel.unary_unary(
                f"/{oip_grpc.SERVICE}/ServerReady",
                request_serializer=oip_grpc.ServerReadyRequest.SerializeToString,
                response_deserializer=oip_grpc.ServerReadyResponse.FromString,
            )
        while True:
            if "HTTP" in pending:
                try:
                    r = requests.get(f"{url}/v2/health/ready", timeout=5)
                    if r.status_code == 200:
                        del pending["HTTP"]
                    else:
                        pending["HTTP"] = f"{url}/v2/health/ready answered {r.status_code}"
                except requests.RequestException as e:
                    pending["HTTP"] = one_line(e)
            if ready is not None and "gRPC" in pending:
                try:
                    if ready(oip_grpc.ServerReadyRequest(), timeout=5).ready:
                        del pending["gRPC"]
                    else:
                        pending["gRPC"] = "ServerReady answered not ready"
                except grpc.RpcError as e:
                    pending["gRPC"] = f"{e.code().name}: {e.details()}"  # type: ignore[attr-defined]
            if not pending:
                return
            if time.monotonic() > deadline:
                said = "; ".join(f"{port}: {what}" for port, what in pending.items())
                raise StartError(
                    f"the application is running, but {' and '.join(pending)} did not answer ready "
                    f"within {limit:.0f}s ({said})"
                )
            time.sleep(0.2)


def _metadata(url: str, settings: Settings) -> dict[str, Any]:
    """What serves, as the model's metadata says: model, backend, device, weights, how the replica started."""
    try:
        p = requests.get(f"{url}/v2/models/{settings.model.name}", timeout=10).json()["parameters"]
        keys = ("backend", "device", "weights_version", "start")
        return {"model": settings.model.model, **{k: p[k] for k in keys}}
    except (requests.RequestException, ValueError, KeyError, TypeError):
        return {"model": settings.model.model}


def _describe(meta: Mapping[str, Any], settings: Settings) -> str:
    """One line on what serves: model, backend, weights version, how the first replica started."""
    try:
        start = meta["start"]
        return (
            f"{start['model']} via {meta['backend']} on {meta['device']}, weights {meta['weights_version']}; "
            f"engine {start['outcome']} in {start['total_seconds']:.1f}s"
        )
    except (KeyError, TypeError):
        return settings.model.model


def effective_config(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the command line's settings (``overrides``, each checked and named by its option)
    applied to the app's ``args``, so that every replica is given them."""
    config = copy.deepcopy(config)
    app = app_entry(config)
    args = app.setdefault("args", {}) or {}
    Settings.load(options=overrides, args=args)
    app["args"] = {**args, **{k: v for k, v in overrides.items() if v is not None}}
    return config


def load_config(path: Path) -> dict[str, Any]:
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise StartError(f"cannot read the config {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise StartError(f"the config {path} is not valid YAML: {e}") from e
    if not isinstance(doc, dict) or not doc.get("applications"):
        raise StartError(f"the config {path} has no `applications:` list (see deployments/config.yaml)")
    return doc
