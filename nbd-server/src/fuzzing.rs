//! Entry points for the fuzz targets in `fuzz/` (and their regression tests): whatever bytes a
//! client sends, the server answers or closes the connection, and never panics or hangs.

use crate::exports::{Export, Exports};
use crate::handshake::{Negotiated, TlsPhase, greet, negotiate, options};
use crate::proto::{ReplyMode, chunk_header, decode_request};
use std::io::Cursor;
use std::sync::{Arc, OnceLock};
use tokio::sync::watch;

/// A 1 MiB volume in a temporary directory, shared by every input of the process.
fn exports() -> &'static Exports {
    static EXPORTS: OnceLock<Exports> = OnceLock::new();
    EXPORTS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("bucketdisk-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("fuzz store directory");
        let volume = engine::FileVolume::create(&dir, "disk", 1 << 20, 4096).expect("fuzz volume");
        Exports::new(vec![Export::new(
            "disk".into(),
            "fuzzed".into(),
            Arc::new(volume),
        )])
    })
}

/// One client session: `input` is everything the client sends (handshake, then requests).
pub fn nbd_session(input: &[u8]) {
    replies_to(input);
}

/// Runs `future` to its end on a runtime of its own (one fuzz input, one runtime).
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

/// Runs [`nbd_session`]; the bytes the server sent in the transmission phase.
fn replies_to(input: &[u8]) -> usize {
    let input = input.to_vec();
    block_on(async move {
        let mut reader = Cursor::new(input);
        let mut writer = tokio::io::sink();
        let Ok(Some(session)) = negotiate(&mut reader, &mut writer, exports()).await else {
            return 0;
        };
        let (_stop, shutdown) = watch::channel(false);
        let (replies, counted) = tokio::io::duplex(1 << 16);
        let drained = tokio::spawn(async move {
            let mut counted = counted;
            tokio::io::copy(&mut counted, &mut tokio::io::sink()).await
        });
        let budget = crate::limits::Budget::new(crate::limits::DEFAULT_MEMORY);
        let _ = crate::transmission::serve(reader, replies, session, budget, shutdown).await;
        drained.await.ok().and_then(Result::ok).unwrap_or(0) as usize
    })
}

/// The option phase of a server that offers or requires TLS, or of a connection already
/// encrypted: `input`'s first byte picks which, the rest is what the client sends. Besides
/// never panicking: under `--tls require` no export is ever reached in clear, and once
/// encrypted `STARTTLS` is never taken again.
pub fn nbd_tls_options(input: &[u8]) {
    match tls_option_phase(input) {
        Some((TlsPhase::Required, Outcome::Session(export))) => {
            panic!("export {export} reached in clear under --tls require")
        }
        Some((TlsPhase::Active, Outcome::StartTls)) => {
            panic!("STARTTLS taken on a connection already encrypted")
        }
        _ => {}
    }
}

/// How an option phase ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// On to transmission, with this export.
    Session(String),
    StartTls,
    /// Ended, or failed.
    Other,
}

/// Runs the option phase [`nbd_tls_options`] describes; `None` if the greeting failed.
fn tls_option_phase(input: &[u8]) -> Option<(TlsPhase, Outcome)> {
    let (&selector, client) = input.split_first()?;
    let phase = match selector % 3 {
        0 => TlsPhase::Offered,
        1 => TlsPhase::Required,
        _ => TlsPhase::Active,
    };
    let client = client.to_vec();
    block_on(async move {
        let mut reader = Cursor::new(client);
        let mut writer = tokio::io::sink();
        let flags = greet(&mut reader, &mut writer).await.ok()??;
        let outcome = match options(&mut reader, &mut writer, exports(), flags, phase).await {
            Ok(Negotiated::Session(s)) => Outcome::Session(s.export.name.clone()),
            Ok(Negotiated::StartTls) => Outcome::StartTls,
            _ => Outcome::Other,
        };
        Some((phase, outcome))
    })
}

/// Request headers decode without panicking, and reply headers encode into the layout the
/// spec gives (checked field by field).
pub fn nbd_frames(input: &[u8]) {
    for extended in [false, true] {
        if let Some(header) = decode_request(input, extended) {
            assert!(input.len() >= if extended { 32 } else { 28 });
            assert_eq!(u16::from_be_bytes([input[6], input[7]]), header.command);
        }
    }
    let Some(fields) = input.get(..30) else {
        return;
    };
    let be = |range: std::ops::Range<usize>| {
        fields[range]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    };
    let (flags, kind, cookie, offset, len) = (
        be(0..2) as u16,
        be(2..4) as u16,
        be(4..12),
        be(12..20),
        be(20..28),
    );
    for mode in [ReplyMode::Structured, ReplyMode::Extended] {
        let encoded = chunk_header(mode, flags, kind, cookie, offset, len);
        let read = |at: usize, n: usize| {
            encoded[at..at + n]
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
        };
        assert_eq!(read(4, 2) as u16, flags);
        assert_eq!(read(6, 2) as u16, kind);
        assert_eq!(read(8, 8), cookie);
        match mode {
            ReplyMode::Extended => {
                assert_eq!(encoded.len(), 32);
                assert_eq!(read(16, 8), offset);
                assert_eq!(read(24, 8), len);
            }
            _ => {
                assert_eq!(encoded.len(), 20);
                assert_eq!(read(16, 4), len & 0xffff_ffff);
            }
        }
    }
}

