"""Rank, sharding and gathering for runs started with `accelerate launch` or `torchrun` (one process per GPU).

Single-process runs never touch torch.distributed: everything here is a no-op unless WORLD_SIZE > 1.
"""

import os


def launched():
    """True when started by a distributed launcher with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state(cpu=None):
    """accelerate's PartialState (initialises the process group once: gloo on CPU, NCCL on CUDA). `cpu` defaults to
    "no CUDA here"; without it accelerate would not form a CPU process group under torchrun."""
    from accelerate import PartialState

    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def rank_and_world():
    if not launched():
        return 0, 1
    state = process_state()
    return state.process_index, state.num_processes


def is_main_process():
    return rank_and_world()[0] == 0


def default_device():
    """This process's device: its own GPU under a launcher (cuda:LOCAL_RANK), else CUDA when present, else CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    if launched():
        return process_state().device
    return torch.device("cuda")


def shard(items, rank=None, world=None):
    """This process's share of `items`: every world-th one, starting at its rank (deterministic, balanced)."""
    if rank is None or world is None:
        rank, world = rank_and_world()
    return list(items)[rank::world]


def deal(batches, world):
    """Owner rank of each batch, dealt in snake order (0,1,..,w-1,w-1,..,0) so that batches sorted longest first
    give every rank about the same amount of audio."""
    owners = []
    for k in range(len(batches)):
        turn, position = divmod(k, world)
        owners.append(position if turn % 2 == 0 else world - 1 - position)
    return owners


def broadcast(obj):
    """Rank 0's `obj` on every rank."""
    if not launched():
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def gather(items):
    """Concatenation of every rank's list `items`, in rank order, on every rank."""
    if not launched():
        return list(items)
    from accelerate.utils import gather_object

    return gather_object(list(items))


def gather_by_index(values, indices):
    """Merge per-rank results: rank r filled `values[i]` for i in its `indices`; returns the full list everywhere."""
    merged = list(values)
    for i, value in gather([(i, values[i]) for i in indices]):
        merged[i] = value
    return merged


__all__ = ["broadcast", "deal", "default_device", "gather", "gather_by_index", "is_main_process", "launched",
           "process_state", "rank_and_world", "shard"]
