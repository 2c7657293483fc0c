"""Ray Serve applications and the `warmserve` command line."""
