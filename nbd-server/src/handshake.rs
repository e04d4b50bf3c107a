//! The handshake phase: fixed newstyle option haggling, up to NBD_OPT_GO / NBD_OPT_EXPORT_NAME.
//!
//! Every option is answered (unknown ones with ERR_UNSUP); the connection is dropped only when the
//! client breaks framing (bad magic, absurd lengths, unknown client flags) or sends too many
//! options. Option payloads are bounded, so a client cannot make the server allocate freely.
//!
//! With TLS, the option phase runs twice: in clear until the client's `NBD_OPT_STARTTLS` (which
//! [`options`] acknowledges and returns as [`Negotiated::StartTls`]), then again over TLS from a
//! fresh state — nothing a client negotiated in clear (structured replies, meta contexts)
//! survives into the encrypted session, where an attacker could have injected it.

use crate::exports::{Export, Exports};
use crate::proto::*;
use bytes::{BufMut, BytesMut};
use engine::BlockDevice;
use std::io;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest option payload we read and parse. Real options are far smaller (names ≤ 4096 bytes).
const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Larger payloads up to this size are read and discarded, then refused with ERR_TOO_BIG;
/// beyond it the client is not speaking NBD in good faith and the connection is closed.
const MAX_DRAINED_OPTION_LEN: u32 = 16 * 1024 * 1024;
/// Options one connection may send before it is considered abusive.
const MAX_OPTIONS: usize = 1024;
/// Longest string (export name, query) the protocol allows.
const MAX_STRING: usize = 4096;

/// What the client and server agreed on, for the transmission phase.
pub struct Session {
    pub export: Arc<Export>,
    pub mode: ReplyMode,
    /// Whether `base:allocation` was selected (block status allowed).
    pub base_allocation: bool,
    pub transmission_flags: u16,
}

/// How far the option phase got.
pub enum Negotiated {
    /// The client chose an export: on to transmission.
    Session(Session),
    /// `NBD_OPT_STARTTLS` was acknowledged: the TLS handshake comes next, then the options again.
    StartTls,
    /// The client left politely (`NBD_OPT_ABORT`, or it closed the connection).
    Ended,
}

/// Where the connection stands with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPhase {
    /// The server does not offer TLS: `STARTTLS` is refused with `ERR_POLICY`.
    Unavailable,
    /// Offered, not taken (yet): options are answered in clear.
    Offered,
    /// Required, not taken yet: only `STARTTLS` and `ABORT` are answered, others get
    /// `ERR_TLS_REQD`.
    Required,
    /// The connection is encrypted: a second `STARTTLS` is `ERR_INVALID`.
    Active,
}

/// What the client said in the greeting.
#[derive(Debug, Clone, Copy)]
pub struct ClientFlags {
    fixed_newstyle: bool,
    no_zeroes: bool,
}

/// Handshake failure that ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("client broke the protocol: {0}")]
    Protocol(String),
    #[error("client ended the handshake")]
    Aborted,
    #[error(transparent)]
    Io(#[from] io::Error),
}

#[derive(Default)]
struct State {
    structured: bool,
    extended: bool,
    no_zeroes: bool,
    /// Export name the meta contexts were selected for, and whether base:allocation is among them.
    meta_export: Option<String>,
    base_allocation: bool,
}

impl State {
    fn mode(&self) -> ReplyMode {
        if self.extended {
            ReplyMode::Extended
        } else if self.structured {
            ReplyMode::Structured
        } else {
            ReplyMode::Simple
        }
    }
}

/// Runs the handshake of a server without TLS. `Ok(None)` means the client ended it politely
/// (OPT_ABORT or disconnect).
pub async fn negotiate<R, W>(
    reader: &mut R,
    writer: &mut W,
    exports: &Exports,
) -> Result<Option<Session>, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Some(flags) = greet(reader, writer).await? else {
        return Ok(None);
    };
    match options(reader, writer, exports, flags, TlsPhase::Unavailable).await? {
        Negotiated::Session(session) => Ok(Some(session)),
        Negotiated::StartTls | Negotiated::Ended => Ok(None),
    }
}

