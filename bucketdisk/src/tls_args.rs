//! `serve`'s TLS options, and re-reading the credentials on SIGHUP.

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use nbd_server::tls::{Credentials, Tls, TlsMode};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum TlsSetting {
    /// No TLS: STARTTLS is refused.
    Off,
    /// Clients may upgrade with STARTTLS or stay in clear.
    On,
    /// Clients must upgrade with STARTTLS before anything else; nothing is exported in clear.
    Require,
}

#[derive(Args, Debug)]
pub(crate) struct TlsArgs {
    /// TLS on NBD (STARTTLS): off, on (clients choose) or require (nothing in clear). Needs
    /// --tls-cert and --tls-key, --tls-dir, or --tls-psk.
    #[arg(long, value_enum, default_value = "off")]
    pub(crate) tls: TlsSetting,
    /// The server's X.509 certificate (PEM; the chain, server first).
    #[arg(long, requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM; readable by its owner alone).
    #[arg(long, requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates must chain to.
    #[arg(long)]
    pub(crate) tls_ca: Option<PathBuf>,
    /// A directory in the layout qemu and nbdkit read: server-cert.pem, server-key.pem and,
    /// for client certificates, ca-cert.pem.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    pub(crate) tls_dir: Option<PathBuf>,
    /// Ask every client for a certificate signed by the CA and refuse those without one.
    #[arg(long)]
    pub(crate) tls_verify_peer: bool,
    /// Pre-shared keys instead of certificates: a psktool file of IDENTITY:HEXKEY lines (as
    /// qemu, nbdkit and libnbd read), readable by its owner alone.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_ca", "tls_dir", "tls_verify_peer"])]
    pub(crate) tls_psk: Option<PathBuf>,
    /// Tests: how long a client has to finish its TLS handshake (default 30s).
    #[arg(long, hide = true, value_parser = bucketdisk::units::parse_duration)]
    pub(crate) tls_handshake_timeout: Option<std::time::Duration>,
}

impl TlsArgs {
    /// The server's TLS, loaded; `None` when it is off.
    pub(crate) fn load(&self) -> Result<Option<Arc<Tls>>> {
        let mode = match self.tls {
            TlsSetting::Off => {
                if self.credentials_given() {
                    bail!("TLS credentials given with --tls off: add --tls on or --tls require");
                }
                return Ok(None);
            }
            TlsSetting::On => TlsMode::On,
            TlsSetting::Require => TlsMode::Require,
        };
        let credentials = if let Some(file) = &self.tls_psk {
            Credentials::Psk { file: file.clone() }
        } else if let Some(dir) = &self.tls_dir {
            Credentials::from_dir(dir, self.tls_verify_peer)
        } else if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            Credentials::X509 {
                cert: cert.clone(),
                key: key.clone(),
                ca: self.tls_ca.clone(),
                verify_peer: self.tls_verify_peer,
            }
        } else {
            bail!(
                "--tls {:?} needs --tls-cert and --tls-key, --tls-dir, or --tls-psk",
                self.tls
            );
        };
        let mut tls = Tls::new(mode, credentials)?;
        if let Some(timeout) = self.tls_handshake_timeout {
            tls = tls.with_handshake_timeout(timeout);
        }
        Ok(Some(Arc::new(tls)))
    }

    fn credentials_given(&self) -> bool {
        self.tls_cert.is_some()
            || self.tls_key.is_some()
            || self.tls_ca.is_some()
            || self.tls_dir.is_some()
            || self.tls_psk.is_some()
            || self.tls_verify_peer
    }
}

/// Re-reads `tls`'s files on every SIGHUP: new handshakes use them, connected clients keep
/// theirs; a reload that fails keeps the credentials in use and logs why.
pub(crate) fn reload_on_sighup(tls: Arc<Tls>) {
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot watch SIGHUP: TLS credentials are read at start only");
        return;
    };
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            match tls.reload() {
                Ok(()) => tracing::info!("SIGHUP: TLS credentials read again"),
                Err(e) => tracing::error!("SIGHUP: TLS credentials kept as they were: {e}"),
            }
        }
    });
}
