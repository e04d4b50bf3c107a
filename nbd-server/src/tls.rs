//! TLS for NBD's `STARTTLS`: the server's credentials — an X.509 certificate and key, with a CA
//! that client certificates must chain to when peers are verified, or pre-shared keys in
//! psktool's `identity:hexkey` format — loaded into an OpenSSL context, and the handshake of
//! one connection.
//!
//! OpenSSL rather than rustls: rustls has no external pre-shared keys, and the clients this
//! server must talk to (libnbd, qemu, fio's nbd engine: all GnuTLS) use them. As nbdkit does, a
//! server is either X.509 or PSK: a context that holds a certificate prefers non-SHA-256 TLS 1.3
//! suites, under which OpenSSL drops a SHA-256 PSK.
//!
//! [`Tls::reload`] (SIGHUP) builds a new context from the same files and swaps it in: handshakes
//! after it use the new one, connections already up keep theirs, and a reload that fails keeps
//! the old context and says why.

use crate::secret::{SecretError, read_secret};
use foreign_types::ForeignTypeRef;
use openssl::ex_data::Index;
use openssl::pkey::PKey;
use openssl::ssl::{
    Ssl, SslContext, SslContextBuilder, SslMethod, SslOptions, SslRef, SslSessionCacheMode,
    SslVerifyMode, SslVersion,
};
use openssl::x509::X509Name;
use std::collections::HashMap;
use std::fmt;
use std::os::raw::c_int;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::RwLock;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_openssl::SslStream;

/// How long a client has to finish the TLS handshake after `STARTTLS`.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// TLS 1.3 suites, in the server's order of preference: AES-128-GCM first (with AES
/// instructions the cheapest for both ends at disk speeds); the SHA-256 ones first, the hash
/// OpenSSL gives a PSK from its callback.
const TLS13_SUITES: &str =
    "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384";

/// Whether a server offers TLS, and whether it insists on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// `STARTTLS` is refused (`ERR_POLICY`).
    Off,
    /// Clients may upgrade with `STARTTLS`, or use the exports in clear.
    On,
    /// Every option but `STARTTLS` and `ABORT` is answered `ERR_TLS_REQD` until TLS is up.
    Require,
}

/// Where the server's credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    X509 {
        cert: PathBuf,
        key: PathBuf,
        /// CA certificates client certificates are checked against.
        ca: Option<PathBuf>,
        /// Ask every client for a certificate signed by `ca`, and refuse those without one.
        verify_peer: bool,
    },
    /// A psktool file: `identity:hexkey` lines.
    Psk { file: PathBuf },
}

impl Credentials {
    /// What they are, for the log (file names, never keys).
    pub fn describe(&self) -> String {
        match self {
            Credentials::X509 {
                cert,
                ca,
                verify_peer,
                ..
            } => format!(
                "certificate {}{}",
                cert.display(),
                match (ca, verify_peer) {
                    (Some(ca), true) =>
                        format!(", client certificates required (CA {})", ca.display()),
                    (Some(ca), false) => format!(", CA {}", ca.display()),
                    (None, _) => String::new(),
                }
            ),
            Credentials::Psk { file } => format!("pre-shared keys {}", file.display()),
        }
    }

    /// The layout qemu and nbdkit read: `server-cert.pem`, `server-key.pem` and (for client
    /// certificates) `ca-cert.pem` in `dir`.
    pub fn from_dir(dir: &Path, verify_peer: bool) -> Credentials {
        let ca = dir.join("ca-cert.pem");
        Credentials::X509 {
            cert: dir.join("server-cert.pem"),
            key: dir.join("server-key.pem"),
            ca: ca.exists().then_some(ca),
            verify_peer,
        }
    }
}

/// What went wrong setting up TLS or one connection's handshake.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("{path} line {line}: {problem}")]
    PskFile {
        path: PathBuf,
        line: usize,
        problem: &'static str,
    },
    #[error("{path}: no keys in it")]
    NoKeys { path: PathBuf },
    #[error("--tls-verify-peer needs the CA client certificates are checked against (--tls-ca)")]
    VerifyWithoutCa,
    #[error("{what}: {source}")]
    OpenSsl {
        what: String,
        source: openssl::error::ErrorStack,
    },
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
    #[error("TLS handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
}

