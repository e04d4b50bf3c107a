# WRITE_ZEROES with FAST_ZERO either zeroes the range or fails fast with ENOTSUP (the spec's two
# allowed answers); NO_HOLE and FUA zeroing work.
h = connect()
check(h.can_zero(), "write_zeroes advertised")
check(h.can_fast_zero(), "fast zero advertised")
pattern = b"\xc3" * (256 * 1024)
h.pwrite(pattern, 0)
try:
    h.zero(len(pattern), 0, flags=nbd.CMD_FLAG_FAST_ZERO)
    check(h.pread(len(pattern), 0) == bytes(len(pattern)), "FAST_ZERO zeroed the range")
except nbd.Error as e:
    check(e.errno == "ENOTSUP", "FAST_ZERO refused with ENOTSUP", f"got {e.errno}: {e.string}")
    check(h.pread(len(pattern), 0) == pattern, "refused FAST_ZERO left the data alone")
still_usable(h, "after FAST_ZERO")

h.pwrite(pattern, 1 * MIB)
expect_ok("zero with NO_HOLE", lambda: h.zero(65536, 1 * MIB, flags=nbd.CMD_FLAG_NO_HOLE))
expect_ok("zero with FUA", lambda: h.zero(65536, 1 * MIB + 65536, flags=nbd.CMD_FLAG_FUA))
expect_ok("unaligned zero", lambda: h.zero(1000, 1 * MIB + 131072 + 17))
got = h.pread(len(pattern), 1 * MIB)
want = bytearray(pattern)
want[0:131072] = bytes(131072)
want[131072 + 17:131072 + 1017] = bytes(1000)
check(got == bytes(want), "zeroed ranges read as zeros, the rest is intact")
h.shutdown()
finish()
