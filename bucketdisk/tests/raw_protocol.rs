//! The NBD wire protocol spoken by hand over raw TCP sockets: handshake edge cases, framing
//! errors, extended headers, pipelining, reply formats, and a seeded garbage fuzzer.
//!
//! Reference: NBD doc/proto.md, extended-headers branch. Policy checked here: a bad request gets
//! an error and the connection lives on; only lost framing (bad magic, oversized payloads or
//! option lengths, unknown client flags) closes it; nothing a client sends stops the server.

mod common;
use common::*;
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const CLIENT_FIXED_NEWSTYLE: u32 = 1;
const CLIENT_NO_ZEROES: u32 = 2;

const TFLAG_HAS_FLAGS: u16 = 1;
const TFLAG_SEND_DF: u16 = 1 << 7;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;
const OPT_EXTENDED_HEADERS: u32 = 11;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const REP_ERR_POLICY: u32 = (1 << 31) | 2;
const REP_ERR_INVALID: u32 = (1 << 31) | 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
const REP_ERR_TOO_BIG: u32 = (1 << 31) | 9;

const INFO_EXPORT: u16 = 0;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_CACHE: u16 = 5;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;

const CMD_FLAG_FUA: u16 = 1;
const CMD_FLAG_DF: u16 = 1 << 2;
const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;

const STATE_HOLE: u64 = 1;
const STATE_ZERO: u64 = 2;

const TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Byte helpers

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

fn port(server: &Server) -> u16 {
    match server.endpoint {
        Endpoint::Tcp(port) => port,
        Endpoint::Unix(_) => panic!("raw protocol tests use TCP"),
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn open(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to bucketdisk");
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("reading {n} bytes from the server: {e}"));
    buf
}

/// The server must close the connection (EOF or reset) without sending anything more.
fn expect_closed(s: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 4096];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!(
            "{what}: expected the server to close the connection, got {n} more bytes: {:02x?}",
            &buf[..n.min(64)]
        ),
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {}
        Err(e) => panic!("{what}: expected the server to close the connection, got {e}"),
    }
}

/// Reads the greeting: NBDMAGIC, IHAVEOPT, handshake flags.
fn greet(port: u16) -> TcpStream {
    let mut s = open(port);
    let mut g = [0u8; 18];
    s.read_exact(&mut g)
        .unwrap_or_else(|e| panic!("reading the greeting from 127.0.0.1:{port}: {e}"));
    assert_eq!(be64(&g[0..]), NBDMAGIC, "greeting magic");
    assert_eq!(be64(&g[8..]), IHAVEOPT, "greeting IHAVEOPT");
    let flags = be16(&g[16..]);
    assert!(
        flags & FLAG_FIXED_NEWSTYLE != 0,
        "server must offer fixed newstyle"
    );
    assert!(flags & FLAG_NO_ZEROES != 0, "server offers NO_ZEROES");
    s
}

/// Greeting plus client flags: ready for options.
fn haggle(port: u16) -> TcpStream {
    let mut s = greet(port);
    s.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
        .unwrap();
    s
}

fn option_bytes(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

fn send_option(s: &mut TcpStream, option: u32, data: &[u8]) {
    s.write_all(&option_bytes(option, data))
        .expect("send option");
}

#[derive(Debug)]
struct OptReply {
    option: u32,
    kind: u32,
    data: Vec<u8>,
}

fn read_option_reply(s: &mut TcpStream) -> OptReply {
    let h = read_n(s, 20);
    assert_eq!(be64(&h), OPTION_REPLY_MAGIC, "option reply magic");
    let len = be32(&h[16..]) as usize;
    assert!(len <= 64 * 1024, "absurd option reply length {len}");
    OptReply {
        option: be32(&h[8..]),
        kind: be32(&h[12..]),
        data: read_n(s, len),
    }
}

/// Sends an option and expects a single reply of type `kind` for that option.
fn option_expect(s: &mut TcpStream, option: u32, data: &[u8], kind: u32, what: &str) {
    send_option(s, option, data);
    let r = read_option_reply(s);
    assert_eq!(r.option, option, "{what}: reply names the wrong option");
    assert_eq!(
        r.kind,
        kind,
        "{what}: expected reply type {kind:#x}, got {:#x} ({})",
        r.kind,
        String::from_utf8_lossy(&r.data)
    );
}

fn name_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

/// NBD_OPT_GO/INFO data: export name, no info requests.
fn go_data(name: &str) -> Vec<u8> {
    let mut d = name_data(name);
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// NBD_OPT_{LIST,SET}_META_CONTEXT data.
fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = name_data(export);
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&name_data(q));
    }
    d
}

/// Sends NBD_OPT_GO (or INFO) and reads to the ACK. Returns (size, transmission flags).
fn go(s: &mut TcpStream, option: u32, name: &str) -> (u64, u16) {
    send_option(s, option, &go_data(name));
    let mut export = None;
    loop {
        let r = read_option_reply(s);
        assert_eq!(r.option, option, "GO reply names the wrong option");
        match r.kind {
            REP_INFO => {
                if be16(&r.data) == INFO_EXPORT {
                    assert_eq!(r.data.len(), 12, "NBD_INFO_EXPORT length");
                    export = Some((be64(&r.data[2..]), be16(&r.data[10..])));
                }
            }
            REP_ACK => break,
            other => panic!(
                "GO {name:?}: unexpected reply {other:#x}: {}",
                String::from_utf8_lossy(&r.data)
            ),
        }
    }
    let (size, flags) = export.expect("NBD_INFO_EXPORT before the ACK");
    assert!(flags & TFLAG_HAS_FLAGS != 0);
    (size, flags)
}

/// Selects base:allocation; returns its context id.
fn set_base_allocation(s: &mut TcpStream) -> u32 {
    send_option(
        s,
        OPT_SET_META_CONTEXT,
        &meta_data("", &["base:allocation"]),
    );
    let r = read_option_reply(s);
    assert_eq!(r.kind, REP_META_CONTEXT, "base:allocation offered");
    assert_eq!(&r.data[4..], b"base:allocation");
    let id = be32(&r.data);
    let ack = read_option_reply(s);
    assert_eq!(ack.kind, REP_ACK);
    id
}

// ---------------------------------------------------------------------------------------------
// Transmission client

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Simple,
    Structured,
    Extended,
}

#[derive(Debug, Clone)]
struct Chunk {
    magic: u32,
    flags: u16,
    kind: u16,
    cookie: u64,
    /// Extended replies echo the request offset in their header.
    header_offset: Option<u64>,
    payload: Vec<u8>,
}

#[derive(Debug, Default)]
struct Response {
    cookie: u64,
    /// 0 for success, otherwise the NBD error number.
    error: u32,
    /// Read data, reassembled from content chunks (holes filled with zeros).
    data: Vec<u8>,
    /// Structured chunks (empty for a simple reply).
    chunks: Vec<Chunk>,
    simple: bool,
}

#[derive(Clone, Copy)]
struct Pending {
    command: u16,
    offset: u64,
    length: u64,
}

struct Client {
    s: TcpStream,
    mode: Mode,
    size: u64,
    tflags: u16,
    meta_id: Option<u32>,
    next_cookie: u64,
    pending: HashMap<u64, Pending>,
    partial: HashMap<u64, Vec<Chunk>>,
}

