# Zero-length requests: the spec leaves the result unspecified but says the server SHOULD NOT
# disconnect; bucketdisk's policy is EINVAL for each of them.
h = connect(meta="base:allocation")
size = h.get_size()
expect_error(h, "EINVAL", "zero-length read", lambda: h.pread(0, 0))
expect_error(h, "EINVAL", "zero-length read at the end", lambda: h.pread(0, size))
expect_error(h, "EINVAL", "zero-length write", lambda: h.pwrite(b"", 4096))
expect_error(h, "EINVAL", "zero-length trim", lambda: h.trim(0, 0))
expect_error(h, "EINVAL", "zero-length write_zeroes", lambda: h.zero(0, 0))
expect_error(h, "EINVAL", "zero-length cache", lambda: h.cache(0, 0))
expect_error(h, "EINVAL", "zero-length block_status",
             lambda: h.block_status(0, 0, lambda *args: 0))
h.shutdown()

s = connect(structured=False)
expect_error(s, "EINVAL", "zero-length read with simple replies", lambda: s.pread(0, 0))
expect_error(s, "EINVAL", "zero-length write with simple replies", lambda: s.pwrite(b"", 0))
s.shutdown()
finish()
