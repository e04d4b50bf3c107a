# Helpers shared by the nbdsh scripts: nbdsh_errors.rs runs
#   nbdsh -n -c 'exec(open(prelude.py).read())' -c 'exec(open(<script>).read())'
# so everything defined here is visible to the script.
#
# Every check records a failure instead of stopping, so one run reports every wrong answer;
# finish() raises if any check failed, which makes nbdsh exit non-zero and the Rust test fail.
import os

import nbd

URI = os.environ["NBD_URI"]
MIB = 1 << 20
failures = []


def connect(uri=URI, structured=True, meta=None):
    """A connected handle with strict mode off, so libnbd sends bad requests to the server
    instead of refusing them itself."""
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.set_request_structured_replies(structured)
    if meta:
        h.add_meta_context(meta)
    h.connect_uri(uri)
    return h


def fail(what, why):
    print(f"FAIL {what}: {why}")
    failures.append(f"{what}: {why}")


def still_usable(h, what):
    """A good request on the same handle must work after a refused one."""
    try:
        if not h.aio_is_ready():
            fail(what, "the connection is gone after the refused request")
            return
        data = h.pread(4096, 0)
        if len(data) != 4096:
            fail(what, f"follow-up read returned {len(data)} bytes")
    except nbd.Error as e:
        fail(what, f"follow-up read on the same handle failed: {e.string}")


def expect_error(h, errno, what, fn):
    """fn() must fail with `errno` (libnbd's symbolic name, e.g. "EINVAL") *as reported by the
    server*, and the connection must survive it."""
    try:
        fn()
    except nbd.Error as e:
        if e.errno != errno:
            fail(what, f"expected {errno}, got {e.errno}: {e.string}")
        elif "command failed" not in (e.string or ""):
            # libnbd refused the request itself: the server was never asked.
            fail(what, f"libnbd refused it client-side, the server was not asked: {e.string}")
        else:
            print(f"ok   {what}: {errno}")
    else:
        fail(what, f"expected {errno}, but the request succeeded")
    still_usable(h, what)


def expect_ok(what, fn):
    try:
        result = fn()
        print(f"ok   {what}")
        return result
    except nbd.Error as e:
        fail(what, f"unexpected error {e.errno}: {e.string}")
        return None


def check(cond, what, why="check failed"):
    if cond:
        print(f"ok   {what}")
    else:
        fail(what, why)


def finish():
    if failures:
        raise AssertionError(f"{len(failures)} check(s) failed:\n  " + "\n  ".join(failures))
    print("ALL CHECKS PASSED")