fn encode_request(
    mode: Mode,
    flags: u16,
    command: u16,
    cookie: u64,
    offset: u64,
    length: u64,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(32);
    if mode == Mode::Extended {
        b.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
    } else {
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    }
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&command.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    if mode == Mode::Extended {
        b.extend_from_slice(&length.to_be_bytes());
    } else {
        b.extend_from_slice(&(length as u32).to_be_bytes());
    }
    b
}

impl Client {
    /// Full handshake: optional structured replies / extended headers, optional
    /// base:allocation, then NBD_OPT_GO on the default export.
    fn connect(port: u16, mode: Mode, meta: bool) -> Client {
        let mut s = haggle(port);
        match mode {
            Mode::Simple => {}
            Mode::Structured => {
                option_expect(&mut s, OPT_STRUCTURED_REPLY, &[], REP_ACK, "structured")
            }
            Mode::Extended => option_expect(&mut s, OPT_EXTENDED_HEADERS, &[], REP_ACK, "extended"),
        }
        let meta_id = meta.then(|| set_base_allocation(&mut s));
        let (size, tflags) = go(&mut s, OPT_GO, "");
        Client::from_stream(s, mode, size, tflags, meta_id)
    }

    fn from_stream(
        s: TcpStream,
        mode: Mode,
        size: u64,
        tflags: u16,
        meta_id: Option<u32>,
    ) -> Client {
        Client {
            s,
            mode,
            size,
            tflags,
            meta_id,
            next_cookie: 0x1000,
            pending: HashMap::new(),
            partial: HashMap::new(),
        }
    }

