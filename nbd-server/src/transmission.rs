//! The transmission phase: read requests, run them concurrently, send replies as they finish.
//!
//! One task reads and validates requests in order; each valid request runs as its own task, so
//! replies go out of order; one writer task serialises reply bytes onto the socket. Memory is
//! bounded by a budget (its client's, shared by the client's connections: `limits`) acquired
//! *before* a request's payload is read. A malformed request gets
//! the error the spec asks for and the connection lives on; only lost framing closes it.

use crate::handshake::Session;
use crate::limits::Budget;
use crate::proto::*;
use bytes::{BufMut, Bytes, BytesMut};
use engine::{DeviceError, ExtentKind, ReadSegment, ZeroMode};
use std::io;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{OwnedSemaphorePermit, mpsc, watch};

/// Largest read or write payload accepted (and advertised through NBD_INFO_BLOCK_SIZE).
pub const MAX_PAYLOAD: u64 = engine::device::MAX_PAYLOAD as u64;
/// Most block status extents in one reply (the spec's suggested ceiling).
const MAX_EXTENTS: usize = 1 << 20;

/// A reply, as the buffers to write in order.
type Reply = Vec<Bytes>;

/// A reply on its way to the socket, holding its share of the memory budget until written.
struct Outgoing {
    reply: Reply,
    _budget: OwnedSemaphorePermit,
}

/// A request that passed validation, with its payload.
struct Request {
    header: RequestHeader,
    payload: Bytes,
}

/// Serves requests until the client disconnects, framing is lost, or `shutdown` fires. Replies
/// to every request already read are sent before this returns.
pub async fn serve<R, W>(
    mut reader: R,
    writer: W,
    session: Session,
    budget: Budget,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let session = Arc::new(session);
    let export = Arc::clone(&session.export);
    let (_counted, mut disconnect) = export.session_started();
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let writer_task = tokio::spawn(write_replies(writer, rx));
    let extended = session.mode == ReplyMode::Extended;
    let header_len = if extended {
        EXTENDED_REQUEST_LEN
    } else {
        COMPACT_REQUEST_LEN
    };

    let result: io::Result<()> = async {
        let mut buf = [0u8; EXTENDED_REQUEST_LEN];
        loop {
            let read = tokio::select! {
                r = reader.read_exact(&mut buf[..header_len]) => r,
                _ = shutdown.wait_for(|&stop| stop) => return Ok(()),
                // The export's sessions were ended (a restore of its volume).
                _ = disconnect.changed() => return Ok(()),
            };
            match read {
                Ok(_) => {}
                // A client that just goes away has ended the session; not an error.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            let Some(header) = decode_request(&buf[..header_len], extended) else {
                return Err(protocol_error("bad request magic; framing lost"));
            };
            // A WRITE always carries its data. With extended headers the spec also asks for
            // NBD_CMD_FLAG_PAYLOAD_LEN, but qemu's client omits it; the bytes are there either way.
            let has_payload = header.command == CMD_WRITE
                || (extended && header.flags & CMD_FLAG_PAYLOAD_LEN != 0);
            let payload_len = if has_payload { header.length } else { 0 };
            if payload_len > MAX_PAYLOAD {
                return Err(protocol_error(&format!(
                    "{} payload of {payload_len} bytes exceeds the {MAX_PAYLOAD}-byte maximum",
                    command_name(header.command)
                )));
            }
            let units = budget_units(&budget, &header, payload_len);
            let permit = Arc::clone(&budget.semaphore)
                .acquire_many_owned(units)
                .await
                .map_err(|_| io::Error::other("budget semaphore closed"))?;
            let payload = read_payload(&mut reader, payload_len as usize).await?;

            if header.command == CMD_DISC {
                return Ok(());
            }
            let request = Request { header, payload };
            match validate(&session, &request.header) {
                Err((error, message)) => {
                    tracing::debug!(
                        command = command_name(header.command),
                        offset = header.offset,
                        length = header.length,
                        "refused: {message}"
                    );
                    let _ = tx.send(Outgoing {
                        reply: error_reply(&session, &header, error, &message),
                        _budget: permit,
                    });
                }
                Ok(()) => {
                    let tx = tx.clone();
                    let session = Arc::clone(&session);
                    tokio::spawn(async move {
                        let reply = execute(&session, request).await;
                        // The writer only goes away when the socket is dead; nothing to tell.
                        let _ = tx.send(Outgoing {
                            reply,
                            _budget: permit,
                        });
                    });
                }
            }
        }
    }
    .await;

    // Let in-flight requests finish: the writer ends once every sender is dropped.
    drop(tx);
    let written = writer_task
        .await
        .map_err(|e| io::Error::other(format!("reply writer failed: {e}")))?;
    result.and(written)
}

