"""Imported by each Ray worker process of a local `warmserve run` on a GPU host as the process starts, before
it runs anything (Ray's ``preload_python_modules``): an idle worker that Serve later turns into a replica has
torch, Ray Serve's replica and warmserve's app imported already, instead of spending its first seconds on them.

Ray imports this module by name and gives up only on an ImportError, so nothing raised here may escape: a
failure to import the app is the replica's own to report."""

from __future__ import annotations

import importlib
import logging

logger = logging.getLogger(__name__)

MODULES = ("torch", "ray.serve._private.replica", "warmserve.deployments.app")


def preload() -> None:
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # one escaping would stop the Ray worker; the replica reports it itself
            logger.warning("could not preload %s; a replica imports it itself", name, exc_info=True)
            return


preload()
