//! Readahead: which blocks to fetch before anyone asks. Reads that continue where an earlier one
//! ended form a stream; a stream's window starts small and doubles with each read that
//! continues it, up to the configured maximum, so a long sequential reader keeps many large GETs
//! in flight while a random reader costs nothing extra. A few streams are followed at once (two
//! files copied side by side); a new stream replaces the one read least recently, and the
//! replaced stream's queued fetches are cancelled (see [`Readahead::is_current`]).

use std::sync::Mutex;

/// Streams followed at once.
const STREAMS: usize = 4;
/// A stream's first window, in bytes.
const FIRST_WINDOW_BYTES: u64 = 1 << 20;

/// Blocks to fetch: `first..first + count`, for a stream as long as it is current (`ticket`),
/// or unconditionally (`None`: a client's `NBD_CMD_CACHE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Prefetch {
    pub first: u64,
    pub count: u64,
    pub ticket: Option<Ticket>,
}

/// Names one stream's life: it stops being current when the stream is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Ticket {
    slot: usize,
    generation: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Stream {
    /// Block after the end of the stream's latest read.
    next: u64,
    /// Blocks kept in flight ahead of the reader.
    window: u64,
    /// Block after the last one already asked for.
    ahead_until: u64,
    generation: u64,
    /// When it was last read (a counter), to replace the least recent.
    used: u64,
    live: bool,
}

pub(super) struct Readahead {
    streams: Mutex<([Stream; STREAMS], u64)>,
    first_window: u64,
    max_window: u64,
    total_blocks: u64,
}

impl Readahead {
    /// Readahead of at most `max_bytes` ahead of a stream (0: none) on a disk of `total_blocks`.
    pub fn new(block_size: u64, max_bytes: u64, total_blocks: u64) -> Readahead {
        let max_window = max_bytes / block_size.max(1);
        Readahead {
            streams: Mutex::new(([Stream::default(); STREAMS], 0)),
            first_window: (FIRST_WINDOW_BYTES / block_size.max(1)).clamp(1, max_window.max(1)),
            max_window,
            total_blocks,
        }
    }

    /// Notes a read of blocks `first..end` as it arrives; returns what to fetch ahead of it.
    pub fn on_read(&self, first: u64, end: u64) -> Option<Prefetch> {
        if self.max_window == 0 || end <= first {
            return None;
        }
        let mut guard = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let (streams, clock) = &mut *guard;
        *clock += 1;
        // A read continues a stream if it starts near where the stream ended: requests of one
        // reader with several in flight reach here slightly out of order, so a few reads'
        // length (or the stream's window, once it has grown) before or after counts.
        let slack = 4 * (end - first);
        let continued = streams.iter().position(|s| {
            let slack = s.window.max(slack);
            s.live && first + slack >= s.next && first <= s.next + slack
        });
        let Some(slot) = continued else {
            let slot = (0..STREAMS)
                .min_by_key(|&i| (streams[i].live, streams[i].used))
                .unwrap_or(0);
            let stream = &mut streams[slot];
            *stream = Stream {
                next: end,
                window: 0,
                ahead_until: end,
                generation: stream.generation + 1,
                used: *clock,
                live: true,
            };
            return None;
        };
        let stream = &mut streams[slot];
        stream.used = *clock;
        stream.next = stream.next.max(end);
        stream.window = if stream.window == 0 {
            self.first_window
        } else {
            (stream.window * 2).min(self.max_window)
        };
        let next = stream.next;
        if stream.ahead_until >= next + stream.window / 2 {
            return None;
        }
        let from = stream.ahead_until.max(next);
        let until = (next + stream.window).min(self.total_blocks);
        stream.ahead_until = until.max(stream.ahead_until);
        (from < until).then_some(Prefetch {
            first: from,
            count: until - from,
            ticket: Some(Ticket {
                slot,
                generation: stream.generation,
            }),
        })
    }

    /// Whether the stream a prefetch was for is still being read (else its fetches that have
    /// not started are dropped).
    pub fn is_current(&self, ticket: Ticket) -> bool {
        let guard = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        guard.0[ticket.slot].generation == ticket.generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOCK: u64 = 64 << 10;

    #[test]
    fn a_sequential_reader_gets_a_growing_window() {
        let ra = Readahead::new(BLOCK, 64 << 20, 1 << 20);
        assert_eq!(ra.on_read(0, 16), None, "one read is not a stream yet");
        let first = ra.on_read(16, 32).expect("second read continues it");
        assert_eq!((first.first, first.count), (32, 16));
        let mut window = 16;
        let mut ahead = 48;
        for i in 2..40u64 {
            if let Some(p) = ra.on_read(i * 16, i * 16 + 16) {
                assert_eq!(
                    p.first,
                    ahead.max(i * 16 + 16),
                    "no block is asked for twice"
                );
                ahead = p.first + p.count;
                window = ahead - (i * 16 + 16);
            }
        }
        assert_eq!(window, 1024, "the window grew to the 64 MiB maximum");
    }

    #[test]
    fn reads_of_one_stream_arriving_out_of_order_stay_one_stream() {
        let ra = Readahead::new(BLOCK, 64 << 20, 1 << 20);
        ra.on_read(0, 16);
        let p = ra
            .on_read(32, 48)
            .expect("a read one request ahead continues the stream");
        let ticket = p.ticket.expect("ticket");
        for start in [16u64, 64, 48, 96, 80, 112] {
            ra.on_read(start, start + 16);
        }
        assert!(
            ra.is_current(ticket),
            "reordered requests did not start new streams"
        );
    }

    #[test]
    fn random_reads_fetch_nothing_and_a_jump_cancels_the_old_stream() {
        let ra = Readahead::new(BLOCK, 64 << 20, 1 << 20);
        for b in [5u64, 900, 77, 4000, 12, 31_000] {
            assert_eq!(ra.on_read(b, b + 1), None);
        }
        ra.on_read(100, 101);
        let p = ra.on_read(101, 102).expect("a stream");
        assert!(ra.is_current(p.ticket.expect("ticket")));
        for b in [7u64, 70_000, 9_000, 500_000] {
            ra.on_read(b, b + 1);
        }
        assert!(
            !ra.is_current(p.ticket.expect("ticket")),
            "four new streams replaced it"
        );
    }

    #[test]
    fn interleaved_streams_are_followed_apart_and_the_disk_end_bounds_them() {
        let ra = Readahead::new(BLOCK, 64 << 20, 1000);
        ra.on_read(0, 1);
        ra.on_read(990, 991);
        let a = ra.on_read(1, 2).expect("stream at 0");
        let b = ra.on_read(991, 992).expect("stream at 990");
        assert_eq!(a.first, 2);
        assert_eq!(
            (b.first, b.first + b.count),
            (992, 1000),
            "stops at the disk's end"
        );
        assert!(
            [a, b]
                .iter()
                .all(|p| ra.is_current(p.ticket.expect("ticket")))
        );
        assert_eq!(Readahead::new(BLOCK, 0, 1000).on_read(0, 1), None);
    }
}