    /// Encodes a request (header plus payload) and records it as pending; does not send it.
    /// Extended writes carry NBD_CMD_FLAG_PAYLOAD_LEN as the spec requires.
    fn prepare(
        &mut self,
        flags: u16,
        command: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> (u64, Vec<u8>) {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let flags = if self.mode == Mode::Extended && command == CMD_WRITE {
            flags | CMD_FLAG_PAYLOAD_LEN
        } else {
            flags
        };
        let mut b = encode_request(self.mode, flags, command, cookie, offset, length);
        b.extend_from_slice(payload);
        if command != CMD_DISC {
            self.pending.insert(
                cookie,
                Pending {
                    command,
                    offset,
                    length,
                },
            );
        }
        (cookie, b)
    }

    fn send(&mut self, flags: u16, command: u16, offset: u64, length: u64, payload: &[u8]) -> u64 {
        let (cookie, bytes) = self.prepare(flags, command, offset, length, payload);
        self.s.write_all(&bytes).expect("send request");
        cookie
    }

    /// Sends one request and waits for its reply.
    fn call(
        &mut self,
        flags: u16,
        command: u16,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Response {
        let cookie = self.send(flags, command, offset, length, payload);
        let r = self.recv();
        assert_eq!(r.cookie, cookie, "reply for an unexpected cookie");
        r
    }

    fn read(&mut self, offset: u64, length: u64) -> Vec<u8> {
        let r = self.call(0, CMD_READ, offset, length, &[]);
        assert_eq!(r.error, 0, "READ {offset}+{length} failed");
        r.data
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let r = self.call(0, CMD_WRITE, offset, data.len() as u64, data);
        assert_eq!(r.error, 0, "WRITE {offset}+{} failed", data.len());
    }

    /// Reads until one request's reply is complete (a simple reply, or a chunk with DONE).
    fn recv(&mut self) -> Response {
        loop {
            let magic = be32(&read_n(&mut self.s, 4));
            match magic {
                SIMPLE_REPLY_MAGIC => {
                    let h = read_n(&mut self.s, 12);
                    let error = be32(&h);
                    let cookie = be64(&h[4..]);
                    let p = self
                        .pending
                        .remove(&cookie)
                        .unwrap_or_else(|| panic!("simple reply for unknown cookie {cookie:#x}"));
                    assert_ne!(
                        self.mode,
                        Mode::Extended,
                        "simple reply after extended headers were negotiated"
                    );
                    let data = if error == 0 && p.command == CMD_READ {
                        assert_eq!(self.mode, Mode::Simple, "simple reply to a structured READ");
                        read_n(&mut self.s, p.length as usize)
                    } else {
                        Vec::new()
                    };
                    return Response {
                        cookie,
                        error,
                        data,
                        chunks: Vec::new(),
                        simple: true,
                    };
                }
                STRUCTURED_REPLY_MAGIC | EXTENDED_REPLY_MAGIC => {
                    let extended = magic == EXTENDED_REPLY_MAGIC;
                    assert_eq!(
                        extended,
                        self.mode == Mode::Extended,
                        "reply magic {magic:#x} does not match the negotiated mode {:?}",
                        self.mode
                    );
                    assert_ne!(
                        self.mode,
                        Mode::Simple,
                        "structured reply without negotiation"
                    );
                    let h = read_n(&mut self.s, if extended { 28 } else { 16 });
                    let flags = be16(&h);
                    let kind = be16(&h[2..]);
                    let cookie = be64(&h[4..]);
                    let (header_offset, len) = if extended {
                        (Some(be64(&h[12..])), be64(&h[20..]))
                    } else {
                        (None, u64::from(be32(&h[12..])))
                    };
                    assert!(len <= 64 << 20, "absurd chunk length {len}");
                    let payload = read_n(&mut self.s, len as usize);
                    let chunk = Chunk {
                        magic,
                        flags,
                        kind,
                        cookie,
                        header_offset,
                        payload,
                    };
                    assert!(
                        self.pending.contains_key(&cookie),
                        "chunk for unknown cookie {cookie:#x}: {chunk:?}"
                    );
                    let done = flags & REPLY_FLAG_DONE != 0;
                    self.partial.entry(cookie).or_default().push(chunk);
                    if done {
                        let chunks = self.partial.remove(&cookie).unwrap();
                        let p = self.pending.remove(&cookie).unwrap();
                        return assemble(cookie, p, chunks);
                    }
                }
                other => panic!("bad reply magic {other:#x}"),
            }
        }
    }
}

/// Checks a structured reply's chunks and turns them into a response.
fn assemble(cookie: u64, p: Pending, chunks: Vec<Chunk>) -> Response {
    let mut r = Response {
        cookie,
        ..Response::default()
    };
    let mut covered = 0u64;
    if p.command == CMD_READ {
        r.data = vec![0u8; p.length as usize];
    }
    for c in &chunks {
        assert_eq!(c.cookie, cookie, "chunk filed under the wrong cookie");
        if let Some(off) = c.header_offset {
            assert_eq!(
                off, p.offset,
                "extended reply header must echo the request offset"
            );
        }
        match c.kind {
            REPLY_TYPE_NONE => assert!(c.payload.is_empty(), "NONE chunk with a payload"),
            REPLY_TYPE_ERROR => {
                assert!(c.payload.len() >= 6, "short error chunk");
                let msg_len = be16(&c.payload[4..]) as usize;
                assert_eq!(c.payload.len(), 6 + msg_len, "error chunk message length");
                assert!(msg_len <= 4096);
                let error = be32(&c.payload);
                assert_ne!(error, 0, "error chunk with error 0");
                r.error = error;
            }
            REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                assert_eq!(p.command, CMD_READ, "content chunk for a non-read");
                let off = be64(&c.payload);
                let len = if c.kind == REPLY_TYPE_OFFSET_DATA {
                    (c.payload.len() - 8) as u64
                } else {
                    assert_eq!(c.payload.len(), 12, "OFFSET_HOLE payload");
                    u64::from(be32(&c.payload[8..]))
                };
                assert!(len > 0, "content chunk of zero bytes");
                assert!(
                    off >= p.offset && off + len <= p.offset + p.length,
                    "content chunk {off}+{len} outside the request {}+{}",
                    p.offset,
                    p.length
                );
                let at = (off - p.offset) as usize;
                if c.kind == REPLY_TYPE_OFFSET_DATA {
                    r.data[at..at + len as usize].copy_from_slice(&c.payload[8..]);
                }
                covered += len;
            }
            REPLY_TYPE_BLOCK_STATUS | REPLY_TYPE_BLOCK_STATUS_EXT => {
                assert_eq!(
                    p.command, CMD_BLOCK_STATUS,
                    "block status chunk for another command"
                );
            }
            other => panic!("unexpected chunk type {other:#x}"),
        }
    }
    if p.command == CMD_READ && r.error == 0 {
        assert_eq!(
            covered, p.length,
            "content chunks must cover the read exactly"
        );
    }
    r.chunks = chunks;
    r
}

/// Decodes base:allocation descriptors from a block status reply as (length, flags).
fn extents(r: &Response, expected_id: u32) -> Vec<(u64, u64)> {
    assert_eq!(r.error, 0, "block status failed");
    let status: Vec<&Chunk> = r
        .chunks
        .iter()
        .filter(|c| {
            matches!(
                c.kind,
                REPLY_TYPE_BLOCK_STATUS | REPLY_TYPE_BLOCK_STATUS_EXT
            )
        })
        .collect();
    assert_eq!(status.len(), 1, "one status chunk for one context");
    let c = status[0];
    assert_eq!(
        be32(&c.payload),
        expected_id,
        "context id of the status chunk"
    );
    let mut out = Vec::new();
    if c.kind == REPLY_TYPE_BLOCK_STATUS_EXT {
        let count = be32(&c.payload[4..]) as usize;
        assert_eq!(
            c.payload.len(),
            8 + 16 * count,
            "BLOCK_STATUS_EXT payload size"
        );
        for d in c.payload[8..].chunks(16) {
            out.push((be64(d), be64(&d[8..])));
        }
    } else {
        assert_eq!((c.payload.len() - 4) % 8, 0, "BLOCK_STATUS payload size");
        for d in c.payload[4..].chunks(8) {
            out.push((u64::from(be32(d)), u64::from(be32(&d[4..]))));
        }
    }
    assert!(!out.is_empty(), "at least one descriptor");
    assert!(out.iter().all(|&(len, _)| len > 0), "no empty descriptors");
    out
}

/// The flags of the extent covering `at` (relative to the request offset), if described.
fn state_at(extents: &[(u64, u64)], at: u64) -> Option<u64> {
    let mut start = 0;
    for &(len, flags) in extents {
        if at < start + len {
            return Some(flags);
        }
        start += len;
    }
    None
}

/// Proves the server is alive and serving: a fresh client writes and reads back.
fn assert_serves(server: &mut Server) {
    assert!(
        server.is_running(),
        "bucketdisk died:\n{}",
        server.log_text()
    );
    let mut c = Client::connect(port(server), Mode::Structured, false);
    let data = pattern(4096, 0x77);
    c.write(12 * MIB, &data);
    assert_eq!(c.read(12 * MIB, 4096), data);
}

// ---------------------------------------------------------------------------------------------
// Handshake

#[test]
fn handshake_go_then_compact_requests() {
    let mut server = Server::start();
    let mut c = Client::connect(port(&server), Mode::Simple, false);
    assert_eq!(c.size, GIB);
    assert_eq!(c.tflags & TFLAG_SEND_DF, 0, "DF needs structured replies");
    let data = pattern(8192, 1);
    c.write(65536, &data);
    assert_eq!(c.read(65536, 8192), data);
    let r = c.call(0, CMD_FLUSH, 0, 0, &[]);
    assert_eq!((r.error, r.simple), (0, true));
    let r = c.call(CMD_FLAG_FUA, CMD_WRITE, 0, 512, &[9u8; 512]);
    assert_eq!(r.error, 0);
    assert_eq!(c.call(0, CMD_TRIM, 65536, 4096, &[]).error, 0);
    assert_eq!(c.call(0, CMD_WRITE_ZEROES, 69632, 4096, &[]).error, 0);
    assert_eq!(c.call(0, CMD_CACHE, 0, 65536, &[]).error, 0);
    assert_eq!(c.read(65536, 8192), vec![0u8; 8192]);
    // Unknown command: EINVAL, the connection lives on.
    assert_eq!(c.call(0, 0x42, 0, 4096, &[]).error, EINVAL);
    assert_eq!(c.read(0, 512), vec![9u8; 512]);
    // NBD_CMD_DISC: the server closes without a reply.
    c.send(0, CMD_DISC, 0, 0, &[]);
    expect_closed(&mut c.s, "after NBD_CMD_DISC");
    assert_serves(&mut server);
}

#[test]
fn export_name_with_and_without_zeroes() {
    let mut server = Server::start();
    for client_flags in [
        CLIENT_FIXED_NEWSTYLE,
        CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES,
    ] {
        let mut s = greet(port(&server));
        s.write_all(&client_flags.to_be_bytes()).unwrap();
        send_option(&mut s, OPT_EXPORT_NAME, b"");
        let h = read_n(&mut s, 10);
        assert_eq!(be64(&h), GIB, "export size");
        let flags = be16(&h[8..]);
        if client_flags & CLIENT_NO_ZEROES == 0 {
            assert_eq!(read_n(&mut s, 124), vec![0u8; 124], "124 bytes of zeroes");
        }
        let mut c = Client::from_stream(s, Mode::Simple, GIB, flags, None);
        assert_eq!(c.read(0, 4096), vec![0u8; 4096]);
    }
    // NBD_OPT_EXPORT_NAME cannot report an error: an unknown name closes the connection.
    let mut s = haggle(port(&server));
    send_option(&mut s, OPT_EXPORT_NAME, b"no-such-export");
    expect_closed(&mut s, "EXPORT_NAME of an unknown export");
    assert_serves(&mut server);
}

#[test]
fn bad_client_flags_close_the_connection() {
    let mut server = Server::start();
    let mut s = greet(port(&server));
    s.write_all(&(CLIENT_FIXED_NEWSTYLE | 0x8000_0000u32).to_be_bytes())
        .unwrap();
    expect_closed(&mut s, "unknown client flags");
    let mut s = greet(port(&server));
    s.write_all(&(CLIENT_FIXED_NEWSTYLE | 4u32).to_be_bytes())
        .unwrap();
    expect_closed(&mut s, "unknown client flag bit 2");
    assert_serves(&mut server);
}

#[test]
fn a_client_without_fixed_newstyle_gets_no_option_replies() {
    let mut server = Server::start();
    // Plain newstyle: NBD_OPT_EXPORT_NAME is all there is.
    let mut s = greet(port(&server));
    s.write_all(&CLIENT_NO_ZEROES.to_be_bytes()).unwrap();
    send_option(&mut s, OPT_EXPORT_NAME, b"");
    let h = read_n(&mut s, 10);
    assert_eq!(be64(&h), GIB, "export size");
    let mut c = Client::from_stream(s, Mode::Simple, GIB, be16(&h[8..]), None);
    assert_eq!(c.read(0, 4096), vec![0u8; 4096]);
    // Any other option closes the connection without a fixed-newstyle reply.
    for option in [OPT_LIST, OPT_GO, OPT_STRUCTURED_REPLY, 0x7777] {
        let mut s = greet(port(&server));
        s.write_all(&0u32.to_be_bytes()).unwrap();
        let data = if option == OPT_GO {
            go_data("")
        } else {
            Vec::new()
        };
        send_option(&mut s, option, &data);
        expect_closed(&mut s, &format!("option {option} without fixed newstyle"));
    }
    assert_serves(&mut server);
}

#[test]
fn bad_option_magic_closes_the_connection() {
    let mut server = Server::start();
    let mut s = haggle(port(&server));
    let mut bad = option_bytes(OPT_GO, &go_data(""));
    bad[0] ^= 0x01;
    s.write_all(&bad).unwrap();
    expect_closed(&mut s, "bad option magic");

    // Also after a successful option.
    let mut s = haggle(port(&server));
    option_expect(&mut s, OPT_STRUCTURED_REPLY, &[], REP_ACK, "structured");
    s.write_all(&[0xAB; 16]).unwrap();
    expect_closed(&mut s, "garbage instead of an option header");
    assert_serves(&mut server);
}

#[test]
fn unknown_option_gets_err_unsup_and_haggling_continues() {
    let mut server = Server::start();
    let mut s = haggle(port(&server));
    option_expect(&mut s, 0x1234, &[], REP_ERR_UNSUP, "unknown option 0x1234");
    option_expect(
        &mut s,
        0xFFFF_FFFF,
        b"some data",
        REP_ERR_UNSUP,
        "option 2^32-1",
    );
    option_expect(
        &mut s,
        4,
        &[],
        REP_ERR_UNSUP,
        "NBD_OPT_PEEK_EXPORT (4, withdrawn)",
    );
    option_expect(
        &mut s,
        OPT_STARTTLS,
        &[],
        REP_ERR_POLICY,
        "STARTTLS without TLS",
    );
    option_expect(
        &mut s,
        OPT_STARTTLS,
        b"x",
        REP_ERR_INVALID,
        "STARTTLS with data",
    );
    option_expect(&mut s, OPT_LIST, b"x", REP_ERR_INVALID, "LIST with data");
    option_expect(
        &mut s,
        OPT_STRUCTURED_REPLY,
        b"x",
        REP_ERR_INVALID,
        "STRUCTURED_REPLY with data",
    );
    option_expect(
        &mut s,
        OPT_EXTENDED_HEADERS,
        b"x",
        REP_ERR_INVALID,
        "EXTENDED_HEADERS with data",
    );

    // LIST still works and names the default volume.
    send_option(&mut s, OPT_LIST, &[]);
    let r = read_option_reply(&mut s);
    assert_eq!(r.kind, REP_SERVER);
    let len = be32(&r.data) as usize;
    assert_eq!(&r.data[4..4 + len], b"disk");
    assert_eq!(read_option_reply(&mut s).kind, REP_ACK);

    let (size, flags) = go(&mut s, OPT_GO, "");
    let mut c = Client::from_stream(s, Mode::Simple, size, flags, None);
    assert_eq!(c.read(0, 512), vec![0u8; 512]);
    assert_serves(&mut server);
}

#[test]
fn oversized_option_is_drained_with_err_too_big() {
    let mut server = Server::start();
    let mut s = haggle(port(&server));
    // 100 KiB of payload: over the 64 KiB parse limit, under the 16 MiB drain limit.
    let big = vec![0x41u8; 100 * 1024];
    option_expect(
        &mut s,
        0x4242,
        &big,
        REP_ERR_TOO_BIG,
        "100 KiB unknown option",
    );
    let mut go_big = go_data("");
    go_big.resize(100 * 1024, 0);
    option_expect(
        &mut s,
        OPT_GO,
        &go_big,
        REP_ERR_TOO_BIG,
        "100 KiB NBD_OPT_GO",
    );
    // The payload was consumed: the next option is parsed correctly.
    option_expect(
        &mut s,
        OPT_STRUCTURED_REPLY,
        &[],
        REP_ACK,
        "structured after TOO_BIG",
    );
    let (size, flags) = go(&mut s, OPT_GO, "");
    let mut c = Client::from_stream(s, Mode::Structured, size, flags, None);
    let data = pattern(4096, 3);
    c.write(0, &data);
    assert_eq!(c.read(0, 4096), data);
    assert_serves(&mut server);
}

/// Peak virtual memory of a process (kB), from /proc.
fn vm_peak_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmPeak:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmPeak")
}

