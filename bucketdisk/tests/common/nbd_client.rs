//! A small blocking NBD client for tests that need exact control over what is sent and when
//! (crash loops: which write was answered, which FLUSH returned). One request at a time.
//!
//! Fixed newstyle handshake, `NBD_OPT_GO` on one export, simple replies only (no structured
//! replies or extended headers are negotiated). Every failure is an `io::Error`: a lost
//! connection as the socket reported it, an NBD error reply as [`NbdReplyError`] (see
//! [`nbd_errno`]), a protocol violation as `InvalidData`.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::Endpoint;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const CLIENT_FIXED_NEWSTYLE: u32 = 1;
const CLIENT_NO_ZEROES: u32 = 2;

const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_FLAG_FUA: u16 = 1;

/// Transmission flag: the export accepts NBD_CMD_FLAG_FUA.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;

/// How long one request (or handshake step) may take before the client gives up.
const TIMEOUT: Duration = Duration::from_secs(60);

/// The server answered a request with an NBD error (`errno`, e.g. 5 = EIO).
#[derive(Debug)]
pub struct NbdReplyError {
    pub errno: u32,
    pub what: String,
}

impl std::fmt::Display for NbdReplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: NBD error {}", self.what, self.errno)
    }
}

impl std::error::Error for NbdReplyError {}

/// The NBD error number if `e` is an error reply (not a lost connection).
pub fn nbd_errno(e: &io::Error) -> Option<u32> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<NbdReplyError>())
        .map(|r| r.errno)
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

pub struct NbdClient {
    stream: Box<dyn Stream>,
    size: u64,
    transmission_flags: u16,
    next_cookie: u64,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

impl NbdClient {
    /// Connects to a test server's endpoint and opens `export` ("" is the default export).
    pub fn connect(endpoint: &Endpoint, export: &str) -> io::Result<NbdClient> {
        match endpoint {
            Endpoint::Tcp(port) => Self::connect_tcp(*port, export),
            Endpoint::Unix(path) => Self::connect_unix(path, export),
        }
    }

    pub fn connect_tcp(port: u16, export: &str) -> io::Result<NbdClient> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_write_timeout(Some(TIMEOUT))?;
        Self::handshake(Box::new(s), export)
    }

    pub fn connect_unix(path: &Path, export: &str) -> io::Result<NbdClient> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_write_timeout(Some(TIMEOUT))?;
        Self::handshake(Box::new(s), export)
    }

    fn handshake(mut s: Box<dyn Stream>, export: &str) -> io::Result<NbdClient> {
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting)?;
        if be64(&greeting) != NBDMAGIC || be64(&greeting[8..]) != IHAVEOPT {
            return Err(invalid(format!(
                "not a newstyle NBD server: {greeting:02x?}"
            )));
        }
        let server_flags = be16(&greeting[16..]);
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(invalid("server does not offer fixed newstyle".into()));
        }
        let mut client_flags = CLIENT_FIXED_NEWSTYLE;
        if server_flags & FLAG_NO_ZEROES != 0 {
            client_flags |= CLIENT_NO_ZEROES;
        }
        s.write_all(&client_flags.to_be_bytes())?;

        // NBD_OPT_GO: export name, no information requests.
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut option = IHAVEOPT.to_be_bytes().to_vec();
        option.extend_from_slice(&OPT_GO.to_be_bytes());
        option.extend_from_slice(&(data.len() as u32).to_be_bytes());
        option.extend_from_slice(&data);
        s.write_all(&option)?;

        let mut export_info = None;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            if be64(&h) != OPTION_REPLY_MAGIC || be32(&h[8..]) != OPT_GO {
                return Err(invalid(format!("bad option reply header {h:02x?}")));
            }
            let kind = be32(&h[12..]);
            let len = be32(&h[16..]) as usize;
            if len > 64 * 1024 {
                return Err(invalid(format!("option reply of {len} bytes")));
            }
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload)?;
            match kind {
                REP_INFO if len >= 12 && be16(&payload) == INFO_EXPORT => {
                    export_info = Some((be64(&payload[2..]), be16(&payload[10..])));
                }
                REP_INFO => {}
                REP_ACK => break,
                _ if kind & (1 << 31) != 0 => {
                    return Err(io::Error::other(format!(
                        "NBD_OPT_GO {export:?} refused ({kind:#x}): {}",
                        String::from_utf8_lossy(&payload)
                    )));
                }
                _ => return Err(invalid(format!("unexpected option reply {kind:#x}"))),
            }
        }
        let (size, transmission_flags) =
            export_info.ok_or_else(|| invalid("NBD_OPT_GO without NBD_INFO_EXPORT".into()))?;
        Ok(NbdClient {
            stream: s,
            size,
            transmission_flags,
            next_cookie: 1,
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn transmission_flags(&self) -> u16 {
        self.transmission_flags
    }

    fn send(
        &mut self,
        flags: u16,
        command: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&command.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&length.to_be_bytes());
        b.extend_from_slice(payload);
        self.stream.write_all(&b)?;
        Ok(cookie)
    }

    /// Reads one simple reply for `cookie`; `data_len` bytes follow a successful READ.
    fn reply(
        &mut self,
        cookie: u64,
        data_len: usize,
        what: impl Fn() -> String,
    ) -> io::Result<Vec<u8>> {
        let mut h = [0u8; 16];
        self.stream.read_exact(&mut h)?;
        if be32(&h) != SIMPLE_REPLY_MAGIC {
            return Err(invalid(format!(
                "{}: bad reply magic {:#x}",
                what(),
                be32(&h)
            )));
        }
        let errno = be32(&h[4..]);
        let got = be64(&h[8..]);
        if got != cookie {
            return Err(invalid(format!(
                "{}: reply for cookie {got}, expected {cookie}",
                what()
            )));
        }
        if errno != 0 {
            return Err(io::Error::other(NbdReplyError {
                errno,
                what: what(),
            }));
        }
        let mut data = vec![0u8; data_len];
        self.stream.read_exact(&mut data)?;
        Ok(data)
    }

    pub fn read(&mut self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let cookie = self.send(0, CMD_READ, offset, len as u32, &[])?;
        self.reply(cookie, len, || format!("READ {offset}+{len}"))
    }

    /// Writes `data` at `offset`; with `fua` the reply means the data is durable.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let cookie = self.send(flags, CMD_WRITE, offset, data.len() as u32, data)?;
        self.reply(cookie, 0, || {
            format!("WRITE {offset}+{} fua={fua}", data.len())
        })?;
        Ok(())
    }

    /// Every write answered before this FLUSH was sent is durable once it returns.
    pub fn flush(&mut self) -> io::Result<()> {
        let cookie = self.send(0, CMD_FLUSH, 0, 0, &[])?;
        self.reply(cookie, 0, || "FLUSH".to_string())?;
        Ok(())
    }

    /// NBD_CMD_DISC (no reply), then the connection is closed.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.send(0, CMD_DISC, 0, 0, &[])?;
        self.stream.flush()
    }
}
