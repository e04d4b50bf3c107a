# Requests reaching past the end of the export: EINVAL for read/trim/cache/block_status,
# ENOSPC for write/write_zeroes (proto.md "Error values"), and the connection lives on.
h = connect(meta="base:allocation")
size = h.get_size()
check(h.can_meta_context("base:allocation"), "base:allocation negotiated")
END64 = 1 << 64

# Known data just below the end, to prove refused writes change nothing.
tail = bytes(range(256)) * 16
h.pwrite(tail, size - 4096)


def bs(offset, length):
    return lambda: h.block_status(length, offset, lambda *args: 0)


expect_error(h, "EINVAL", "read straddling the end", lambda: h.pread(4096, size - 2048))
expect_error(h, "EINVAL", "read starting at the end", lambda: h.pread(512, size))
expect_error(h, "EINVAL", "read far beyond the end", lambda: h.pread(512, size * 4))
expect_error(h, "EINVAL", "read whose offset+length wraps 2^64",
             lambda: h.pread(4096, END64 - 2048))
expect_error(h, "ENOSPC", "write straddling the end",
             lambda: h.pwrite(b"\xaa" * 4096, size - 2048))
expect_error(h, "ENOSPC", "write beyond the end", lambda: h.pwrite(b"\xaa" * 512, size + 4096))
expect_error(h, "ENOSPC", "write whose offset+length wraps 2^64",
             lambda: h.pwrite(b"\xaa" * 512, END64 - 256))
expect_error(h, "EINVAL", "trim straddling the end", lambda: h.trim(4096, size - 2048))
expect_error(h, "EINVAL", "trim whose offset+length wraps 2^64", lambda: h.trim(4096, END64 - 2048))
expect_error(h, "ENOSPC", "write_zeroes straddling the end", lambda: h.zero(4096, size - 2048))
expect_error(h, "ENOSPC", "write_zeroes whose offset+length wraps 2^64",
             lambda: h.zero(4096, END64 - 2048))
expect_error(h, "EINVAL", "cache straddling the end", lambda: h.cache(4096, size - 2048))
expect_error(h, "EINVAL", "cache beyond the end", lambda: h.cache(4096, size + 4096))
expect_error(h, "EINVAL", "block_status straddling the end", bs(size - 2048, 4096))
expect_error(h, "EINVAL", "block_status beyond the end", bs(size + 4096, 4096))

check(h.pread(4096, size - 4096) == tail, "refused writes/zeroes/trims left the tail intact")
# The last byte of the export is still addressable.
expect_ok("write the last sector", lambda: h.pwrite(b"\x55" * 512, size - 512))
check(h.pread(512, size - 512) == b"\x55" * 512, "read the last sector back")
h.shutdown()
finish()