fn openssl_error(what: impl fmt::Display) -> impl FnOnce(openssl::error::ErrorStack) -> TlsError {
    let what = what.to_string();
    move |source| TlsError::OpenSsl { what, source }
}

/// A server's TLS: its mode and the context handshakes use.
pub struct Tls {
    mode: TlsMode,
    credentials: Credentials,
    context: RwLock<SslContext>,
    /// How long a client has to finish its handshake ([`HANDSHAKE_TIMEOUT`] by default).
    handshake_timeout: Duration,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the keys.
        f.debug_struct("Tls")
            .field("mode", &self.mode)
            .field("credentials", &self.credentials)
            .finish()
    }
}

impl Tls {
    /// Loads `credentials`; `mode` must not be [`TlsMode::Off`] (a server without TLS has no
    /// `Tls`).
    pub fn new(mode: TlsMode, credentials: Credentials) -> Result<Tls, TlsError> {
        let context = build_context(&credentials)?;
        Ok(Tls {
            mode,
            credentials,
            context: RwLock::new(context),
            handshake_timeout: HANDSHAKE_TIMEOUT,
        })
    }

    /// The same, giving clients `timeout` to finish their handshake.
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Tls {
        self.handshake_timeout = timeout;
        self
    }

    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// Reads the credentials' files again; on success new handshakes use them.
    pub fn reload(&self) -> Result<(), TlsError> {
        let context = build_context(&self.credentials)?;
        *self.context.write().unwrap_or_else(|e| e.into_inner()) = context;
        Ok(())
    }

    /// The server side of one connection's TLS handshake with `peer` (named in the log),
    /// time-limited.
    pub async fn accept<S>(&self, stream: S, peer: &str) -> Result<SslStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let context = self
            .context
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut ssl = Ssl::new(&context).map_err(openssl_error("starting a TLS session"))?;
        if let Some(index) = peer_index() {
            ssl.set_ex_data(index, peer.to_string());
        }
        let mut stream =
            SslStream::new(ssl, stream).map_err(openssl_error("starting a TLS session"))?;
        let timeout = self.handshake_timeout;
        match tokio::time::timeout(timeout, Pin::new(&mut stream).accept()).await {
            Err(_) => Err(TlsError::HandshakeTimeout(timeout)),
            Ok(Err(e)) => Err(TlsError::Handshake(describe_handshake_error(
                &e,
                stream.ssl(),
            ))),
            Ok(Ok(())) => Ok(stream),
        }
    }
}

/// A handshake error in one line: OpenSSL's reason (a bad certificate, an unknown PSK
/// identity, not TLS at all) rather than its error-stack dump, and for a refused client
/// certificate the check that failed.
fn describe_handshake_error(e: &openssl::ssl::Error, ssl: &SslRef) -> String {
    let why = openssl_reason(e);
    // OpenSSL's reason for a refused client certificate is only "certificate verify failed";
    // the check that failed (expired, not yet valid, unknown CA) is the verify result.
    let verified = ssl.verify_result();
    if verified == openssl::x509::X509VerifyResult::OK {
        why
    } else {
        format!("{why} (client certificate: {})", verified.error_string())
    }
}

/// OpenSSL's reasons for `e`, or what happened to the connection.
fn openssl_reason(e: &openssl::ssl::Error) -> String {
    if let Some(stack) = e.ssl_error() {
        let reasons: Vec<String> = stack
            .errors()
            .iter()
            .map(|e| e.reason().unwrap_or("unknown reason").to_string())
            .collect();
        if !reasons.is_empty() {
            return reasons.join("; ");
        }
    }
    match e.io_error() {
        Some(io) => io.to_string(),
        None if e.code() == openssl::ssl::ErrorCode::SYSCALL => {
            "the client closed the connection".into()
        }
        None => e.to_string(),
    }
}