#[test]
fn huge_option_length_closes_without_allocating() {
    let mut server = Server::start();
    let pid = server.child.as_ref().unwrap().id();
    // Warm up worker threads and allocator arenas so they do not count as growth.
    for _ in 0..3 {
        assert_serves(&mut server);
    }
    let before = vm_peak_kb(pid);
    for length in [1u32 << 30, u32::MAX, (16 << 20) + 1] {
        let mut s = haggle(port(&server));
        let mut head = IHAVEOPT.to_be_bytes().to_vec();
        head.extend_from_slice(&OPT_GO.to_be_bytes());
        head.extend_from_slice(&length.to_be_bytes());
        s.write_all(&head).unwrap();
        // A little of the promised payload; the server must not wait for the rest.
        let _ = s.write_all(&[0u8; 4096]);
        expect_closed(&mut s, &format!("option of {length} bytes"));
    }
    let after = vm_peak_kb(pid);
    assert!(
        after.saturating_sub(before) < 512 * 1024,
        "peak virtual memory grew from {before} kB to {after} kB: the server allocated the \
         announced option length"
    );
    assert_serves(&mut server);
}

#[test]
fn more_than_1024_options_close_the_connection() {
    let mut server = Server::start();
    let mut s = haggle(port(&server));
    let mut burst = Vec::new();
    for _ in 0..1025 {
        burst.extend_from_slice(&option_bytes(0x5555, &[]));
    }
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&burst);
    });
    for i in 0..1024 {
        let r = read_option_reply(&mut s);
        assert_eq!(r.kind, REP_ERR_UNSUP, "option {i}");
    }
    expect_closed(&mut s, "the 1025th option");
    sender.join().unwrap();
    assert_serves(&mut server);
}

