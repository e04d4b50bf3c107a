//! NBD wire constants and message encoding (fixed newstyle, structured replies, extended
//! headers). Pure: no I/O, so every encoder is unit-tested byte for byte.
//!
//! Reference: the NBD protocol document (doc/proto.md in the NetworkBlockDevice project,
//! including the extended-headers extension).

use bytes::{BufMut, Bytes, BytesMut};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;
pub const KNOWN_CLIENT_FLAGS: u32 = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR | 10;

// Info types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Structured reply flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

// base:allocation status bits.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

pub const META_CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// The id we hand out for `base:allocation` (opaque to clients; must be stable per connection).
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Error numbers on the wire (fixed by the protocol, independent of the host's errno values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum NbdError {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

/// A transmission-phase request header, decoded from either the compact or extended form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    /// Payload length when the request carries one, otherwise the effect length.
    pub length: u64,
}

pub const COMPACT_REQUEST_LEN: usize = 28;
pub const EXTENDED_REQUEST_LEN: usize = 32;

/// Decodes a request header. Returns `None` when the magic is wrong: framing is lost.
pub fn decode_request(buf: &[u8], extended: bool) -> Option<RequestHeader> {
    let be32 = |i: usize| u32::from_be_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    let be16 = |i: usize| u16::from_be_bytes([buf[i], buf[i + 1]]);
    let be64 = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[i..i + 8]);
        u64::from_be_bytes(b)
    };
    let (magic, len) = if extended {
        (EXTENDED_REQUEST_MAGIC, EXTENDED_REQUEST_LEN)
    } else {
        (REQUEST_MAGIC, COMPACT_REQUEST_LEN)
    };
    if buf.len() < len || be32(0) != magic {
        return None;
    }
    Some(RequestHeader {
        flags: be16(4),
        command: be16(6),
        cookie: be64(8),
        offset: be64(16),
        length: if extended {
            be64(24)
        } else {
            u64::from(be32(24))
        },
    })
}

/// Encodes one option reply (handshake phase).
pub fn option_reply(option: u32, reply_type: u32, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(20 + payload.len());
    b.put_u64(OPTION_REPLY_MAGIC);
    b.put_u32(option);
    b.put_u32(reply_type);
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b.freeze()
}

/// Which reply headers the connection negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    Simple,
    Structured,
    Extended,
}

/// Encodes a simple reply header (data, if any, follows it).
pub fn simple_reply(error: u32, cookie: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(16);
    b.put_u32(SIMPLE_REPLY_MAGIC);
    b.put_u32(error);
    b.put_u64(cookie);
    b.freeze()
}

/// Encodes a structured or extended reply chunk header; `payload_len` bytes follow it.
/// `request_offset` is only sent in the extended form, which echoes the request's offset.
pub fn chunk_header(
    mode: ReplyMode,
    flags: u16,
    reply_type: u16,
    cookie: u64,
    request_offset: u64,
    payload_len: u64,
) -> BytesMut {
    let mut b = BytesMut::with_capacity(32);
    if mode == ReplyMode::Extended {
        b.put_u32(EXTENDED_REPLY_MAGIC);
        b.put_u16(flags);
        b.put_u16(reply_type);
        b.put_u64(cookie);
        b.put_u64(request_offset);
        b.put_u64(payload_len);
    } else {
        b.put_u32(STRUCTURED_REPLY_MAGIC);
        b.put_u16(flags);
        b.put_u16(reply_type);
        b.put_u64(cookie);
        b.put_u32(payload_len as u32);
    }
    b
}

/// Error chunk payload: error number, message length, message (truncated to the spec's 4096).
pub fn error_payload(error: NbdError, message: &str) -> Bytes {
    let msg = truncate_utf8(message, 4096);
    let mut b = BytesMut::with_capacity(6 + msg.len());
    b.put_u32(error as u32);
    b.put_u16(msg.len() as u16);
    b.put_slice(msg.as_bytes());
    b.freeze()
}

/// Cuts a string to at most `max` bytes on a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub fn command_name(command: u16) -> &'static str {
    match command {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_compact_and_extended_requests() {
        let mut b = BytesMut::new();
        b.put_u32(REQUEST_MAGIC);
        b.put_u16(CMD_FLAG_FUA);
        b.put_u16(CMD_WRITE);
        b.put_u64(0x1122_3344_5566_7788);
        b.put_u64(4096);
        b.put_u32(512);
        let h = decode_request(&b, false).expect("valid");
        assert_eq!(
            h,
            RequestHeader {
                flags: CMD_FLAG_FUA,
                command: CMD_WRITE,
                cookie: 0x1122_3344_5566_7788,
                offset: 4096,
                length: 512
            }
        );
        assert!(
            decode_request(&b, true).is_none(),
            "compact magic in extended mode"
        );

        let mut e = BytesMut::new();
        e.put_u32(EXTENDED_REQUEST_MAGIC);
        e.put_u16(0);
        e.put_u16(CMD_TRIM);
        e.put_u64(7);
        e.put_u64(0);
        e.put_u64(100 << 30);
        let h = decode_request(&e, true).expect("valid");
        assert_eq!(h.length, 100 << 30);
        assert!(decode_request(&e, false).is_none());
    }

    #[test]
    fn encodes_reply_headers() {
        assert_eq!(
            simple_reply(22, 9).to_vec(),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 9]
        );
        let s = chunk_header(ReplyMode::Structured, REPLY_FLAG_DONE, 1, 5, 0, 12);
        assert_eq!(s.len(), 20);
        assert_eq!(&s[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&s[16..20], &12u32.to_be_bytes());
        let x = chunk_header(ReplyMode::Extended, REPLY_FLAG_DONE, 1, 5, 4096, 12);
        assert_eq!(x.len(), 32);
        assert_eq!(&x[16..24], &4096u64.to_be_bytes());
        assert_eq!(&x[24..32], &12u64.to_be_bytes());
        let o = option_reply(OPT_GO, REP_ACK, &[]);
        assert_eq!(o.len(), 20);
        assert_eq!(&o[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
    }

    #[test]
    fn error_messages_are_bounded() {
        let long = "é".repeat(5000);
        let p = error_payload(NbdError::Io, &long);
        let len = u16::from_be_bytes([p[4], p[5]]) as usize;
        assert!(len <= 4096);
        assert_eq!(p.len(), 6 + len);
        assert!(std::str::from_utf8(&p[6..]).is_ok());
    }
}
