"""warmserve: PyTorch models behind Ray Serve, compiled once into an engine cache that every replica shares.

Three subpackages, each one room: `warmserve.cache` (the engine cache and its stores), `warmserve.serve` (the
worker that compiles, refits and runs a model) and `warmserve.deployments` (the Ray Serve application, its
command line and rollouts). In the repository they are the top-level folders ``cache/``, ``serve/`` and
``deployments/``, linked from here so that a checkout imports them by the same names as an installed warmserve.
"""