#[test]
fn malformed_option_data_gets_err_invalid() {
    let mut server = Server::start_with(ServerOptions {
        volumes: vec!["alpha", "beta"],
        ..ServerOptions::default()
    });
    let mut s = haggle(port(&server));
    option_expect(&mut s, OPT_STRUCTURED_REPLY, &[], REP_ACK, "structured");

    // Name length larger than the data.
    let mut d = 100u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"alpha\0\0");
    option_expect(
        &mut s,
        OPT_GO,
        &d,
        REP_ERR_INVALID,
        "GO name length 100 in 7 bytes",
    );
    option_expect(
        &mut s,
        OPT_INFO,
        &d,
        REP_ERR_INVALID,
        "INFO name length 100 in 7 bytes",
    );
    // Name length of 2^32-1.
    let mut d = u32::MAX.to_be_bytes().to_vec();
    d.extend_from_slice(&[0, 0]);
    option_expect(&mut s, OPT_GO, &d, REP_ERR_INVALID, "GO name length 2^32-1");
    // Truncated: no info request count.
    option_expect(
        &mut s,
        OPT_GO,
        &name_data("alpha"),
        REP_ERR_INVALID,
        "GO without count",
    );
    // Count says 3 info requests, only 1 present.
    let mut d = name_data("alpha");
    d.extend_from_slice(&3u16.to_be_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    option_expect(
        &mut s,
        OPT_GO,
        &d,
        REP_ERR_INVALID,
        "GO with 3 requests announced, 1 sent",
    );
    // Trailing garbage.
    let mut d = go_data("alpha");
    d.push(0);
    option_expect(
        &mut s,
        OPT_INFO,
        &d,
        REP_ERR_INVALID,
        "INFO with a trailing byte",
    );
    // Too short to hold a length.
    option_expect(&mut s, OPT_GO, &[0, 0], REP_ERR_INVALID, "GO with 2 bytes");
    // Meta context: 5 queries announced, 1 present; and a query length past the end.
    let mut d = name_data("alpha");
    d.extend_from_slice(&5u32.to_be_bytes());
    d.extend_from_slice(&name_data("base:allocation"));
    option_expect(
        &mut s,
        OPT_SET_META_CONTEXT,
        &d,
        REP_ERR_INVALID,
        "SET_META 5 queries, 1 sent",
    );
    option_expect(
        &mut s,
        OPT_LIST_META_CONTEXT,
        &d,
        REP_ERR_INVALID,
        "LIST_META 5 queries, 1 sent",
    );
    let mut d = name_data("alpha");
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&1000u32.to_be_bytes());
    d.extend_from_slice(b"base:");
    option_expect(
        &mut s,
        OPT_SET_META_CONTEXT,
        &d,
        REP_ERR_INVALID,
        "SET_META query overrun",
    );
    option_expect(
        &mut s,
        OPT_SET_META_CONTEXT,
        &[],
        REP_ERR_INVALID,
        "SET_META without data",
    );

    // Unknown exports: ERR_UNKNOWN.
    option_expect(
        &mut s,
        OPT_INFO,
        &go_data("gamma"),
        REP_ERR_UNKNOWN,
        "INFO unknown export",
    );
    option_expect(
        &mut s,
        OPT_GO,
        &go_data("gamma"),
        REP_ERR_UNKNOWN,
        "GO unknown export",
    );
    option_expect(
        &mut s,
        OPT_SET_META_CONTEXT,
        &meta_data("gamma", &["base:allocation"]),
        REP_ERR_UNKNOWN,
        "SET_META unknown export",
    );

    // The handshake is intact: INFO, then GO on a named export.
    let (size, _) = go(&mut s, OPT_INFO, "beta");
    assert_eq!(size, GIB);
    let (size, flags) = go(&mut s, OPT_GO, "beta");
    let mut c = Client::from_stream(s, Mode::Structured, size, flags, None);
    assert_eq!(c.read(0, 4096), vec![0u8; 4096]);
    assert_serves(&mut server);
}

#[test]
fn set_meta_context_needs_structured_replies() {
    let mut server = Server::start();
    let mut s = haggle(port(&server));
    option_expect(
        &mut s,
        OPT_SET_META_CONTEXT,
        &meta_data("", &["base:allocation"]),
        REP_ERR_INVALID,
        "SET_META_CONTEXT before structured replies",
    );
    // LIST works without structured replies.
    send_option(&mut s, OPT_LIST_META_CONTEXT, &meta_data("", &[]));
    let r = read_option_reply(&mut s);
    assert_eq!(r.kind, REP_META_CONTEXT);
    assert_eq!(&r.data[4..], b"base:allocation");
    assert_eq!(read_option_reply(&mut s).kind, REP_ACK);
    // OPT_ABORT is acknowledged, then the server closes.
    send_option(&mut s, OPT_ABORT, &[]);
    let r = read_option_reply(&mut s);
    assert_eq!((r.option, r.kind), (OPT_ABORT, REP_ACK));
    expect_closed(&mut s, "after OPT_ABORT");
    assert_serves(&mut server);
}

// ---------------------------------------------------------------------------------------------
// Transmission

