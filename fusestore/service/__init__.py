"""Running a pool as a daemon: mounting, serving, signals, settings.

``daemon`` mounts the pool and serves it until unmounted or signalled,
``settings`` merges the config file, ``-o`` options and command-line flags,
and ``selfmount`` keeps the daemon from ever waiting on its own mountpoint.
"""
