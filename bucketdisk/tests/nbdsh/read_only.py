# On a read-only export, WRITE, TRIM and WRITE_ZEROES get EPERM (proto.md "Error values":
# "SHOULD return NBD_EPERM if it receives a write or trim request on a read-only export";
# NBD_CMD_WRITE_ZEROES: "return NBD_EPERM ... on a read-only export"); FLUSH, not advertised,
# gets EINVAL; reads, cache and block status still work.
h = connect(meta="base:allocation")
check(h.is_read_only(), "export is read-only")
expect_error(h, "EPERM", "write on a read-only export", lambda: h.pwrite(b"\x11" * 4096, 0))
expect_error(h, "EPERM", "trim on a read-only export", lambda: h.trim(4096, 0))
expect_error(h, "EPERM", "write_zeroes on a read-only export", lambda: h.zero(4096, 0))
expect_error(h, "EPERM", "write_zeroes NO_HOLE on a read-only export",
             lambda: h.zero(4096, 0, flags=nbd.CMD_FLAG_NO_HOLE))
# EPERM wins over flag checks: FUA and FAST_ZERO are not advertised here either.
expect_error(h, "EPERM", "FUA write on a read-only export",
             lambda: h.pwrite(b"\x11" * 4096, 0, flags=nbd.CMD_FLAG_FUA))
expect_error(h, "EPERM", "FAST_ZERO write_zeroes on a read-only export",
             lambda: h.zero(4096, 0, flags=nbd.CMD_FLAG_FAST_ZERO))
expect_error(h, "EPERM", "bulk write on a read-only export",
             lambda: h.pwrite(b"\x11" * (1 * MIB), 4096))
check(not h.can_flush(), "flush is not advertised on a read-only export")
expect_error(h, "EINVAL", "flush (not advertised) on a read-only export", lambda: h.flush())
check(h.pread(4096, 0) == bytes(4096), "the export still reads as zeros")
expect_ok("cache on a read-only export", lambda: h.cache(4096, 0))
expect_ok("block_status on a read-only export",
          lambda: h.block_status(4096, 0, lambda *args: 0))
h.shutdown()
finish()
