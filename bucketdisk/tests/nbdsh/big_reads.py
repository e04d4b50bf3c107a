# Reads above the 32 MiB maximum payload (advertised in NBD_INFO_BLOCK_SIZE) get EINVAL
# (the spec allows EINVAL or EOVERFLOW; bucketdisk answers EINVAL for lengths that fit in 32
# bits) and the connection lives on; exactly 32 MiB works.
LIMIT = 32 * MIB
h = connect()
check(h.get_block_size(nbd.SIZE_MAXIMUM) == LIMIT, "maximum payload is 32 MiB",
      f"got {h.get_block_size(nbd.SIZE_MAXIMUM)}")
expect_error(h, "EINVAL", "read of 32 MiB + 1", lambda: h.pread(LIMIT + 1, 0))
expect_error(h, "EINVAL", "read of 64 MiB", lambda: h.pread(2 * LIMIT, 0))
expect_error(h, "EINVAL", "read of 64 MiB with DF",
             lambda: h.pread(2 * LIMIT, 0, flags=nbd.CMD_FLAG_DF))
data = expect_ok("read of exactly 32 MiB", lambda: h.pread(LIMIT, 0))
check(data is not None and len(data) == LIMIT and not any(data), "32 MiB of zeros")
data = expect_ok("read of exactly 32 MiB with DF",
                 lambda: h.pread(LIMIT, 0, flags=nbd.CMD_FLAG_DF))
check(data is not None and len(data) == LIMIT, "32 MiB with DF")
h.shutdown()

s = connect(structured=False)
expect_error(s, "EINVAL", "read of 32 MiB + 1 with simple replies", lambda: s.pread(LIMIT + 1, 0))
check(len(s.pread(LIMIT, LIMIT)) == LIMIT, "simple read of exactly 32 MiB")
s.shutdown()
finish()