unsafe extern "C" {
    /// libssl's (the openssl crate binds no info callback): `callback` hears of a session's
    /// state changes and of every alert sent or received.
    fn SSL_CTX_set_info_callback(
        context: *mut openssl_sys::SSL_CTX,
        callback: Option<unsafe extern "C" fn(*const openssl_sys::SSL, c_int, c_int)>,
    );
}

/// `SSL_CB_ALERT | SSL_CB_WRITE`: an alert this end sent; the value is level << 8 | description.
const SENT_ALERT: c_int = 0x4000 | 0x08;
/// The TLS 1.2 alert OpenSSL answers a client's renegotiation with (`SSL_OP_NO_RENEGOTIATION`).
const NO_RENEGOTIATION_ALERT: c_int = 100;

/// Where a session keeps its peer's address, for the log lines its callbacks write.
fn peer_index() -> Option<Index<Ssl, String>> {
    static INDEX: OnceLock<Option<Index<Ssl, String>>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().ok())
}

/// Says in the log that a client asked to renegotiate: OpenSSL refuses it with a warning
/// alert, and the error the connection then ends with is only the client's answer to that
/// ("alert handshake failure").
unsafe extern "C" fn on_tls_event(ssl: *const openssl_sys::SSL, event: c_int, value: c_int) {
    if event != SENT_ALERT || value & 0xff != NO_RENEGOTIATION_ALERT || ssl.is_null() {
        return;
    }
    // SAFETY: OpenSSL passes the live session the event is about, for the callback's length.
    let ssl = unsafe { SslRef::from_ptr(ssl.cast_mut()) };
    let peer = peer_index()
        .and_then(|index| ssl.ex_data(index))
        .map_or("unknown", String::as_str);
    tracing::info!(
        peer,
        "the client asked to renegotiate TLS: refused (this server never renegotiates)"
    );
}

fn build_context(credentials: &Credentials) -> Result<SslContext, TlsError> {
    let mut b = SslContextBuilder::new(SslMethod::tls_server())
        .map_err(openssl_error("creating the TLS context"))?;
    // SAFETY: the context is live; the callback is a plain function that only reads the
    // session it is given.
    unsafe { SSL_CTX_set_info_callback(b.as_ptr(), Some(on_tls_event)) };
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(openssl_error("setting the lowest TLS version"))?;
    b.set_ciphersuites(TLS13_SUITES)
        .map_err(openssl_error("setting the TLS 1.3 suites"))?;
    // No renegotiation (TLS 1.2), no session tickets or cache: every connection does a full
    // handshake, so a reload or a revoked key takes effect for the next one.
    b.set_options(
        SslOptions::NO_RENEGOTIATION | SslOptions::NO_TICKET | SslOptions::CIPHER_SERVER_PREFERENCE,
    );
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    b.set_num_tickets(0)
        .map_err(openssl_error("turning session tickets off"))?;
    match credentials {
        Credentials::X509 {
            cert,
            key,
            ca,
            verify_peer,
        } => {
            if *verify_peer && ca.is_none() {
                return Err(TlsError::VerifyWithoutCa);
            }
            let key_pem = read_secret(key)?;
            let key_pair = PKey::private_key_from_pem(&key_pem).map_err(openssl_error(format!(
                "{}: not a PEM private key",
                key.display()
            )))?;
            b.set_certificate_chain_file(cert)
                .map_err(openssl_error(format!("{}", cert.display())))?;
            b.set_private_key(&key_pair)
                .map_err(openssl_error(format!("{}", key.display())))?;
            b.check_private_key().map_err(openssl_error(format!(
                "{} does not match {}",
                key.display(),
                cert.display()
            )))?;
            if let Some(ca) = ca {
                b.set_ca_file(ca)
                    .map_err(openssl_error(format!("{}", ca.display())))?;
                let names = X509Name::load_client_ca_file(ca)
                    .map_err(openssl_error(format!("{}", ca.display())))?;
                b.set_client_ca_list(names);
            }
            if *verify_peer {
                b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
            }
        }
        Credentials::Psk { file } => {
            let keys = read_psk_file(file)?;
            b.set_psk_server_callback(move |_, identity, out| {
                let key = identity.and_then(|id| keys.get(id));
                match key {
                    Some(key) if key.len() <= out.len() => {
                        out[..key.len()].copy_from_slice(key);
                        Ok(key.len())
                    }
                    _ => {
                        let shown = identity.map(String::from_utf8_lossy).unwrap_or_default();
                        tracing::info!("TLS: no pre-shared key for identity {shown:?}");
                        Ok(0)
                    }
                }
            });
        }
    }
    Ok(b.build())
}

