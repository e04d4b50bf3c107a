# A flag not documented for a command gets EINVAL (proto.md: "The server SHOULD return
# NBD_EINVAL if it receives ... a request with a flag not explicitly documented as applicable to
# the given request"), the request has no effect, and the connection lives on.
h = connect(meta="base:allocation")
check(h.get_structured_replies_negotiated(), "structured replies negotiated")
FUA, NO_HOLE, DF = nbd.CMD_FLAG_FUA, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_FLAG_DF
REQ_ONE, FAST_ZERO = nbd.CMD_FLAG_REQ_ONE, nbd.CMD_FLAG_FAST_ZERO
UNKNOWN = 1 << 9  # no command defines bit 9

before = bytes([0x5A]) * 4096
h.pwrite(before, 0)


def bs(flags):
    return lambda: h.block_status(4096, 0, lambda *args: 0, flags=flags)


for name, flag in [("FUA", FUA), ("NO_HOLE", NO_HOLE), ("REQ_ONE", REQ_ONE),
                   ("FAST_ZERO", FAST_ZERO), ("bit 9", UNKNOWN)]:
    expect_error(h, "EINVAL", f"read with {name}", lambda: h.pread(4096, 0, flags=flag))
for name, flag in [("NO_HOLE", NO_HOLE), ("DF", DF), ("REQ_ONE", REQ_ONE),
                   ("FAST_ZERO", FAST_ZERO), ("bit 9", UNKNOWN)]:
    expect_error(h, "EINVAL", f"write with {name}",
                 lambda: h.pwrite(b"\xff" * 4096, 0, flags=flag))
for name, flag in [("FUA", FUA), ("NO_HOLE", NO_HOLE), ("bit 9", UNKNOWN)]:
    expect_error(h, "EINVAL", f"flush with {name}", lambda: h.flush(flags=flag))
for name, flag in [("NO_HOLE", NO_HOLE), ("DF", DF), ("FAST_ZERO", FAST_ZERO)]:
    expect_error(h, "EINVAL", f"trim with {name}", lambda: h.trim(4096, 0, flags=flag))
for name, flag in [("DF", DF), ("REQ_ONE", REQ_ONE), ("bit 9", UNKNOWN)]:
    expect_error(h, "EINVAL", f"write_zeroes with {name}", lambda: h.zero(4096, 0, flags=flag))
for name, flag in [("FUA", FUA), ("DF", DF)]:
    expect_error(h, "EINVAL", f"cache with {name}", lambda: h.cache(4096, 0, flags=flag))
for name, flag in [("FUA", FUA), ("NO_HOLE", NO_HOLE), ("DF", DF), ("bit 9", UNKNOWN)]:
    expect_error(h, "EINVAL", f"block_status with {name}", bs(flag))

check(h.pread(4096, 0) == before, "refused writes/trims/zeroes did not change the data")
# The documented flags still work.
expect_ok("read with DF", lambda: h.pread(4096, 0, flags=DF))
expect_ok("write with FUA", lambda: h.pwrite(before, 0, flags=FUA))
expect_ok("block_status with REQ_ONE", bs(REQ_ONE))
h.shutdown()
finish()
