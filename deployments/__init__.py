"""Ray Serve applications and the `warmserve` command line."""

import time

# When this process first imported warmserve's deployments: in a replica, Ray unpickling the deployment (or, on
# a preloaded worker, Ray's preload). A replica's /v1/status gives it as `process.app_import_began`.
IMPORT_BEGAN = time.time()
# When deployments/app.py (and all it imports) had loaded: set by its last line. `process.app_imported`.
IMPORTED: dict[str, float] = {}
