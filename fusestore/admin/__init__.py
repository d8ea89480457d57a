"""Commands that look at a pool from outside the request path.

``status`` (the daemon's status socket: the server half the daemon runs and
the client ``fusestore status`` uses) and ``check`` (looking through a pool's
datadirs). A new admin command goes here, with its subcommand in ``cli``.
"""
