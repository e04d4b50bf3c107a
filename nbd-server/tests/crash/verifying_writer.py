"""A verifying block writer for crash tests, driven by nbd-server/tests/crash_recovery.rs.

  verifying_writer.py write URI LOG SEED FIRST_SEQ BLOCKS
      Writes self-checking 4 KiB records to random blocks of the first BLOCKS blocks, one at a
      time (QD1), flushing every 8 writes and using FUA on every 5th. Before a write is sent its
      intent "w SEQ BLOCK" is appended to LOG; after a FLUSH (or the FUA write) returns,
      "ack SEQ" says that every write up to SEQ is acknowledged as durable. Runs until the
      server goes away.

  verifying_writer.py next-seq LOG
      Prints the first seq a new writer may use.

  verifying_writer.py verify URI LOG BLOCKS MODE
      Reads the blocks back and checks them against LOG. MODE "durable": every block holds the
      last write to it at or before the last ack, or a later write that was sent. MODE
      "prefix": there is one position p in the write history such that every block holds
      exactly the last write to it at or before p (the store alone after a lost local disk).
      Prints "VERIFIED" with a summary, or raises.
"""

import os
import random
import struct
import sys
import zlib

import nbd

BLOCK = 4096
MAGIC = b"BDCRASH1"


def record(block, seq):
    rng = random.Random(seq * 1_000_003 + block)
    filler = rng.randbytes(BLOCK - 28)
    body = MAGIC + struct.pack("<QQ", block, seq) + filler
    return body + struct.pack("<I", zlib.crc32(body))


def parse(data, block):
    """The seq of the record in `data`, 0 for zeros; raises on anything else."""
    if data == bytes(BLOCK):
        return 0
    body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
    if body[:8] != MAGIC or zlib.crc32(body) != crc:
        raise AssertionError(f"block {block}: neither zeros nor a valid record")
    got_block, seq = struct.unpack("<QQ", body[8:24])
    if got_block != block:
        raise AssertionError(f"block {block} holds the record of block {got_block}")
    return seq


def write(uri, log_path, seed, first_seq, blocks):
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    log = open(log_path, "a", buffering=1)
    seq = first_seq
    log.write(f"start {seq}\n")
    log.flush()
    try:
        while True:
            block = rng.randrange(blocks)
            log.write(f"w {seq} {block}\n")
            log.flush()
            fua = seq % 5 == 0
            h.pwrite(record(block, seq), block * BLOCK, nbd.CMD_FLAG_FUA if fua else 0)
            if fua:
                log.write(f"fua {seq}\n")
            if seq % 8 == 0:
                h.flush()
                log.write(f"ack {seq}\n")
            log.flush()
            seq += 1
    except nbd.Error:
        pass  # the server was killed


def load(log_path):
    """Writes as (seq, block, acknowledged), oldest first.

    A FLUSH acknowledges the writes of its own session (one writer process) sent before it; a
    FUA write acknowledges itself. "truncate P" (written by a prefix verification after a lost
    local disk) drops the writes after P that existed then: that history is gone for good.
    """
    writes, fua = [], set()
    session_start, acked_in_session = 1, {}
    for line in open(log_path):
        parts = line.split()
        if len(parts) < 2 or not all(p.isdigit() for p in parts[1:]):
            continue  # a line torn by the kill
        kind, seq = parts[0], int(parts[1])
        if kind == "start":
            session_start = seq
        elif kind == "w" and len(parts) == 3:
            writes.append([seq, int(parts[2]), session_start])
        elif kind == "ack":
            acked_in_session[session_start] = max(acked_in_session.get(session_start, 0), seq)
        elif kind == "fua":
            fua.add(seq)
        elif kind == "truncate":
            writes = [w for w in writes if w[0] <= seq]
    out = []
    for seq, block, session in writes:
        acked = seq <= acked_in_session.get(session, 0) or seq in fua
        out.append((seq, block, acked))
    return out


def verify(uri, log_path, blocks, mode):
    writes = load(log_path)
    h = nbd.NBD()
    h.connect_uri(uri)
    seen = {b: parse(h.pread(BLOCK, b * BLOCK), b) for b in range(blocks)}
    h.shutdown()
    sent = {}
    for seq, block, acked in writes:
        sent.setdefault(block, []).append((seq, acked))
    for b, seq in seen.items():
        if seq and seq not in [s for s, _ in sent.get(b, [])]:
            raise AssertionError(f"block {b} holds seq {seq}, which was never written there")
    if mode == "durable":
        for b, history in sent.items():
            durable = [s for s, acked in history if acked]
            if durable and seen[b] < durable[-1]:
                raise AssertionError(
                    f"block {b}: acknowledged write {durable[-1]} lost (found {seen[b]})"
                )
        p = max(seen.values())
    else:
        # One position p such that every block holds the last write at or before p. A write
        # never acknowledged may never have reached the server, so a block may also hold what
        # was there before it.
        p = max(seen.values())
        for b in range(blocks):
            before = [(s, acked) for s, acked in sent.get(b, []) if s <= p]
            allowed = set()
            for s, acked in reversed(before):
                allowed.add(s)
                if acked:
                    break
            else:
                allowed.add(0)
            if seen[b] not in allowed:
                raise AssertionError(
                    f"not a prefix: block {b} holds {seen[b]}, but the history up to {p} "
                    f"allows only {sorted(allowed)}"
                )
        with open(log_path, "a") as log:
            log.write(f"truncate {p}\n")
    acked = sum(1 for _, _, a in writes if a)
    print(f"VERIFIED writes={len(writes)} acknowledged={acked} position={p}")


def next_seq(log_path):
    """The first seq a new writer may use: after every seq the log mentions."""
    if not os.path.exists(log_path):
        return 1
    seqs = []
    for line in open(log_path):
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("w", "start") and parts[1].isdigit():
            seqs.append(int(parts[1]))
    return max(seqs, default=0) + 1


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "write":
        write(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    elif cmd == "next-seq":
        print(next_seq(sys.argv[2]))
    elif cmd == "verify":
        verify(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        sys.exit(f"unknown command {cmd}")