/// The server's greeting and the client's flags; `None` if the client left.
pub async fn greet<R, W>(
    reader: &mut R,
    writer: &mut W,
) -> Result<Option<ClientFlags>, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut greeting = BytesMut::with_capacity(18);
    greeting.put_u64(NBDMAGIC);
    greeting.put_u64(IHAVEOPT);
    greeting.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    writer.write_all(&greeting).await?;
    writer.flush().await?;

    let client_flags = match reader.read_u32().await {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    if client_flags & !KNOWN_CLIENT_FLAGS != 0 {
        return Err(HandshakeError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    Ok(Some(ClientFlags {
        fixed_newstyle: client_flags & CLIENT_FIXED_NEWSTYLE != 0,
        no_zeroes: client_flags & CLIENT_NO_ZEROES != 0,
    }))
}

/// The option phase, from a fresh state, until the client picks an export, asks for TLS or
/// leaves.
pub async fn options<R, W>(
    reader: &mut R,
    writer: &mut W,
    exports: &Exports,
    flags: ClientFlags,
    tls: TlsPhase,
) -> Result<Negotiated, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut state = State {
        no_zeroes: flags.no_zeroes,
        ..State::default()
    };
    // A client that did not take fixed newstyle knows only NBD_OPT_EXPORT_NAME and cannot read
    // option replies: anything else ends the session (the spec allows only that).
    let fixed_newstyle = flags.fixed_newstyle;

    for _ in 0..MAX_OPTIONS {
        let mut head = [0u8; 16];
        match reader.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Negotiated::Ended),
            Err(e) => return Err(e.into()),
        }
        let magic = u64::from_be_bytes(head[0..8].try_into().expect("8 bytes"));
        let option = u32::from_be_bytes(head[8..12].try_into().expect("4 bytes"));
        let length = u32::from_be_bytes(head[12..16].try_into().expect("4 bytes"));
        if magic != IHAVEOPT {
            return Err(HandshakeError::Protocol(format!(
                "bad option magic {magic:#x}"
            )));
        }
        if !fixed_newstyle && option != OPT_EXPORT_NAME {
            return Err(HandshakeError::Protocol(format!(
                "option {option} from a client without fixed newstyle (only \
                 NBD_OPT_EXPORT_NAME is understood there)"
            )));
        }
        if length > MAX_OPTION_LEN {
            if length > MAX_DRAINED_OPTION_LEN {
                return Err(HandshakeError::Protocol(format!(
                    "option {option} with absurd length {length}"
                )));
            }
            drain(reader, u64::from(length)).await?;
            reply_error(writer, option, REP_ERR_TOO_BIG, "option payload too large").await?;
            continue;
        }
        let mut data = vec![0u8; length as usize];
        reader.read_exact(&mut data).await?;

        if tls == TlsPhase::Required && option != OPT_STARTTLS && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                // It has no error reply: the spec's answer is to end the session.
                return Err(HandshakeError::Protocol(
                    "NBD_OPT_EXPORT_NAME in clear on a server that requires TLS".into(),
                ));
            }
            reply_error(
                writer,
                option,
                REP_ERR_TLS_REQD,
                "this server requires TLS: send NBD_OPT_STARTTLS first",
            )
            .await?;
            writer.flush().await?;
            continue;
        }
        match option {
            OPT_EXPORT_NAME => {
                return export_name(writer, exports, &state, &data)
                    .await
                    .map(Negotiated::Session);
            }
            OPT_ABORT => {
                // The spec asks for an ACK, but the client may already be gone.
                let _ = writer.write_all(&option_reply(option, REP_ACK, &[])).await;
                let _ = writer.flush().await;
                return Err(HandshakeError::Aborted);
            }
            OPT_LIST => list(writer, exports, &data).await?,
            OPT_STARTTLS => {
                let refusal = match tls {
                    _ if !data.is_empty() => Some((REP_ERR_INVALID, "STARTTLS takes no data")),
                    TlsPhase::Unavailable => {
                        Some((REP_ERR_POLICY, "TLS is not enabled on this server"))
                    }
                    TlsPhase::Active => Some((REP_ERR_INVALID, "TLS is already on")),
                    TlsPhase::Offered | TlsPhase::Required => None,
                };
                match refusal {
                    Some((code, msg)) => reply_error(writer, option, code, msg).await?,
                    None => {
                        writer
                            .write_all(&option_reply(option, REP_ACK, &[]))
                            .await?;
                        writer.flush().await?;
                        return Ok(Negotiated::StartTls);
                    }
                }
            }
            OPT_INFO | OPT_GO => {
                if let Some(session) =
                    info_or_go(writer, exports, &mut state, option, &data).await?
                {
                    return Ok(Negotiated::Session(session));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply_error(writer, option, REP_ERR_INVALID, "option takes no data").await?;
                } else if state.extended {
                    reply_error(
                        writer,
                        option,
                        REP_ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    )
                    .await?;
                } else {
                    state.structured = true;
                    reset_meta(&mut state);
                    writer
                        .write_all(&option_reply(option, REP_ACK, &[]))
                        .await?;
                }
            }
            OPT_EXTENDED_HEADERS => {
                if !data.is_empty() {
                    reply_error(writer, option, REP_ERR_INVALID, "option takes no data").await?;
                } else {
                    state.extended = true;
                    state.structured = true;
                    reset_meta(&mut state);
                    writer
                        .write_all(&option_reply(option, REP_ACK, &[]))
                        .await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                meta_context(writer, exports, &mut state, option, &data).await?;
            }
            _ => {
                reply_error(writer, option, REP_ERR_UNSUP, "unknown option").await?;
            }
        }
        writer.flush().await?;
    }
    Err(HandshakeError::Protocol(format!(
        "more than {MAX_OPTIONS} options"
    )))
}

