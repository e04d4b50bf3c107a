# Commands and flags the server did not advertise get EINVAL and the connection lives on.
h = connect()  # structured replies, but no meta context
check(h.get_structured_replies_negotiated(), "structured replies negotiated")
check(not h.can_meta_context("base:allocation"), "no meta context negotiated")
expect_error(h, "EINVAL", "block_status without a negotiated meta context",
             lambda: h.block_status(4096, 0, lambda *args: 0))
h.shutdown()

s = connect(structured=False, meta="base:allocation")  # simple replies: no DF, no contexts
check(not s.get_structured_replies_negotiated(), "simple replies only")
check(not s.can_df(), "DF not advertised without structured replies")
expect_error(s, "EINVAL", "read with DF without structured replies",
             lambda: s.pread(4096, 0, flags=nbd.CMD_FLAG_DF))
expect_error(s, "EINVAL", "block_status without structured replies",
             lambda: s.block_status(4096, 0, lambda *args: 0))
s.shutdown()
finish()