#[test]
fn extended_headers_requests_and_replies() {
    let mut server = Server::start();
    let mut c = Client::connect(port(&server), Mode::Extended, true);
    let id = c.meta_id.unwrap();
    let base = MIB + 4096;
    let data = pattern(8192, 5);

    // WRITE: one 32-byte extended reply, type NONE, DONE, echoing cookie and offset.
    let cookie = c.send(0, CMD_WRITE, base, 8192, &data);
    let h = read_n(&mut c.s, 32);
    assert_eq!(be32(&h), EXTENDED_REPLY_MAGIC, "extended reply magic");
    assert_eq!(be16(&h[4..]), REPLY_FLAG_DONE, "flags");
    assert_eq!(be16(&h[6..]), REPLY_TYPE_NONE, "type");
    assert_eq!(be64(&h[8..]), cookie, "cookie");
    assert_eq!(be64(&h[16..]), base, "offset echo");
    assert_eq!(be64(&h[24..]), 0, "payload length");
    c.pending.remove(&cookie);

    // READ: content chunks with extended headers (checked in recv/assemble).
    let r = c.call(0, CMD_READ, base, 8192, &[]);
    assert_eq!(r.error, 0);
    assert_eq!(r.data, data);
    assert!(
        r.chunks
            .iter()
            .all(|ch| ch.magic == EXTENDED_REPLY_MAGIC && ch.header_offset == Some(base))
    );

    // Errors are extended error chunks, echoing the offset too.
    let r = c.call(0, CMD_READ, c.size - 512, 4096, &[]);
    assert_eq!(r.error, EINVAL);
    assert_eq!(r.chunks.len(), 1);
    assert_eq!(r.chunks[0].kind, REPLY_TYPE_ERROR);
    assert_eq!(r.chunks[0].header_offset, Some(c.size - 512));
    let r = c.call(0, CMD_WRITE, c.size - 512, 4096, &data[..4096]);
    assert_eq!(r.error, ENOSPC);

    // 64-bit effect lengths: a read beyond 2^32 is refused (EOVERFLOW or EINVAL both allowed).
    let r = c.call(0, CMD_READ, 0, 5 << 30, &[]);
    assert!(
        matches!(r.error, EINVAL | EOVERFLOW),
        "5 GiB read: {}",
        r.error
    );
    let r = c.call(0, CMD_TRIM, 0, 1 << 40, &[]);
    assert_eq!(r.error, EINVAL, "trim of 1 TiB on a 1 GiB export");
    let r = c.call(0, CMD_TRIM, 2 * MIB, 64 * MIB, &[]);
    assert_eq!(
        r.error, 0,
        "trim of 64 MiB (no payload limit on effect lengths)"
    );

    // PAYLOAD_LEN on a command that takes no payload: consumed, then EINVAL.
    let r = c.call(CMD_FLAG_PAYLOAD_LEN, CMD_READ, 0, 4096, &[0xEE; 4096]);
    assert_eq!(r.error, EINVAL, "READ with a payload");
    // Block status payload form (not advertised): consumed, then EINVAL.
    let mut bs_payload = (4 * MIB).to_be_bytes().to_vec();
    bs_payload.extend_from_slice(&id.to_be_bytes());
    let r = c.call(CMD_FLAG_PAYLOAD_LEN, CMD_BLOCK_STATUS, 0, 12, &bs_payload);
    assert_eq!(r.error, EINVAL, "BLOCK_STATUS with a payload");
    assert_eq!(c.read(base, 8192), data, "framing intact after payloads");

    // BLOCK_STATUS_EXT.
    let r = c.call(0, CMD_BLOCK_STATUS, 0, 4 * MIB, &[]);
    assert!(
        r.chunks
            .iter()
            .any(|ch| ch.kind == REPLY_TYPE_BLOCK_STATUS_EXT)
    );
    let ext = extents(&r, id);
    assert!(ext.iter().map(|e| e.0).sum::<u64>() <= 4 * MIB);
    assert_eq!(
        state_at(&ext, 0),
        Some(STATE_HOLE | STATE_ZERO),
        "start is a hole: {ext:?}"
    );
    assert_eq!(
        state_at(&ext, base),
        Some(0),
        "written range is data: {ext:?}"
    );
    let r = c.call(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, base, 4 * MIB, &[]);
    let ext = extents(&r, id);
    assert_eq!(ext.len(), 1, "REQ_ONE: one descriptor");
    assert!(ext[0].0 <= 4 * MIB);
    assert_eq!(ext[0].1, 0);

    // A compact request after extended headers is lost framing.
    let mut compact = encode_request(Mode::Simple, 0, CMD_READ, 1, 0, 512);
    compact.extend_from_slice(&[0; 4]);
    c.s.write_all(&compact).unwrap();
    expect_closed(&mut c.s, "compact request in extended mode");
    assert_serves(&mut server);
}

#[test]
fn pipelined_requests_are_all_answered_once() {
    let mut server = Server::start();
    let mut c = Client::connect(port(&server), Mode::Structured, false);
    let chunk = 4096usize;
    // Region A holds known data for the pipelined reads.
    for i in 0..25u64 {
        c.write(4 * MIB + i * chunk as u64, &pattern(chunk, i as u8));
    }
    let mut wire = Vec::new();
    let mut expected: HashMap<u64, Option<Vec<u8>>> = HashMap::new();
    for i in 0..50u64 {
        let j = i / 2;
        let (cookie, bytes) = if i % 2 == 0 {
            c.prepare(0, CMD_READ, 4 * MIB + j * chunk as u64, chunk as u64, &[])
        } else {
            let data = pattern(chunk, 100 + j as u8);
            c.prepare(
                0,
                CMD_WRITE,
                8 * MIB + j * chunk as u64,
                chunk as u64,
                &data,
            )
        };
        wire.extend_from_slice(&bytes);
        let want = (i % 2 == 0).then(|| pattern(chunk, j as u8));
        expected.insert(cookie, want);
    }
    // Everything goes out before any reply is read (a thread, so neither side can block).
    let mut writer = c.s.try_clone().unwrap();
    let sender = std::thread::spawn(move || writer.write_all(&wire));
    let mut seen = HashMap::new();
    for _ in 0..50 {
        let r = c.recv();
        assert_eq!(r.error, 0, "pipelined request {:#x} failed", r.cookie);
        *seen.entry(r.cookie).or_insert(0) += 1;
        if let Some(Some(want)) = expected.get(&r.cookie) {
            assert_eq!(&r.data, want, "pipelined read {:#x}", r.cookie);
        }
    }
    sender.join().unwrap().expect("send pipelined requests");
    assert_eq!(seen.len(), 50, "every cookie answered");
    assert!(seen.values().all(|&n| n == 1), "each cookie answered once");
    assert!(c.pending.is_empty());
    for j in 0..25u64 {
        assert_eq!(
            c.read(8 * MIB + j * chunk as u64, chunk as u64),
            pattern(chunk, 100 + j as u8)
        );
    }
    assert_serves(&mut server);
}

#[test]
fn disc_after_pipelined_writes_answers_them_all_first() {
    let mut server = Server::start();
    let p = port(&server);
    let mut c = Client::connect(p, Mode::Simple, false);
    let mut wire = Vec::new();
    let mut cookies = Vec::new();
    for i in 0..20u64 {
        let (cookie, bytes) = c.prepare(
            CMD_FLAG_FUA * (i % 2) as u16,
            CMD_WRITE,
            16 * MIB + i * 65536,
            65536,
            &pattern(65536, i as u8),
        );
        cookies.push(cookie);
        wire.extend_from_slice(&bytes);
    }
    let (_, disc) = c.prepare(0, CMD_DISC, 0, 0, &[]);
    wire.extend_from_slice(&disc);
    c.s.write_all(&wire).unwrap();
    let mut answered = Vec::new();
    for _ in 0..20 {
        let r = c.recv();
        assert_eq!(r.error, 0);
        answered.push(r.cookie);
    }
    answered.sort_unstable();
    assert_eq!(answered, cookies, "every write answered before the close");
    expect_closed(&mut c.s, "after NBD_CMD_DISC");
    let mut c = Client::connect(p, Mode::Simple, false);
    for i in 0..20u64 {
        assert_eq!(c.read(16 * MIB + i * 65536, 65536), pattern(65536, i as u8));
    }
    assert_serves(&mut server);
}

#[test]
fn bad_request_magic_closes_after_answering_earlier_requests() {
    let mut server = Server::start();
    let mut c = Client::connect(port(&server), Mode::Simple, false);
    assert_eq!(c.read(0, 512), vec![0u8; 512]);
    let (cookie, mut wire) = c.prepare(0, CMD_WRITE, 0, 4096, &pattern(4096, 9));
    let mut bad = encode_request(Mode::Simple, 0, CMD_READ, 99, 0, 512);
    bad[0] = 0x26;
    wire.extend_from_slice(&bad);
    c.s.write_all(&wire).unwrap();
    let r = c.recv();
    assert_eq!(
        (r.cookie, r.error),
        (cookie, 0),
        "write before the bad magic is answered"
    );
    expect_closed(&mut c.s, "bad request magic");

    // Structured mode: the extended magic is wrong too when not negotiated.
    let mut c = Client::connect(port(&server), Mode::Structured, false);
    let mut ext = encode_request(Mode::Extended, 0, CMD_READ, 1, 0, 512);
    ext.truncate(28);
    c.s.write_all(&ext).unwrap();
    expect_closed(&mut c.s, "extended magic without extended headers");
    assert_serves(&mut server);
    let mut c = Client::connect(port(&server), Mode::Simple, false);
    assert_eq!(c.read(0, 4096), pattern(4096, 9));
}

