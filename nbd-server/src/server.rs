//! Listening sockets and per-connection lifecycle: TCP, Unix sockets, and systemd socket
//! activation (LISTEN_FDS), with a graceful stop that answers in-flight requests first; and
//! the upgrade of a connection to TLS when its client sends `STARTTLS`.

use crate::exports::Exports;
use crate::handshake::{self, HandshakeError, Negotiated, TlsPhase};
use crate::limits::{ClientId, ClientLimits, ClientTicket};
use crate::tls::{Tls, TlsMode};
use crate::transmission;
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

/// Most simultaneous connections; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 1024;
/// How long a stop waits for connections to finish their in-flight requests.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

pub enum Listener {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        path: Option<PathBuf>,
    },
}

impl Listener {
    pub async fn tcp(address: &str) -> io::Result<Self> {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {address}: {e}")))?;
        Ok(Listener::Tcp(listener))
    }

    /// Binds a Unix socket, replacing a stale socket file left by a dead server.
    pub fn unix(path: PathBuf) -> io::Result<Self> {
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running server", path.display()),
                ));
            }
            std::fs::remove_file(&path)?;
        }
        let listener = UnixListener::bind(&path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on {}: {e}", path.display()),
            )
        })?;
        Ok(Listener::Unix {
            listener,
            path: Some(path),
        })
    }

    /// The socket handed over by systemd-style socket activation, if any. Checks LISTEN_PID so a
    /// socket meant for another process is never taken, then clears the variables so children
    /// do not see them.
    pub fn from_socket_activation() -> io::Result<Option<Self>> {
        let pid_matches = std::env::var("LISTEN_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|p| p == std::process::id());
        let count = std::env::var("LISTEN_FDS")
            .ok()
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0);
        if !pid_matches || count == 0 {
            return Ok(None);
        }
        // SAFETY: only touches this process's environment before any other thread reads it;
        // called once at start-up.
        unsafe {
            std::env::remove_var("LISTEN_PID");
            std::env::remove_var("LISTEN_FDS");
            std::env::remove_var("LISTEN_FDNAMES");
        }
        const FIRST_FD: RawFd = 3;
        if count > 1 {
            tracing::warn!("socket activation passed {count} sockets; serving only the first");
        }
        let family = socket_family(FIRST_FD)?;
        // SAFETY: the protocol hands this descriptor to us; we take sole ownership of it.
        let listener = if family == libc::AF_UNIX {
            let std = unsafe { std::os::unix::net::UnixListener::from_raw_fd(FIRST_FD) };
            std.set_nonblocking(true)?;
            Listener::Unix {
                listener: UnixListener::from_std(std)?,
                path: None,
            }
        } else {
            let std = unsafe { std::net::TcpListener::from_raw_fd(FIRST_FD) };
            std.set_nonblocking(true)?;
            Listener::Tcp(TcpListener::from_std(std)?)
        };
        Ok(Some(listener))
    }

    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp".into()),
            Listener::Unix { path: Some(p), .. } => p.display().to_string(),
            Listener::Unix { path: None, .. } => "activated unix socket".into(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix { path: Some(p), .. } = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn socket_family(fd: RawFd) -> io::Result<libc::c_int> {
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: addr and len are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockname(
            fd,
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket activation: fd {fd} is not a socket: {}",
                io::Error::last_os_error()
            ),
        ));
    }
    Ok(libc::c_int::from(addr.ss_family))
}

/// How a server treats its clients.
#[derive(Default)]
pub struct ServerPolicy {
    /// With TLS, clients may (or must) upgrade with `STARTTLS`.
    pub tls: Option<Arc<Tls>>,
    pub limits: ClientLimits,
}

/// Accepts connections until `shutdown` fires, then waits (bounded) for open connections to
/// answer what they have already read.
pub async fn run(
    listener: Listener,
    exports: Arc<Exports>,
    policy: ServerPolicy,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let ServerPolicy { tls, limits } = policy;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&slots).acquire_owned() => p.map_err(io::Error::other)?,
            _ = shutdown.wait_for(|&s| s) => break,
        };
        let accepted = tokio::select! {
            a = accept(&listener) => a,
            _ = shutdown.wait_for(|&s| s) => break,
        };
        // Reap finished connection tasks so the set does not grow forever.
        while connections.try_join_next().is_some() {}
        match accepted {
            Ok((socket, peer, client)) => {
                let Some(ticket) = limits.admit(client.clone()) else {
                    tracing::warn!(
                        peer,
                        "refusing a connection: {client} holds {} already \
                         (--max-client-connections)",
                        limits.max_connections()
                    );
                    continue;
                };
                let exports = Arc::clone(&exports);
                let shutdown = shutdown.clone();
                let tls = tls.clone();
                connections.spawn(async move {
                    let connection = Connection {
                        peer: &peer,
                        exports: &exports,
                        ticket,
                        shutdown,
                    };
                    match (socket, tls) {
                        (socket, None) => connection.plain(socket).await,
                        (Socket::Tcp(s), Some(tls)) => connection.with_tls(s, &tls).await,
                        (Socket::Unix(s), Some(tls)) => connection.with_tls(s, &tls).await,
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    if tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!("connections still busy after {DRAIN_TIMEOUT:?}; closing them");
    }
    Ok(())
}

type BoxRead = Box<dyn AsyncRead + Unpin + Send>;
type BoxWrite = Box<dyn AsyncWrite + Unpin + Send>;

/// An accepted connection's socket.
enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    /// Its two halves, each usable on its own (no lock between them).
    fn into_split(self) -> (BoxRead, BoxWrite) {
        match self {
            Socket::Tcp(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
            Socket::Unix(s) => {
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w))
            }
        }
    }
}

/// The next connection, its peer for the log, and who it is for the per-client limits.
async fn accept(listener: &Listener) -> io::Result<(Socket, String, ClientId)> {
    match listener {
        Listener::Tcp(l) => {
            let (stream, peer) = l.accept().await?;
            stream.set_nodelay(true)?;
            let client = ClientId::Ip(peer.ip().to_canonical());
            Ok((Socket::Tcp(stream), peer.to_string(), client))
        }
        Listener::Unix { listener, .. } => {
            let (stream, _) = listener.accept().await?;
            let client = stream
                .peer_cred()
                .map_or(ClientId::Unknown, |c| ClientId::Uid(c.uid()));
            Ok((Socket::Unix(stream), "unix".to_string(), client))
        }
    }
}

/// The read buffer of a connection: requests with their data are read through it.
const READ_BUFFER: usize = 256 * 1024;
/// The buffers between TLS records and the socket, each way.
const TLS_SOCKET_BUFFER: usize = 256 * 1024;

/// One client's connection, from the greeting to its end.
struct Connection<'a> {
    peer: &'a str,
    exports: &'a Exports,
    /// Its place among its client's connections, and the client's memory budget.
    ticket: ClientTicket,
    shutdown: watch::Receiver<bool>,
}

