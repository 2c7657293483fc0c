"""Ray Serve applications and the `warmserve` command line."""

import time

# When this process began importing warmserve's deployments: in a replica, the start of the app's import
# (Ray unpickling the deployment), which its start report times.
IMPORT_BEGAN = time.time()
