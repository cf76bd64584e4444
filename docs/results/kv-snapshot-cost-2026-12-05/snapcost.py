"""What taking a worker's KV snapshot costs its event loop: ``KvHistory`` holding
96,000 blocks (3,000 batches of 32 chained 16-token blocks), timed in process."""

import json
import sys
import time

from smg_grpc_proto.generated import common_pb2

from kvmesh.worker.kv_history import KvHistory

history = KvHistory()
for b in range(3000):
    parent = None
    events = []
    blocks = []
    for i in range(32):
        h = (b << 8) | i
        blocks.append(common_pb2.KvBlock(block_hash=h, token_ids=list(range(16)), block_size=16))
    stored = common_pb2.KvBlocksStored(blocks=blocks)
    history.record(common_pb2.KvEventBatch(sequence_number=b + 1,
                                           events=[common_pb2.KvCacheEvent(stored=stored)]))
out = {"blocks": history.blocks}
for _ in range(3):
    t = time.perf_counter()
    chunks = history.snapshot()
    taken = time.perf_counter() - t
    if isinstance(chunks, list):  # the code before: every chunk built by the call
        out.setdefault("eager_s", []).append(round(taken, 4))
        continue
    first = next(chunks)
    one = time.perf_counter() - t - taken
    rest = list(chunks)
    total = time.perf_counter() - t
    out.setdefault("take_s", []).append(round(taken, 4))
    out.setdefault("first_chunk_s", []).append(round(one, 4))
    out.setdefault("all_chunks_s", []).append(round(total, 4))
    out["chunks"] = 1 + len(rest)
json.dump(out, sys.stdout)
print()