impl Connection<'_> {
    /// A server without TLS: the handshake, then transmission, on the socket's halves.
    async fn plain(mut self, socket: Socket) {
        let (reader, mut writer) = socket.into_split();
        let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
        let negotiated = tokio::select! {
            n = handshake::negotiate(&mut reader, &mut writer, self.exports) => n,
            _ = self.shutdown.wait_for(|&s| s) => return,
        };
        let negotiated = negotiated.map(|n| n.map_or(Negotiated::Ended, Negotiated::Session));
        if let Some(session) = self.session(negotiated) {
            self.transmit(reader, writer, session).await;
        }
    }

    /// A server with TLS: options in clear until `STARTTLS` (or, unless TLS is required, until
    /// the client picks an export in clear), then the TLS handshake, the options again over
    /// TLS, and transmission over TLS.
    async fn with_tls<S>(mut self, stream: S, tls: &Tls)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (reader, mut writer) = tokio::io::split(stream);
        let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
        let phase = match tls.mode() {
            TlsMode::Require => TlsPhase::Required,
            TlsMode::On | TlsMode::Off => TlsPhase::Offered,
        };
        let exports = self.exports;
        let in_clear = tokio::select! {
            n = async {
                match handshake::greet(&mut reader, &mut writer).await? {
                    None => Ok((None, Negotiated::Ended)),
                    Some(flags) => handshake::options(&mut reader, &mut writer, exports, flags, phase)
                        .await
                        .map(|n| (Some(flags), n)),
                }
            } => n,
            _ = self.shutdown.wait_for(|&s| s) => return,
        };
        let flags = match in_clear {
            Ok((Some(flags), Negotiated::StartTls)) => flags,
            Ok((_, negotiated)) => {
                if let Some(session) = self.session(Ok(negotiated)) {
                    self.transmit(reader, writer, session).await;
                }
                return;
            }
            Err(e) => {
                self.session(Err(e));
                return;
            }
        };
        // Whatever the client sent after STARTTLS and before the handshake is not trusted
        // into the encrypted session: it is dropped with the buffer.
        if !reader.buffer().is_empty() {
            tracing::warn!(
                peer = self.peer,
                "dropping {} bytes sent in clear after STARTTLS, before the TLS handshake",
                reader.buffer().len()
            );
        }
        // Buffered beneath TLS: OpenSSL writes a reply as 16 KiB records, each its own
        // write; the buffer hands the socket many records at once (and reads ahead of them).
        let stream = tokio::io::BufStream::with_capacity(
            TLS_SOCKET_BUFFER,
            TLS_SOCKET_BUFFER,
            reader.into_inner().unsplit(writer),
        );
        let secured = tokio::select! {
            s = tls.accept(stream, self.peer) => s,
            _ = self.shutdown.wait_for(|&s| s) => return,
        };
        let secured = match secured {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(peer = self.peer, "{e}");
                return;
            }
        };
        tracing::debug!(
            peer = self.peer,
            version = secured.ssl().version_str(),
            cipher = secured.ssl().current_cipher().map(|c| c.name()),
            "TLS is up"
        );
        let (reader, mut writer) = tokio::io::split(secured);
        let mut reader = BufReader::with_capacity(READ_BUFFER, reader);
        let negotiated = tokio::select! {
            n = handshake::options(&mut reader, &mut writer, exports, flags, TlsPhase::Active) => n,
            _ = self.shutdown.wait_for(|&s| s) => return,
        };
        if let Some(session) = self.session(negotiated) {
            self.transmit(reader, writer, session).await;
        }
    }

    /// The session a finished option phase chose, if any (the rest is logged).
    fn session(
        &self,
        negotiated: Result<Negotiated, HandshakeError>,
    ) -> Option<handshake::Session> {
        match negotiated {
            Ok(Negotiated::Session(session)) => Some(session),
            Ok(Negotiated::Ended | Negotiated::StartTls) | Err(HandshakeError::Aborted) => {
                tracing::debug!(peer = self.peer, "client left during the handshake");
                None
            }
            Err(e) => {
                tracing::info!(peer = self.peer, "handshake failed: {e}");
                None
            }
        }
    }

    async fn transmit<R, W>(self, reader: R, writer: W, session: handshake::Session)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        tracing::debug!(
            peer = self.peer,
            export = session.export.name,
            mode = ?session.mode,
            "transmission started"
        );
        let budget = self.ticket.budget();
        if let Err(e) = transmission::serve(reader, writer, session, budget, self.shutdown).await {
            tracing::info!(peer = self.peer, "connection closed: {e}");
        }
    }
}