#[test]
fn write_with_64_mib_payload_closes() {
    let mut server = Server::start();
    for mode in [Mode::Simple, Mode::Extended] {
        let mut c = Client::connect(port(&server), mode, false);
        let flags = if mode == Mode::Extended {
            CMD_FLAG_PAYLOAD_LEN
        } else {
            0
        };
        let header = encode_request(mode, flags, CMD_WRITE, 7, 0, 64 * MIB);
        c.s.write_all(&header).unwrap();
        // No payload follows: the server must close on the header alone, not wait for 64 MiB.
        let start = Instant::now();
        expect_closed(&mut c.s, &format!("64 MiB write ({mode:?})"));
        assert!(start.elapsed() < TIMEOUT);
    }
    assert_serves(&mut server);
}

#[test]
fn write_past_end_gets_enospc_and_connection_lives() {
    let mut server = Server::start();
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let mut c = Client::connect(port(&server), mode, false);
        let data = pattern(65536, 11);
        c.write(0, &data);
        let junk = vec![0x25u8; 65536]; // request magic's first byte, to catch undrained payloads
        let r = c.call(0, CMD_WRITE, c.size - 4096, 65536, &junk);
        assert_eq!(r.error, ENOSPC, "{mode:?}: write past the end");
        let r = c.call(0, CMD_WRITE, c.size + MIB, 512, &junk[..512]);
        assert_eq!(r.error, ENOSPC, "{mode:?}: write beyond the end");
        let r = c.call(0, CMD_WRITE_ZEROES, c.size - 4096, 65536, &[]);
        assert_eq!(r.error, ENOSPC, "{mode:?}: write_zeroes past the end");
        assert_eq!(c.read(0, 65536), data, "{mode:?}: next request works");
        assert_eq!(
            c.read(c.size - 4096, 4096),
            vec![0u8; 4096],
            "{mode:?}: tail untouched"
        );
    }
    assert_serves(&mut server);
}