/// Seed inputs for the targets above: whole client sessions of the kinds real clients open,
/// and request and reply headers. `(target, name, bytes)`.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    use crate::proto::*;
    let option = |b: &mut Vec<u8>, option: u32, data: &[u8]| {
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
    };
    let name = |name: &str| {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d
    };
    let go = |export: &str| {
        let mut d = name(export);
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d
    };
    let meta = |export: &str| {
        let mut d = name(export);
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&name(META_CONTEXT_BASE_ALLOCATION));
        d
    };
    let request = |b: &mut Vec<u8>, extended: bool, command: u16, offset: u64, length: u64| {
        if extended {
            b.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        } else {
            b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&command.to_be_bytes());
        b.extend_from_slice(&7u64.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        if extended {
            b.extend_from_slice(&length.to_be_bytes());
        } else {
            b.extend_from_slice(&(length as u32).to_be_bytes());
        }
        if command == CMD_WRITE {
            b.extend(std::iter::repeat_n(0xa5u8, length as usize));
        }
    };
    let transmission = |b: &mut Vec<u8>, extended: bool| {
        request(b, extended, CMD_WRITE, 4096, 4096);
        request(b, extended, CMD_READ, 0, 8192);
        request(b, extended, CMD_TRIM, 0, 4096);
        request(b, extended, CMD_WRITE_ZEROES, 8192, 4096);
        request(b, extended, CMD_BLOCK_STATUS, 0, 1 << 20);
        request(b, extended, CMD_FLUSH, 0, 0);
        request(b, extended, CMD_READ, (1 << 20) - 512, 4096);
        request(b, extended, CMD_DISC, 0, 0);
    };
    let flags = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes();
    let mut seeds = Vec::new();

    let mut b = flags.to_vec();
    option(&mut b, OPT_EXPORT_NAME, b"disk");
    transmission(&mut b, false);
    seeds.push(("nbd_session", "export-name-simple".to_string(), b));

    let mut b = flags.to_vec();
    option(&mut b, OPT_LIST, &[]);
    option(&mut b, OPT_INFO, &go(""));
    option(&mut b, OPT_STRUCTURED_REPLY, &[]);
    option(&mut b, OPT_SET_META_CONTEXT, &meta("disk"));
    option(&mut b, OPT_GO, &go("disk"));
    transmission(&mut b, false);
    seeds.push(("nbd_session", "go-structured-meta".to_string(), b));

    let mut b = flags.to_vec();
    option(&mut b, OPT_EXTENDED_HEADERS, &[]);
    option(&mut b, OPT_LIST_META_CONTEXT, &meta("disk"));
    option(&mut b, OPT_SET_META_CONTEXT, &meta("disk"));
    option(&mut b, OPT_GO, &go("disk"));
    transmission(&mut b, true);
    seeds.push(("nbd_session", "go-extended".to_string(), b));

    let mut b = flags.to_vec();
    option(&mut b, OPT_STARTTLS, &[]);
    option(&mut b, 0x7777, b"unknown");
    option(&mut b, OPT_ABORT, &[]);
    seeds.push(("nbd_session", "starttls-unknown-abort".to_string(), b));

    // The TLS option phase: [phase selector] then what follows the greeting.
    for (selector, phase) in [(0u8, "offered"), (1, "required"), (2, "active")] {
        let mut b = vec![selector];
        b.extend_from_slice(&flags);
        option(&mut b, OPT_LIST, &[]);
        option(&mut b, OPT_GO, &go("disk"));
        seeds.push(("nbd_tls_options", format!("{phase}-list-go"), b));
        let mut b = vec![selector];
        b.extend_from_slice(&flags);
        option(&mut b, OPT_EXPORT_NAME, b"disk");
        seeds.push(("nbd_tls_options", format!("{phase}-export-name"), b));
        let mut b = vec![selector];
        b.extend_from_slice(&flags);
        option(&mut b, OPT_STARTTLS, &[]);
        option(&mut b, OPT_STARTTLS, b"data");
        option(&mut b, OPT_INFO, &go(""));
        seeds.push(("nbd_tls_options", format!("{phase}-starttls-twice"), b));
    }

    let mut b = Vec::new();
    request(&mut b, true, CMD_READ, 1 << 40, 1 << 20);
    b.extend_from_slice(&[0x55; 30]);
    seeds.push((
        "nbd_frames",
        "extended-read-and-reply-fields".to_string(),
        b,
    ));
    let mut b = Vec::new();
    request(&mut b, false, CMD_WRITE, 0, 0);
    b.extend_from_slice(&[0xff; 30]);
    seeds.push((
        "nbd_frames",
        "compact-write-and-reply-fields".to_string(),
        b,
    ));
    seeds
}

#[cfg(test)]
mod tests {
    use super::{Outcome, TlsPhase, tls_option_phase};

    /// The properties `nbd_tls_options` asserts can fail: the same options reach an export
    /// when TLS is only offered, and STARTTLS is taken when the connection is not encrypted.
    #[test]
    fn the_tls_seeds_reach_an_export_only_where_allowed() {
        for (target, name, input) in super::seeds() {
            if target != "nbd_tls_options" {
                continue;
            }
            let (phase, outcome) = tls_option_phase(&input).expect("greeted");
            let expected = match (phase, name.rsplit_once('-').map(|(_, last)| last)) {
                (TlsPhase::Offered | TlsPhase::Required, Some("twice")) => Outcome::StartTls,
                (TlsPhase::Required, _) => Outcome::Other,
                (_, Some("go") | Some("name")) => Outcome::Session("disk".into()),
                (_, _) => Outcome::Other,
            };
            assert_eq!(outcome, expected, "{name}");
        }
    }

    #[test]
    fn the_session_seeds_reach_the_transmission_phase() {
        for (target, name, input) in super::seeds() {
            if target == "nbd_session" && !name.contains("abort") {
                // Two 8 KiB and 4 KiB reads at least, besides the other replies.
                let sent = super::replies_to(&input);
                assert!(sent > 8192, "{name}: {sent} bytes of replies");
            }
        }
    }
}
