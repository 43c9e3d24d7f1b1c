"""A TCP store of this torchrun attempt's own, for torch.distributed's rendezvous.

torchrun's agent serves one store for the whole job (TORCHELASTIC_USE_AGENT_STORE=True, torch's
default since 2.4) and keeps it across restarts (`--max-restarts`). The keys an attempt's ranks
write there (gloo's address of every rank in every group) outlive them, and the next attempt's
ranks can read those instead of their peers' new ones and fail to connect. A key prefix per
attempt, from TORCHELASTIC_RESTART_COUNT, cures that on one node only: that count is each node's
agent's own, and only the agent whose rank failed counts a restart (the others restart their ranks
to join the new round without counting one), so after a restart the nodes use different prefixes
and their ranks never meet.

So each attempt gets a store no earlier attempt wrote to: rank 0 serves a new one on a free port and
announces it (host, port, a random token) in the agent's store; the other ranks connect to the
announced one. An announcement left by an earlier attempt names a server that died with that
attempt's rank 0 (torchrun stops every rank of an attempt before the next rendezvous completes),
so nothing listens there (or a server without the announced token does: a port used again); they
then read the announcement again until this attempt's rank 0 has written it.
"""

from __future__ import annotations

import socket
import time
import uuid
from datetime import timedelta

import torch.distributed as dist

ANNOUNCEMENT = "megads/attempt_store"   # "HOST PORT TOKEN", in the agent's store
TOKEN = "megads/attempt_token"          # the token, in the attempt's store
CONNECT_TIMEOUT = timedelta(seconds=5)  # to try one announced server


def attempt_store(agent_store: dist.Store, host: str, rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """This attempt's store: served by rank 0 (`host`: rank 0's address as the others reach it) and announced in
    `agent_store`; the other ranks wait up to `timeout` for the announcement of a live one."""
    if rank == 0:
        # wait_for_workers=False: the others learn the port only from the announcement below.
        store = dist.TCPStore(host, 0, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
        token = uuid.uuid4().hex
        store.set(TOKEN, token)
        agent_store.set(ANNOUNCEMENT, f"{host} {store.port} {token}")
        return store
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        announced_host, port, token = agent_store.get(ANNOUNCEMENT).decode().split()
        store = _connect(announced_host, int(port), token, world_size)
        if store is not None:
            store.set_timeout(timeout)
            return store
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank} found no store of this torchrun attempt: rank 0 did not announce one "
                               f"within the collective timeout ({timeout.total_seconds():.0f} s).")
        time.sleep(0.2)


def _connect(host: str, port: int, token: str, world_size: int):
    """A client of the store at host:port if it holds `token`; None if nothing answers there or another store does."""
    try:  # a plain connect first: TCPStore's own retries a refused one until its timeout, logging each try
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT.total_seconds()).close()
    except OSError:
        return None
    try:
        store = dist.TCPStore(host, port, world_size, is_master=False, timeout=CONNECT_TIMEOUT)
        return store if store.check([TOKEN]) and store.get(TOKEN).decode() == token else None
    except RuntimeError:  # torch's DistNetworkError / DistStoreError: not a TCPStore, or it went away
        return None