#[test]
fn simple_and_structured_read_replies() {
    let mut server = Server::start();
    let p = port(&server);
    let data = pattern(65536, 21);
    {
        let mut c = Client::connect(p, Mode::Simple, false);
        c.write(MIB, &data);
        let r = c.call(0, CMD_READ, 0, MIB, &[]);
        assert!(r.simple);
        assert_eq!(r.data, vec![0u8; MIB as usize], "simple read of a hole");
        assert_eq!(c.read(MIB, 65536), data);
        // Errors in simple mode carry no payload: the next reply parses.
        assert_eq!(c.call(0, CMD_READ, GIB, 4096, &[]).error, EINVAL);
        assert_eq!(c.read(MIB, 4096), data[..4096]);
    }
    let mut c = Client::connect(p, Mode::Structured, false);
    assert!(
        c.tflags & TFLAG_SEND_DF != 0,
        "DF advertised with structured replies"
    );
    // A hole: OFFSET_HOLE chunk(s), no data chunks.
    let r = c.call(0, CMD_READ, 4 * MIB, MIB, &[]);
    assert!(!r.simple, "a structured read gets chunks");
    assert_eq!(r.data, vec![0u8; MIB as usize]);
    assert!(
        r.chunks.iter().any(|ch| ch.kind == REPLY_TYPE_OFFSET_HOLE),
        "a hole is sent as OFFSET_HOLE: {:?}",
        r.chunks.iter().map(|ch| ch.kind).collect::<Vec<_>>()
    );
    assert!(r.chunks.iter().all(|ch| ch.kind != REPLY_TYPE_OFFSET_DATA));
    let last = r.chunks.last().unwrap();
    assert_eq!(last.flags & REPLY_FLAG_DONE, REPLY_FLAG_DONE);
    assert!(
        r.chunks[..r.chunks.len() - 1]
            .iter()
            .all(|ch| ch.flags & REPLY_FLAG_DONE == 0)
    );
    // Data: OFFSET_DATA with the right offset.
    let r = c.call(0, CMD_READ, MIB, 65536, &[]);
    assert_eq!(r.data, data);
    assert!(
        r.chunks
            .iter()
            .any(|ch| ch.kind == REPLY_TYPE_OFFSET_DATA && be64(&ch.payload) == MIB)
    );
    // Mixed data and hole.
    let r = c.call(0, CMD_READ, MIB - 65536, 3 * 65536, &[]);
    let mut want = vec![0u8; 65536];
    want.extend_from_slice(&data);
    want.extend_from_slice(&[0u8; 65536]);
    assert_eq!(r.data, want);
    // DF: exactly one content chunk, OFFSET_DATA with the zeroes present.
    let r = c.call(CMD_FLAG_DF, CMD_READ, MIB - 65536, 3 * 65536, &[]);
    let content: Vec<_> = r
        .chunks
        .iter()
        .filter(|ch| matches!(ch.kind, REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE))
        .collect();
    assert_eq!(content.len(), 1, "DF: one content chunk");
    assert_eq!(content[0].kind, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(r.data, want);
    // Structured errors: an error chunk, and the connection lives.
    let r = c.call(0, CMD_READ, GIB - 512, 4096, &[]);
    assert_eq!(r.error, EINVAL);
    assert_eq!(r.chunks.len(), 1);
    assert_eq!(r.chunks[0].kind, REPLY_TYPE_ERROR);
    assert_eq!(r.chunks[0].flags, REPLY_FLAG_DONE);
    assert_eq!(c.read(MIB, 65536), data);
    assert_serves(&mut server);
}

#[test]
fn block_status_structured_mode() {
    let mut server = Server::start();
    let mut c = Client::connect(port(&server), Mode::Structured, true);
    let id = c.meta_id.unwrap();
    c.write(2 * MIB, &pattern(65536, 31));
    let r = c.call(0, CMD_BLOCK_STATUS, 0, 4 * MIB, &[]);
    assert!(r.chunks.iter().all(|ch| ch.magic == STRUCTURED_REPLY_MAGIC));
    let ext = extents(&r, id);
    assert!(r.chunks.iter().any(|ch| ch.kind == REPLY_TYPE_BLOCK_STATUS));
    assert!(ext.iter().map(|e| e.0).sum::<u64>() <= 4 * MIB, "{ext:?}");
    assert_eq!(state_at(&ext, 0), Some(STATE_HOLE | STATE_ZERO), "{ext:?}");
    assert_eq!(state_at(&ext, 2 * MIB), Some(0), "{ext:?}");
    if let Some(s) = state_at(&ext, 3 * MIB) {
        assert_eq!(s, STATE_HOLE | STATE_ZERO, "{ext:?}");
    }
    // REQ_ONE: exactly one descriptor, no longer than the request.
    let r = c.call(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 0, 4 * MIB, &[]);
    let ext = extents(&r, id);
    assert_eq!(ext.len(), 1);
    assert!(ext[0].0 <= 4 * MIB);
    assert_eq!(ext[0].1, STATE_HOLE | STATE_ZERO);
    // A status request covering the whole export (the largest compact length it allows).
    let r = c.call(0, CMD_BLOCK_STATUS, 0, GIB, &[]);
    assert!(extents(&r, id).iter().map(|e| e.0).sum::<u64>() <= GIB);
    // Past the end: EINVAL, and the connection lives.
    assert_eq!(
        c.call(0, CMD_BLOCK_STATUS, GIB - 4096, 8192, &[]).error,
        EINVAL
    );
    assert_eq!(
        c.call(0, CMD_BLOCK_STATUS, 0, u64::from(u32::MAX), &[])
            .error,
        EINVAL
    );
    assert_eq!(c.read(2 * MIB, 65536), pattern(65536, 31));
    assert_serves(&mut server);
}

/// Resident memory of a process (kB), from /proc.
fn vm_rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// A client that pipelines large reads and does not read the replies must not make the server
/// buffer them without bound: the per-connection payload budget (256 MiB) has to cover replies
/// still waiting to be written, or the reader keeps accepting requests whose replies pile up.
#[test]
fn unread_read_replies_stay_within_the_memory_budget() {
    let mut server = Server::start();
    let pid = server.child.as_ref().unwrap().id();
    assert_serves(&mut server);
    let baseline = vm_rss_kb(pid);
    let mut c = Client::connect(port(&server), Mode::Simple, false);
    let count = 24u64; // 768 MiB of replies, three times the budget
    let len = 32 * MIB;
    for i in 0..count {
        c.send(0, CMD_READ, 64 * MIB + i * len, len, &[]);
    }
    // Give the server time to take in every request it is willing to.
    let mut peak = baseline;
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        peak = peak.max(vm_rss_kb(pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    let grown_mib = peak.saturating_sub(baseline) / 1024;
    eprintln!("resident memory grew by {grown_mib} MiB with {count} unread replies");
    // Now read everything: all replies must still arrive intact.
    for _ in 0..count {
        let r = c.recv();
        assert_eq!(r.error, 0);
        assert_eq!(r.data.len() as u64, len);
        assert!(r.data.iter().all(|&b| b == 0));
    }
    assert_serves(&mut server);
    assert!(
        grown_mib < 384,
        "with {count} unread 32 MiB read replies queued, the server's resident memory grew by \
         {grown_mib} MiB (budget: 256 MiB per connection)"
    );
}

// ---------------------------------------------------------------------------------------------
// Garbage

/// Reads whatever the server sends for a short while (replies, then maybe a close).
fn drain_briefly(s: &mut TcpStream) {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 65536];
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[test]
fn random_garbage_does_not_hurt_the_server() {
    // A small export keeps random zeroing and trimming cheap.
    let mut server = Server::start_with(ServerOptions {
        size: "64M",
        ..ServerOptions::default()
    });
    let p = port(&server);
    let size = 64 * MIB;
    let seed = 0x5EED_0000_0000_0001u64;
    let mut rng = Rng(seed);
    let start = Instant::now();
    let mut connections = 0;
    while connections < 400 && start.elapsed() < Duration::from_secs(12) {
        connections += 1;
        let case = rng.below(4);
        let mode = match rng.below(3) {
            0 => Mode::Simple,
            1 => Mode::Structured,
            _ => Mode::Extended,
        };
        let mut s = if case == 0 {
            // Garbage during option haggling: valid options with random numbers and data,
            // then raw bytes.
            let mut s = haggle(p);
            let mut wire = Vec::new();
            for _ in 0..rng.below(8) {
                let option = if rng.below(2) == 0 {
                    rng.below(16) as u32
                } else {
                    rng.next() as u32
                };
                if option == OPT_STARTTLS || option == OPT_ABORT || option == OPT_EXPORT_NAME {
                    continue;
                }
                let len = rng.below(64) as usize;
                wire.extend_from_slice(&option_bytes(option, &rng.bytes(len)));
            }
            let n = rng.below(512) as usize;
            wire.extend_from_slice(&rng.bytes(n));
            let _ = s.write_all(&wire);
            s
        } else {
            let meta = mode != Mode::Simple && rng.below(2) == 0;
            let c = Client::connect(p, mode, meta);
            let mut s = c.s;
            let mut wire = Vec::new();
            if case == 1 {
                // Pure noise after a valid handshake.
                let n = 1 + rng.below(8192) as usize;
                wire = rng.bytes(n);
            } else {
                // Well-framed requests with random commands, flags, offsets and lengths.
                for _ in 0..1 + rng.below(32) {
                    let command = if rng.below(4) == 0 {
                        rng.next() as u16
                    } else {
                        rng.below(9) as u16
                    };
                    let flags = if rng.below(3) == 0 {
                        rng.next() as u16
                    } else {
                        rng.below(64) as u16
                    };
                    let offset = match rng.below(4) {
                        0 => rng.next(),
                        1 => size - rng.below(65536),
                        _ => rng.below(size),
                    };
                    let length = match rng.below(4) {
                        0 => {
                            rng.next()
                                & if mode == Mode::Extended {
                                    u64::MAX
                                } else {
                                    0xFFFF_FFFF
                                }
                        }
                        1 => 0,
                        _ => rng.below(131072),
                    };
                    let payload_follows = command == CMD_WRITE
                        || (mode == Mode::Extended && flags & CMD_FLAG_PAYLOAD_LEN != 0);
                    wire.extend_from_slice(&encode_request(
                        mode,
                        flags,
                        command,
                        rng.next(),
                        offset,
                        length,
                    ));
                    if payload_follows {
                        // Usually the full payload, sometimes a short one (the connection
                        // then waits for the rest until we hang up).
                        let n = if length <= 131072 && rng.below(4) != 0 {
                            length as usize
                        } else {
                            rng.below(4096) as usize
                        };
                        wire.extend_from_slice(&rng.bytes(n));
                    }
                }
                if case == 3 {
                    let n = rng.below(64) as usize;
                    wire.extend_from_slice(&rng.bytes(n));
                }
            }
            // The server may close mid-write; that is fine.
            let mut w = s.try_clone().unwrap();
            let sender = std::thread::spawn(move || {
                let _ = w.write_all(&wire);
            });
            drain_briefly(&mut s);
            drop(s.shutdown(std::net::Shutdown::Both));
            let _ = sender.join();
            s
        };
        drain_briefly(&mut s);
        assert!(
            server.is_running(),
            "bucketdisk died after garbage connection {connections} (seed {seed:#x}):\n{}",
            server.log_text()
        );
    }
    assert!(
        connections >= 20,
        "only {connections} garbage connections in the time budget"
    );
    assert!(
        !server.log_text().contains("panicked"),
        "a task panicked:\n{}",
        server.log_text()
    );
    assert_serves(&mut server);
    // The export still reads and writes correctly over a fresh connection in every mode.
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let mut c = Client::connect(p, mode, false);
        let data = pattern(4096, 41);
        c.write(0, &data);
        assert_eq!(c.read(0, 4096), data);
    }
    let log = server.log_text();
    eprintln!(
        "{connections} garbage connections in {:?}; server closed {} in the handshake and {} \
         in transmission",
        start.elapsed(),
        log.matches("handshake failed").count(),
        log.matches("connection closed").count()
    );
}