/// A psktool file's keys by identity.
fn read_psk_file(path: &Path) -> Result<HashMap<Vec<u8>, Vec<u8>>, TlsError> {
    let text = read_secret(path)?;
    let bad = |line: usize, problem: &'static str| TlsError::PskFile {
        path: path.to_path_buf(),
        line,
        problem,
    };
    let mut keys = HashMap::new();
    for (n, line) in text.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let colon = line
            .iter()
            .rposition(|b| *b == b':')
            .ok_or_else(|| bad(n + 1, "expected IDENTITY:HEXKEY"))?;
        let (identity, hex) = (&line[..colon], &line[colon + 1..]);
        if identity.is_empty() {
            return Err(bad(n + 1, "empty identity"));
        }
        let key =
            engine::hex::decode(hex).ok_or_else(|| bad(n + 1, "the key is not hexadecimal"))?;
        if key.is_empty() || key.len() > 256 {
            return Err(bad(n + 1, "a key is 1 to 256 bytes"));
        }
        keys.insert(identity.to_vec(), key);
    }
    if keys.is_empty() {
        return Err(TlsError::NoKeys {
            path: path.to_path_buf(),
        });
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn secret_file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    }

    #[test]
    fn psk_files_parse_and_bad_ones_say_where() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = secret_file(dir.path(), "good", "alice:0011aAbB\r\n\nqemu:ff\n", 0o600);
        let keys = read_psk_file(&good).expect("parse");
        assert_eq!(keys[&b"alice".to_vec()], [0x00, 0x11, 0xaa, 0xbb]);
        assert_eq!(keys[&b"qemu".to_vec()], [0xff]);
        for (text, problem) in [
            ("alice\n", "expected IDENTITY:HEXKEY"),
            ("alice:0g\n", "not hexadecimal"),
            ("alice:abc\n", "not hexadecimal"),
            (":00\n", "empty identity"),
            ("alice:\n", "1 to 256 bytes"),
        ] {
            let path = secret_file(dir.path(), "bad", text, 0o600);
            let e = read_psk_file(&path).expect_err(text).to_string();
            assert!(e.contains("line 1") && e.contains(problem), "{text:?}: {e}");
            assert!(!e.contains("0g") && !e.contains("abc"), "no key bytes: {e}");
        }
        let empty = secret_file(dir.path(), "empty", "\n", 0o600);
        assert!(matches!(
            read_psk_file(&empty),
            Err(TlsError::NoKeys { .. })
        ));
    }

    #[test]
    fn secrets_others_can_read_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        for mode in [0o640, 0o604, 0o644] {
            let path = secret_file(dir.path(), "keys.psk", "alice:00\n", mode);
            let e = read_psk_file(&path).expect_err("group/other readable");
            assert!(
                matches!(e, TlsError::Secret(SecretError::Permissions { .. })),
                "{e}"
            );
            assert!(e.to_string().contains("chmod 600"), "{e}");
        }
    }

    #[test]
    fn verifying_peers_needs_a_ca_and_missing_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let x509 = |verify_peer| Credentials::X509 {
            cert: dir.path().join("missing-cert.pem"),
            key: dir.path().join("missing-key.pem"),
            ca: None,
            verify_peer,
        };
        let e = Tls::new(TlsMode::Require, x509(true)).expect_err("no CA");
        assert!(matches!(e, TlsError::VerifyWithoutCa), "{e}");
        let e = Tls::new(TlsMode::Require, x509(false)).expect_err("no files");
        assert!(e.to_string().contains("missing-key.pem"), "{e}");
    }
}
