"""Run by test_faults.py as two ranks: rank 1 waits to be killed; rank 0 then makes each kind
of ``torch.distributed`` call and prints, per call, what :func:`lost_peer` makes of its error."""

from __future__ import annotations

import datetime
import sys
import time

import torch
import torch.distributed as dist

from pipeoptim.runtime.peer_loss import lost_peer

CALLS = {
    "recv": lambda: dist.recv(torch.zeros(4), 1),
    "irecv": lambda: dist.irecv(torch.zeros(4), 1).wait(),
    "send": lambda: dist.send(torch.zeros(1 << 20), 1),
    "isend": lambda: dist.isend(torch.zeros(1 << 20), 1).wait(),
    "all_reduce": lambda: dist.all_reduce(torch.zeros(4)),
    "barrier": lambda: dist.barrier(),
}


def main(rank: int, port: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=30),
    )
    dist.barrier()
    print("ready", flush=True)
    if rank == 1:
        time.sleep(120)
    sys.stdin.readline()  # rank 1 has been killed
    for name, call in CALLS.items():
        try:
            call()
        except Exception as exc:
            print(name, type(lost_peer(exc, rank)).__name__, str(exc).splitlines()[0], flush=True)
        else:
            print(name, "no error", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
