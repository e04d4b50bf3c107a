# A WRITE past the end gets ENOSPC; its payload is drained, so the very next request on the
# same connection (pipelined right behind it, before the error arrives) is understood.
h = connect()
size = h.get_size()
data = bytes((i * 7) & 0xFF for i in range(65536))
h.pwrite(data, 1 * MIB)

expect_error(h, "ENOSPC", "write of 64 KiB straddling the end",
             lambda: h.pwrite(b"\xee" * 65536, size - 4096))
check(h.pread(65536, 1 * MIB) == data, "read after ENOSPC returns the earlier data")

# Pipelined: the bad write (with its payload) and a read are both on the wire before either
# reply is read. If the server did not consume the payload it would parse it as requests.
bad = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"\xee" * 65536)), size - 1024)
buf = nbd.Buffer(65536)
good = h.aio_pread(buf, 1 * MIB)
while h.aio_in_flight() > 0:
    h.poll(-1)
try:
    h.aio_command_completed(bad)
    fail("pipelined write past the end", "succeeded")
except nbd.Error as e:
    check(e.errno == "ENOSPC", "pipelined write past the end: ENOSPC", f"got {e.errno}")
expect_ok("pipelined read behind it completes", lambda: h.aio_command_completed(good))
check(buf.to_bytearray() == data, "pipelined read behind the refused write returns the data")
still_usable(h, "after pipelined ENOSPC")
h.shutdown()
finish()