/// Whether base:allocation was selected for this export. Contexts selected for another export do
/// not carry over: NBD_OPT_SET_META_CONTEXT names the export it applies to.
async fn meta_selected_for(state: &State, exports: &Exports, export: &Arc<Export>) -> bool {
    if !state.base_allocation {
        return false;
    }
    let Some(name) = state.meta_export.as_deref() else {
        return false;
    };
    exports
        .find(name)
        .await
        .is_some_and(|e| Arc::ptr_eq(&e, export))
}

fn reset_meta(state: &mut State) {
    state.meta_export = None;
    state.base_allocation = false;
}

async fn reply_error<W: AsyncWrite + Unpin>(
    writer: &mut W,
    option: u32,
    code: u32,
    message: &str,
) -> io::Result<()> {
    writer
        .write_all(&option_reply(option, code, message.as_bytes()))
        .await?;
    writer.flush().await
}

async fn drain<R: AsyncRead + Unpin>(reader: &mut R, mut length: u64) -> io::Result<()> {
    let mut buf = [0u8; 8192];
    while length > 0 {
        let n = length.min(buf.len() as u64) as usize;
        reader.read_exact(&mut buf[..n]).await?;
        length -= n as u64;
    }
    Ok(())
}

/// Transmission flags for an export under the negotiated reply mode.
pub fn transmission_flags(device: &dyn BlockDevice, mode: ReplyMode) -> u16 {
    let caps = device.capabilities();
    let mut flags = TFLAG_HAS_FLAGS;
    let mut set = |on: bool, flag: u16| {
        if on {
            flags |= flag;
        }
    };
    set(caps.read_only, TFLAG_READ_ONLY);
    set(caps.flush, TFLAG_SEND_FLUSH);
    set(caps.fua, TFLAG_SEND_FUA);
    set(caps.rotational, TFLAG_ROTATIONAL);
    set(caps.trim, TFLAG_SEND_TRIM);
    set(caps.write_zeroes, TFLAG_SEND_WRITE_ZEROES);
    set(caps.write_zeroes && caps.fast_zero, TFLAG_SEND_FAST_ZERO);
    set(mode != ReplyMode::Simple, TFLAG_SEND_DF);
    set(caps.multi_conn, TFLAG_CAN_MULTI_CONN);
    set(caps.cache, TFLAG_SEND_CACHE);
    flags
}

async fn export_name<W: AsyncWrite + Unpin>(
    writer: &mut W,
    exports: &Exports,
    state: &State,
    data: &[u8],
) -> Result<Session, HandshakeError> {
    if state.extended {
        return Err(HandshakeError::Protocol(
            "NBD_OPT_EXPORT_NAME after extended headers".into(),
        ));
    }
    let name = String::from_utf8_lossy(data);
    // This option has no way to report an error: the spec's answer is to disconnect.
    let export = exports
        .find(&name)
        .await
        .ok_or_else(|| HandshakeError::Protocol(format!("unknown export {name:?}")))?;
    let mode = state.mode();
    let flags = transmission_flags(export.device.as_ref(), mode);
    let mut b = BytesMut::with_capacity(134);
    b.put_u64(export.device.size());
    b.put_u16(flags);
    if !state.no_zeroes {
        b.put_bytes(0, 124);
    }
    writer.write_all(&b).await?;
    writer.flush().await?;
    let base_allocation = meta_selected_for(state, exports, &export).await;
    Ok(Session {
        export,
        mode,
        base_allocation,
        transmission_flags: flags,
    })
}

