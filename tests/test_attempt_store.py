"""parallel.attempt_store: each torchrun attempt rendezvouses in a store no earlier attempt wrote to,
and ranks that read an earlier attempt's announcement from the agent's store (its server dead, or
its port now another store's) wait for this attempt's."""

import threading
import time
from datetime import timedelta

import torch.distributed as dist

from parallel.attempt_store import ANNOUNCEMENT, attempt_store

HOST, TIMEOUT = "127.0.0.1", timedelta(seconds=30)


def test_a_rank_skips_announcements_of_earlier_attempts():
    agent = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)  # torchrun's
    earlier = attempt_store(agent, HOST, 0, 2, TIMEOUT)
    earlier.set("gloo/rank_1", b"an address of the earlier attempt")
    del earlier  # its rank 0 exited: the server is gone, the announcement stays

    found = {}
    rank1 = threading.Thread(target=lambda: found.update(store=attempt_store(agent, HOST, 1, 2, TIMEOUT)))
    rank1.start()
    time.sleep(0.5)
    assert rank1.is_alive()  # the announced server is dead: rank 1 waits
    foreign = dist.TCPStore(HOST, 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
    agent.set(ANNOUNCEMENT, f"{HOST} {foreign.port} not-this-attempts-token")  # a live store, not ours
    time.sleep(0.5)
    assert rank1.is_alive()

    current = attempt_store(agent, HOST, 0, 2, TIMEOUT)  # this attempt's rank 0
    rank1.join(timeout=20)
    assert not rank1.is_alive()
    found["store"].set("gloo/rank_1", b"this attempt's address")
    assert current.get("gloo/rank_1") == b"this attempt's address"  # rank 1 is a client of this attempt's store
    assert not foreign.check(["gloo/rank_1"])