/// Reads exactly `len` payload bytes into a fresh buffer without zero-filling it first.
async fn read_payload<R: AsyncRead + Unpin>(reader: &mut R, len: usize) -> io::Result<Bytes> {
    let mut payload = BytesMut::with_capacity(len);
    while payload.len() < len {
        let remaining = len - payload.len();
        if reader
            .read_buf(&mut (&mut payload).limit(remaining))
            .await?
            == 0
        {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(payload.freeze())
}

fn protocol_error(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_string())
}

/// Budget units a request holds while in flight: its payload or read buffer, at least one.
fn budget_units(budget: &Budget, header: &RequestHeader, payload_len: u64) -> u32 {
    let bytes = if header.command == CMD_READ {
        header.length.min(MAX_PAYLOAD)
    } else {
        payload_len
    };
    budget.units_for(bytes)
}

async fn write_replies<W: AsyncWrite + Unpin>(
    writer: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) -> io::Result<()> {
    let mut out = BufWriter::with_capacity(256 * 1024, writer);
    while let Some(outgoing) = rx.recv().await {
        for buf in &outgoing.reply {
            out.write_all(buf).await?;
        }
        // Batch replies that are already waiting; flush once the queue is empty.
        if rx.is_empty() {
            out.flush().await?;
        }
    }
    out.flush().await?;
    out.shutdown().await
}

/// Checks flags, command support and ranges. Errors carry the wire error and a message.
fn validate(session: &Session, h: &RequestHeader) -> Result<(), (NbdError, String)> {
    use NbdError::*;
    let tflags = session.transmission_flags;
    let advertised = |flag: u16| tflags & flag != 0;
    let size = session.export.device.size();
    let extended = session.mode == ReplyMode::Extended;

    let allowed_flags = match h.command {
        CMD_READ => CMD_FLAG_DF,
        CMD_WRITE => CMD_FLAG_FUA | CMD_FLAG_PAYLOAD_LEN,
        CMD_FLUSH | CMD_CACHE => 0,
        CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        other => return Err((Inval, format!("unknown command {other}"))),
    };
    let name = command_name(h.command);
    if h.flags & !allowed_flags != 0 {
        return Err((Inval, format!("{name}: invalid flags {:#x}", h.flags)));
    }
    if h.flags & CMD_FLAG_PAYLOAD_LEN != 0 && !extended {
        return Err((
            Inval,
            "NBD_CMD_FLAG_PAYLOAD_LEN without extended headers".into(),
        ));
    }
    // Before the advertised-flag checks, so a FUA write on a read-only export gets EPERM.
    let writes = matches!(h.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && advertised(TFLAG_READ_ONLY) {
        return Err((Perm, format!("{name} on a read-only export")));
    }
    let needs = |flag: u16, what: &str| {
        if advertised(flag) {
            Ok(())
        } else {
            Err((Inval, format!("{what} was not advertised for this export")))
        }
    };
    if h.flags & CMD_FLAG_FUA != 0 {
        needs(TFLAG_SEND_FUA, "FUA")?;
    }
    if h.flags & CMD_FLAG_DF != 0 {
        needs(TFLAG_SEND_DF, "DF")?;
    }
    if h.flags & CMD_FLAG_FAST_ZERO != 0 {
        needs(TFLAG_SEND_FAST_ZERO, "FAST_ZERO")?;
    }
    match h.command {
        CMD_FLUSH => return needs(TFLAG_SEND_FLUSH, "FLUSH"),
        CMD_TRIM => needs(TFLAG_SEND_TRIM, "TRIM")?,
        CMD_WRITE_ZEROES => needs(TFLAG_SEND_WRITE_ZEROES, "WRITE_ZEROES")?,
        CMD_CACHE => needs(TFLAG_SEND_CACHE, "CACHE")?,
        CMD_BLOCK_STATUS if !session.base_allocation => {
            return Err((
                Inval,
                "BLOCK_STATUS without a negotiated meta context".into(),
            ));
        }
        _ => {}
    }
    if h.length == 0 {
        return Err((Inval, format!("{name} of zero length")));
    }
    if h.command == CMD_READ && h.length > MAX_PAYLOAD {
        let error = if extended && h.length > u64::from(u32::MAX) {
            Overflow
        } else {
            Inval
        };
        return Err((
            error,
            format!("READ of {} bytes exceeds {MAX_PAYLOAD}", h.length),
        ));
    }
    let end = h.offset.checked_add(h.length);
    if end.is_none_or(|end| end > size) {
        let error = if matches!(h.command, CMD_WRITE | CMD_WRITE_ZEROES) {
            NoSpc
        } else {
            Inval
        };
        return Err((
            error,
            format!(
                "{name} at {}+{} is beyond the end of the {size}-byte export",
                h.offset, h.length
            ),
        ));
    }
    Ok(())
}

/// The one place device errors become wire errors. A request past the end is ENOSPC (the
/// spec's choice for writes; reads past the end are refused before they reach the device). A
/// fenced volume, an unavailable store and corrupt data are all EIO: the client cannot act on
/// the difference, and the server's log says which it was.
fn device_error(e: &DeviceError) -> NbdError {
    match e {
        DeviceError::NotSupported(_) => NbdError::NotSup,
        DeviceError::ReadOnly => NbdError::Perm,
        DeviceError::OutOfRange { .. } | DeviceError::NoSpace(_) => NbdError::NoSpc,
        DeviceError::Invalid(_) => NbdError::Inval,
        DeviceError::Fenced(_)
        | DeviceError::StoreUnavailable(_)
        | DeviceError::Corrupt(_)
        | DeviceError::Io(_) => NbdError::Io,
    }
}

async fn execute(session: &Session, request: Request) -> Reply {
    let started = Instant::now();
    let h = request.header;
    let outcome = dispatch(session, request).await;
    session
        .export
        .metrics
        .record(h.command, h.length, started.elapsed(), outcome.is_ok());
    match outcome {
        Ok(reply) => reply,
        Err(e) => failed(session, &h, &e),
    }
}

/// Runs a validated request on the device; the reply on success.
async fn dispatch(session: &Session, request: Request) -> Result<Reply, DeviceError> {
    let h = request.header;
    let device = session.export.device.as_ref();
    let fua = h.flags & CMD_FLAG_FUA != 0;
    match h.command {
        CMD_READ => {
            let segments = device.read(h.offset, h.length as u32).await?;
            return Ok(read_reply(session, &h, segments));
        }
        CMD_BLOCK_STATUS => {
            let extents = device.block_status(h.offset, h.length).await?;
            return Ok(block_status_reply(session, &h, extents));
        }
        CMD_WRITE => device.write(h.offset, request.payload, fua).await?,
        CMD_FLUSH => device.flush().await?,
        CMD_TRIM => device.trim(h.offset, h.length, fua).await?,
        CMD_WRITE_ZEROES => {
            let mode = ZeroMode {
                may_trim: h.flags & CMD_FLAG_NO_HOLE == 0,
                fast_only: h.flags & CMD_FLAG_FAST_ZERO != 0,
            };
            device.write_zeroes(h.offset, h.length, mode, fua).await?
        }
        CMD_CACHE => device.cache(h.offset, h.length).await?,
        _ => return Err(DeviceError::Invalid("unknown command".into())),
    }
    Ok(success_reply(session, &h))
}

fn failed(session: &Session, h: &RequestHeader, e: &DeviceError) -> Reply {
    let error = device_error(e);
    let name = command_name(h.command);
    match error {
        // Expected outcomes of a valid request: worth a debug line, not a warning.
        NbdError::NotSup | NbdError::NoSpc | NbdError::Perm | NbdError::Inval => {
            tracing::debug!(command = name, offset = h.offset, length = h.length, "{e}");
        }
        _ => tracing::warn!(command = name, offset = h.offset, length = h.length, "{e}"),
    }
    error_reply(session, h, error, &format!("{name} failed: {e}"))
}

fn success_reply(session: &Session, h: &RequestHeader) -> Reply {
    match session.mode {
        ReplyMode::Extended => vec![
            chunk_header(
                session.mode,
                REPLY_FLAG_DONE,
                REPLY_TYPE_NONE,
                h.cookie,
                h.offset,
                0,
            )
            .freeze(),
        ],
        _ => vec![simple_reply(0, h.cookie)],
    }
}

fn error_reply(session: &Session, h: &RequestHeader, error: NbdError, message: &str) -> Reply {
    match session.mode {
        ReplyMode::Simple => vec![simple_reply(error as u32, h.cookie)],
        mode => {
            let payload = error_payload(error, message);
            let header = chunk_header(
                mode,
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                h.cookie,
                h.offset,
                payload.len() as u64,
            );
            vec![header.freeze(), payload]
        }
    }
}

fn read_reply(session: &Session, h: &RequestHeader, segments: Vec<ReadSegment>) -> Reply {
    let mode = session.mode;
    let no_fragments = h.flags & CMD_FLAG_DF != 0;
    if mode == ReplyMode::Simple || no_fragments {
        let data = flatten(segments, h.length as usize);
        let mut reply = if mode == ReplyMode::Simple {
            vec![simple_reply(0, h.cookie)]
        } else {
            let mut header = chunk_header(
                mode,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                h.cookie,
                h.offset,
                8 + data.len() as u64,
            );
            header.put_u64(h.offset);
            vec![header.freeze()]
        };
        reply.push(data);
        return reply;
    }
    let mut reply = Vec::with_capacity(segments.len() * 2);
    let last = segments.len().saturating_sub(1);
    let mut offset = h.offset;
    for (i, segment) in segments.into_iter().enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        match segment {
            ReadSegment::Data(data) => {
                let mut header = chunk_header(
                    mode,
                    flags,
                    REPLY_TYPE_OFFSET_DATA,
                    h.cookie,
                    h.offset,
                    8 + data.len() as u64,
                );
                header.put_u64(offset);
                offset += data.len() as u64;
                reply.push(header.freeze());
                reply.push(data);
            }
            ReadSegment::Zero(len) => {
                let mut header =
                    chunk_header(mode, flags, REPLY_TYPE_OFFSET_HOLE, h.cookie, h.offset, 12);
                header.put_u64(offset);
                header.put_u32(len as u32);
                offset += len;
                reply.push(header.freeze());
            }
        }
    }
    reply
}

/// Joins read segments into one buffer, zero runs materialised.
fn flatten(segments: Vec<ReadSegment>, length: usize) -> Bytes {
    if let [ReadSegment::Data(only)] = segments.as_slice() {
        return only.clone();
    }
    let mut out = BytesMut::with_capacity(length);
    for segment in segments {
        match segment {
            ReadSegment::Data(d) => out.put_slice(&d),
            ReadSegment::Zero(n) => out.put_bytes(0, n as usize),
        }
    }
    out.freeze()
}

fn block_status_reply(session: &Session, h: &RequestHeader, extents: Vec<engine::Extent>) -> Reply {
    let req_one = h.flags & CMD_FLAG_REQ_ONE != 0;
    // Descriptors never reach past the request, and compact ones must fit in 32 bits.
    let mut descriptors: Vec<(u64, u32)> = Vec::new();
    let mut covered = 0u64;
    for extent in extents {
        if covered >= h.length || extent.length == 0 {
            break;
        }
        let length = extent.length.min(h.length - covered);
        let state = match extent.kind {
            ExtentKind::Data => 0,
            ExtentKind::Hole => STATE_HOLE | STATE_ZERO,
            ExtentKind::Zero => STATE_ZERO,
        };
        covered += length;
        match descriptors.last_mut() {
            Some(last) if last.1 == state => last.0 += length,
            _ => descriptors.push((length, state)),
        }
        if req_one || descriptors.len() >= MAX_EXTENTS {
            break;
        }
    }
    if descriptors.is_empty() {
        let error = DeviceError::Io(io::Error::other("device reported no extents"));
        return failed(session, h, &error);
    }
    if req_one {
        descriptors.truncate(1);
    }
    let mode = session.mode;
    let mut payload = BytesMut::new();
    payload.put_u32(BASE_ALLOCATION_ID);
    let reply_type = if mode == ReplyMode::Extended {
        payload.put_u32(descriptors.len() as u32);
        for (length, state) in &descriptors {
            payload.put_u64(*length);
            payload.put_u64(u64::from(*state));
        }
        REPLY_TYPE_BLOCK_STATUS_EXT
    } else {
        for (length, state) in &descriptors {
            payload.put_u32(*length as u32);
            payload.put_u32(*state);
        }
        REPLY_TYPE_BLOCK_STATUS
    };
    let header = chunk_header(
        mode,
        REPLY_FLAG_DONE,
        reply_type,
        h.cookie,
        h.offset,
        payload.len() as u64,
    );
    vec![header.freeze(), payload.freeze()]
}