async fn list<W: AsyncWrite + Unpin>(
    writer: &mut W,
    exports: &Exports,
    data: &[u8],
) -> io::Result<()> {
    if !data.is_empty() {
        return reply_error(
            writer,
            OPT_LIST,
            REP_ERR_INVALID,
            "NBD_OPT_LIST takes no data",
        )
        .await;
    }
    for (name, description) in exports.list().await {
        let mut p = BytesMut::new();
        p.put_u32(name.len() as u32);
        p.put_slice(name.as_bytes());
        p.put_slice(truncate_utf8(&description, MAX_STRING).as_bytes());
        writer
            .write_all(&option_reply(OPT_LIST, REP_SERVER, &p))
            .await?;
    }
    writer
        .write_all(&option_reply(OPT_LIST, REP_ACK, &[]))
        .await
}

/// A cursor over option data that refuses to read past its end.
struct OptionData<'a> {
    data: &'a [u8],
}

impl<'a> OptionData<'a> {
    fn u16(&mut self) -> Option<u16> {
        let (head, rest) = self.data.split_first_chunk::<2>()?;
        self.data = rest;
        Some(u16::from_be_bytes(*head))
    }

    fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.data.split_first_chunk::<4>()?;
        self.data = rest;
        Some(u32::from_be_bytes(*head))
    }

    /// A u32-length-prefixed string, at most the protocol's 4096 bytes.
    fn string(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        if len > MAX_STRING || len > self.data.len() {
            return None;
        }
        let (s, rest) = self.data.split_at(len);
        self.data = rest;
        String::from_utf8(s.to_vec()).ok()
    }
}

async fn info_or_go<W: AsyncWrite + Unpin>(
    writer: &mut W,
    exports: &Exports,
    state: &mut State,
    option: u32,
    data: &[u8],
) -> io::Result<Option<Session>> {
    let mut cursor = OptionData { data };
    let parsed = (|| {
        let name = cursor.string()?;
        let count = cursor.u16()? as usize;
        let mut requests = Vec::with_capacity(count.min(16));
        for _ in 0..count {
            requests.push(cursor.u16()?);
        }
        cursor.data.is_empty().then_some((name, requests))
    })();
    let Some((name, requests)) = parsed else {
        reply_error(
            writer,
            option,
            REP_ERR_INVALID,
            "malformed NBD_OPT_INFO/GO data",
        )
        .await?;
        return Ok(None);
    };
    let Some(export) = exports.find(&name).await else {
        let msg = format!("no export named {name:?}");
        reply_error(writer, option, REP_ERR_UNKNOWN, &msg).await?;
        return Ok(None);
    };
    let device = export.device.as_ref();
    let mode = state.mode();
    let flags = transmission_flags(device, mode);

    let mut info = BytesMut::new();
    info.put_u16(INFO_EXPORT);
    info.put_u64(device.size());
    info.put_u16(flags);
    writer
        .write_all(&option_reply(option, REP_INFO, &info))
        .await?;

    // Block sizes are always sent: the client may ignore them, and qemu uses them if present.
    let sizes = device.block_sizes();
    let mut info = BytesMut::new();
    info.put_u16(INFO_BLOCK_SIZE);
    info.put_u32(sizes.minimum);
    info.put_u32(sizes.preferred);
    info.put_u32(sizes.maximum);
    writer
        .write_all(&option_reply(option, REP_INFO, &info))
        .await?;

    if requests.contains(&INFO_NAME) {
        let mut info = BytesMut::new();
        info.put_u16(INFO_NAME);
        info.put_slice(export.name.as_bytes());
        writer
            .write_all(&option_reply(option, REP_INFO, &info))
            .await?;
    }
    if requests.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
        let mut info = BytesMut::new();
        info.put_u16(INFO_DESCRIPTION);
        info.put_slice(truncate_utf8(&export.description, MAX_STRING).as_bytes());
        writer
            .write_all(&option_reply(option, REP_INFO, &info))
            .await?;
    }
    writer
        .write_all(&option_reply(option, REP_ACK, &[]))
        .await?;
    writer.flush().await?;

    if option == OPT_INFO {
        return Ok(None);
    }
    let base_allocation = meta_selected_for(state, exports, &export).await;
    Ok(Some(Session {
        export,
        mode,
        base_allocation,
        transmission_flags: flags,
    }))
}

async fn meta_context<W: AsyncWrite + Unpin>(
    writer: &mut W,
    exports: &Exports,
    state: &mut State,
    option: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut cursor = OptionData { data };
    let parsed = (|| {
        let name = cursor.string()?;
        let count = cursor.u32()? as usize;
        let mut queries = Vec::new();
        for _ in 0..count {
            queries.push(cursor.string()?);
        }
        cursor.data.is_empty().then_some((name, queries))
    })();
    let Some((name, queries)) = parsed else {
        return reply_error(
            writer,
            option,
            REP_ERR_INVALID,
            "malformed meta context data",
        )
        .await;
    };
    let setting = option == OPT_SET_META_CONTEXT;
    if setting && !state.structured {
        return reply_error(
            writer,
            option,
            REP_ERR_INVALID,
            "negotiate structured replies before NBD_OPT_SET_META_CONTEXT",
        )
        .await;
    }
    if exports.find(&name).await.is_none() {
        let msg = format!("no export named {name:?}");
        return reply_error(writer, option, REP_ERR_UNKNOWN, &msg).await;
    }
    // We offer exactly one context. LIST with no queries, or a "base:" query, lists it too.
    let selects_base = |q: &str| q == META_CONTEXT_BASE_ALLOCATION || (!setting && q == "base:");
    let matched = if queries.is_empty() {
        !setting
    } else {
        queries.iter().any(|q| selects_base(q))
    };
    if matched {
        let mut p = BytesMut::new();
        p.put_u32(BASE_ALLOCATION_ID);
        p.put_slice(META_CONTEXT_BASE_ALLOCATION.as_bytes());
        writer
            .write_all(&option_reply(option, REP_META_CONTEXT, &p))
            .await?;
    }
    if setting {
        state.meta_export = Some(name);
        state.base_allocation = matched;
    }
    writer.write_all(&option_reply(option, REP_ACK, &[])).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn option_request(option: u32, data: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b
    }

    /// The reply types the server sent, in order.
    fn reply_types(sent: &[u8]) -> Vec<u32> {
        let mut types = Vec::new();
        let mut at = 0;
        while at + 20 <= sent.len() {
            types.push(u32::from_be_bytes(
                sent[at + 12..at + 16].try_into().unwrap(),
            ));
            let length = u32::from_be_bytes(sent[at + 16..at + 20].try_into().unwrap());
            at += 20 + length as usize;
        }
        types
    }

    async fn run(
        requests: &[(u32, &[u8])],
        tls: TlsPhase,
    ) -> (Result<Negotiated, HandshakeError>, Vec<u32>) {
        let input: Vec<u8> = requests
            .iter()
            .flat_map(|(o, d)| option_request(*o, d))
            .collect();
        let mut reader = Cursor::new(input);
        let mut sent = Vec::new();
        let flags = ClientFlags {
            fixed_newstyle: true,
            no_zeroes: true,
        };
        let exports = Exports::new(Vec::new());
        let result = options(&mut reader, &mut sent, &exports, flags, tls).await;
        (result, reply_types(&sent))
    }

    #[tokio::test]
    async fn starttls_is_acknowledged_once_and_refused_after_or_without_tls() {
        let (result, replies) = run(&[(OPT_STARTTLS, &[])], TlsPhase::Offered).await;
        assert!(matches!(result, Ok(Negotiated::StartTls)));
        assert_eq!(replies, [REP_ACK]);

        let (result, replies) = run(&[(OPT_STARTTLS, &[])], TlsPhase::Active).await;
        assert!(matches!(result, Ok(Negotiated::Ended)));
        assert_eq!(replies, [REP_ERR_INVALID], "a second STARTTLS");

        let (_, replies) = run(&[(OPT_STARTTLS, &[])], TlsPhase::Unavailable).await;
        assert_eq!(replies, [REP_ERR_POLICY]);

        let (_, replies) = run(&[(OPT_STARTTLS, b"x")], TlsPhase::Offered).await;
        assert_eq!(replies, [REP_ERR_INVALID], "STARTTLS with data");
    }

    #[tokio::test]
    async fn a_server_that_requires_tls_answers_nothing_else_in_clear() {
        let (result, replies) = run(
            &[
                (OPT_LIST, &[]),
                (OPT_STRUCTURED_REPLY, &[]),
                (OPT_GO, &[0, 0, 0, 0, 0, 0]),
                (OPT_STARTTLS, &[]),
            ],
            TlsPhase::Required,
        )
        .await;
        assert!(matches!(result, Ok(Negotiated::StartTls)));
        assert_eq!(
            replies,
            [
                REP_ERR_TLS_REQD,
                REP_ERR_TLS_REQD,
                REP_ERR_TLS_REQD,
                REP_ACK
            ]
        );
        let (result, _) = run(&[(OPT_EXPORT_NAME, &[])], TlsPhase::Required).await;
        assert!(
            matches!(result, Err(HandshakeError::Protocol(_))),
            "EXPORT_NAME has no error reply: the session ends"
        );
    }
}
