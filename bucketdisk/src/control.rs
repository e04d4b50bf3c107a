//! The control channel (docs/ARCHITECTURE.md §8): how a verb reaches the server that holds a
//! volume, so that it never fences it. A running `serve` listens on `<cache-dir>/control.sock`
//! (mode 0600, and only its own user — or root — is answered); a request is one line of JSON,
//! the answer one line of JSON. A verb for a volume no server here holds opens the volume
//! itself, straight against the store ([`run`]), after checking that no other writer may still
//! be running.

use crate::served::ServedVolume;
use crate::store_args::on_own_thread;
use anyhow::{Context, Result, bail};
use engine::object_volume::{Holder, ObjectVolume};
use engine::sealing::VolumeKey;
use nbd_server::exports::Exports;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use stores::url::StoreLocation;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

const SOCKET: &str = "control.sock";
/// A request line longer than this is not a request.
const MAX_REQUEST: usize = 64 << 10;

pub(crate) fn socket_path(cache_dir: &Path) -> PathBuf {
    cache_dir.join(SOCKET)
}

/// What a verb asks of a volume.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Request {
    CheckpointCreate {
        volume: String,
        name: Option<String>,
    },
    CheckpointDelete {
        volume: String,
        name: String,
    },
    /// Whether this server holds the volume (answered `done` if it does).
    Holds {
        volume: String,
    },
    Resize {
        volume: String,
        size: u64,
        force: bool,
    },
    /// Served volumes only (a volume no server holds is restored by the verb itself).
    Restore {
        volume: String,
        checkpoint: String,
        keep_current: bool,
        force: bool,
    },
}

impl Request {
    fn volume(&self) -> &str {
        match self {
            Request::CheckpointCreate { volume, .. }
            | Request::CheckpointDelete { volume, .. }
            | Request::Holds { volume }
            | Request::Resize { volume, .. }
            | Request::Restore { volume, .. } => volume,
        }
    }

    /// Carries the request out on an open volume (in the server, or opened by the verb).
    async fn execute(&self, volume: &ObjectVolume) -> std::io::Result<serde_json::Value> {
        match self {
            Request::CheckpointCreate { name, .. } => {
                let checkpoint = volume.create_checkpoint(name.as_deref()).await?;
                serde_json::to_value(checkpoint).map_err(std::io::Error::other)
            }
            Request::CheckpointDelete { name, .. } => {
                volume.delete_checkpoint(name).await?;
                Ok(serde_json::Value::Null)
            }
            Request::Holds { .. } => Ok(serde_json::Value::Null),
            Request::Resize { size, force, .. } => {
                let old = volume.resize(*size, *force).await?;
                Ok(serde_json::json!({ "old_size": old, "size": size }))
            }
            Request::Restore { .. } => Err(std::io::Error::other(
                "internal: a restore is carried out by the server holding the volume",
            )),
        }
    }
}

/// The server's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub(crate) enum Response {
    Done {
        result: serde_json::Value,
    },
    /// This server does not hold that volume.
    NotServed,
    Failed {
        error: String,
    },
}

/// Listens on `<cache_dir>/control.sock`. A socket left by a server that is gone is replaced;
/// one a running server answers on is an error (two servers must not share a cache folder).
pub(crate) async fn bind(cache_dir: &Path) -> Result<UnixListener> {
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("creating the cache directory {}", cache_dir.display()))?;
    let path = socket_path(cache_dir);
    if path.exists() {
        if UnixStream::connect(&path).await.is_ok() {
            bail!(
                "another bucketdisk server uses the cache directory {} (it answers on {})",
                cache_dir.display(),
                path.display()
            );
        }
        std::fs::remove_file(&path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(listener)
}

/// What a server's control socket answers for: its object volumes and their exports.
pub(crate) struct Served {
    pub(crate) volumes: HashMap<String, Arc<ServedVolume>>,
    pub(crate) exports: Arc<Exports>,
}

/// Answers requests for `served` until `stop`; removes the socket then.
pub(crate) async fn serve(
    listener: UnixListener,
    path: PathBuf,
    served: Served,
    mut stop: watch::Receiver<bool>,
) {
    let served = Arc::new(served);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("control socket: accept failed: {e}");
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let served = Arc::clone(&served);
        tokio::spawn(async move {
            if let Err(e) = answer(stream, served).await {
                tracing::warn!("control socket: {e:#}");
            }
        });
    }
    let _ = std::fs::remove_file(&path);
}

async fn answer(stream: UnixStream, served: Arc<Served>) -> Result<()> {
    // The socket is 0600 already; this also refuses a peer that got a descriptor some other way.
    let peer = stream
        .peer_cred()
        .context("reading the peer's credentials")?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if peer.uid() != me && peer.uid() != 0 {
        bail!("refused a request from uid {}", peer.uid());
    }
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64);
    reader
        .read_line(&mut line)
        .await
        .context("reading a request")?;
    let response = match serde_json::from_str::<Request>(&line) {
        Err(e) => Response::Failed {
            error: format!("not a control request: {e}"),
        },
        Ok(request) => match served.volumes.get(request.volume()) {
            None => Response::NotServed,
            Some(volume) => {
                tracing::info!(volume = request.volume(), ?request, "control request");
                let outcome = match &request {
                    // A spawned task needs `Send`, which opening a volume cannot prove.
                    Request::Restore { .. } => {
                        let (served, volume) = (Arc::clone(&served), Arc::clone(volume));
                        let request = request.clone();
                        on_own_thread(move |runtime| {
                            runtime.block_on(restore_served(&served, &volume, &request))
                        })
                        .await
                        .unwrap_or_else(|e| {
                            Err(std::io::Error::other(format!(
                                "the restore task failed: {e}"
                            )))
                        })
                    }
                    _ => request.execute(&volume.current()).await,
                };
                match outcome {
                    Ok(result) => Response::Done { result },
                    Err(e) => Response::Failed {
                        error: e.to_string(),
                    },
                }
            }
        },
    };
    let mut text = serde_json::to_string(&response)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    Ok(())
}

/// How long a forced restore waits for the clients it disconnected to go.
const DISCONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Restores a volume this server serves: refused while NBD clients are connected unless
/// `force` (which ends their sessions); then the volume is stopped without uploading (what it
/// journaled since the checkpoint is what a restore drops; with `keep_current` it was stored by
/// that checkpoint), its map switched to the checkpoint, and opened again under the same
/// export. Should the switch fail, the volume is opened again as it was.
async fn restore_served(
    served: &Served,
    volume: &ServedVolume,
    request: &Request,
) -> std::io::Result<serde_json::Value> {
    let Request::Restore {
        checkpoint,
        keep_current,
        force,
        ..
    } = request
    else {
        return Err(std::io::Error::other("internal: not a restore"));
    };
    let name = volume.name.as_str();
    if volume.config.read_only {
        // It holds no lease: a writer elsewhere may be serving the volume.
        return Err(std::io::Error::other(format!(
            "{name} is served read-only here: restore it where it is written, or with no \
             server serving it"
        )));
    }
    if let Some(export) = served.exports.all().into_iter().find(|e| e.name == name) {
        let connected = export.sessions();
        if connected > 0 {
            if !force {
                return Err(std::io::Error::other(format!(
                    "{connected} NBD client(s) connected to {name}: disconnect them, or pass \
                     --force to end their sessions"
                )));
            }
            export.disconnect_all();
            let deadline = std::time::Instant::now() + DISCONNECT_WAIT;
            while export.sessions() > 0 {
                if std::time::Instant::now() > deadline {
                    return Err(std::io::Error::other(format!(
                        "{name}'s clients did not disconnect within {DISCONNECT_WAIT:?}"
                    )));
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
    let current = volume.current();
    let kept = match keep_current {
        true => Some(current.create_checkpoint(None).await?.name),
        false => None,
    };
    // What it journaled since the checkpoint is what the restore drops: no upload.
    current.abandon().await?;
    let location = &volume.location;
    let restore = engine::object_volume::RestoreRequest {
        volume: name,
        checkpoint,
        keep_current: false,
    };
    let restored = engine::object_volume::restore_keeping_map(
        Arc::clone(&location.store),
        &location.prefix,
        location.layout,
        restore,
        volume.config.clone(),
    )
    .await;
    // Served again either way: the restored state (adopting the map the restore took), or the
    // state it had.
    let (report, reopened) = match restored {
        Ok((report, map)) => {
            let config = volume.config.clone();
            let adopted =
                ObjectVolume::open_restored(&location.prefix, location.layout, config, map).await;
            let reopened = match adopted {
                Ok(reopened) => Ok(reopened),
                // The store holds the restored state whatever happened here: open it anew.
                Err(e) => {
                    tracing::warn!(volume = name, "adopting the restored map failed: {e}");
                    volume.reopen().await
                }
            };
            (Ok(report), reopened)
        }
        Err(e) => (Err(e), volume.reopen().await),
    };
    match reopened {
        Ok(reopened) => volume.replace(reopened),
        Err(e) => {
            // The export keeps the stopped volume: writes are refused, with this reason.
            let outcome = match &report {
                Ok(_) => "was restored".to_string(),
                Err(failed) => format!("was not restored ({failed})"),
            };
            tracing::error!(volume = name, "cannot serve the volume again: {e}");
            return Err(std::io::Error::other(format!(
                "{name} {outcome} and cannot be served again ({e}): restart the server"
            )));
        }
    }
    let mut report = report?;
    report.kept_current = kept;
    serde_json::to_value(report).map_err(std::io::Error::other)
}

/// Asks the server using `cache_dir` to carry `request` out: its result; `None` when no server
/// runs there or it does not hold the volume.
pub(crate) async fn ask_server(
    cache_dir: &Path,
    request: &Request,
) -> Result<Option<serde_json::Value>> {
    match ask(cache_dir, request).await? {
        Some(Response::Done { result }) => Ok(Some(result)),
        Some(Response::Failed { error }) => bail!("{error}"),
        Some(Response::NotServed) | None => Ok(None),
    }
}

/// Asks the server using `cache_dir`, if one runs; `None` when none does.
async fn ask(cache_dir: &Path, request: &Request) -> Result<Option<Response>> {
    let path = socket_path(cache_dir);
    let Ok(stream) = UnixStream::connect(&path).await else {
        return Ok(None);
    };
    let (read, mut write) = stream.into_split();
    let mut text = serde_json::to_string(request)?;
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(read)
        .read_line(&mut line)
        .await
        .with_context(|| format!("reading the answer on {}", path.display()))?;
    let response = serde_json::from_str(&line)
        .with_context(|| format!("the server on {} answered {line:?}", path.display()))?;
    Ok(Some(response))
}

/// Whether the server using `cache_dir` (if one runs) holds `volume`.
pub(crate) async fn serves(cache_dir: &Path, volume: &str) -> Result<bool> {
    let request = Request::Holds {
        volume: volume.to_string(),
    };
    Ok(matches!(
        ask(cache_dir, &request).await?,
        Some(Response::Done { .. })
    ))
}

/// Carries `request` out: through the server on this host that holds the volume, or else on
/// the volume opened here. Refuses (unless `force`) when the volume's writer lease says a
/// server that did not stop cleanly may still hold it on another host (or here, with another
/// cache folder): taking the volume would fence it.
pub(crate) async fn run(
    location: &StoreLocation,
    cache_dir: &Path,
    request: Request,
    force: bool,
    key: Option<Arc<VolumeKey>>,
) -> Result<serde_json::Value> {
    match ask(cache_dir, &request).await? {
        Some(Response::Done { result }) => return Ok(result),
        Some(Response::Failed { error }) => bail!("{error}"),
        Some(Response::NotServed) | None => {}
    }
    let name = request.volume();
    check_not_held_elsewhere(location, name, force).await?;
    let mut config = crate::store_args::volume_config(cache_dir, name, key);
    config.holder = holder_name(verb(&request));
    let volume = ObjectVolume::open(
        Arc::clone(&location.store),
        &location.prefix,
        location.layout,
        name,
        config,
    )
    .await
    .with_context(|| format!("opening volume {name} in {}", location.description))?;
    let result = request.execute(&volume).await;
    let closed = engine::BlockDevice::close(&volume).await;
    let result = result?;
    closed.with_context(|| format!("closing volume {name}"))?;
    Ok(result)
}

/// Refuses (unless `force`) when the volume's writer lease says a server that did not stop
/// cleanly may still hold it: on another host, or here under another cache folder. A lease of a
/// process of this host that is gone is a crash, and taking the volume is what recovers it.
pub(crate) async fn check_not_held_elsewhere(
    location: &StoreLocation,
    name: &str,
    force: bool,
) -> Result<()> {
    let holder = engine::object_volume::holder(location.store.as_ref(), &location.prefix, name)
        .await
        .with_context(|| format!("reading volume {name}'s writer lease"))?;
    may_take(name, &holder, force)
}

/// [`check_not_held_elsewhere`] for a holder already read.
pub(crate) fn may_take(name: &str, holder: &Holder, force: bool) -> Result<()> {
    if let Holder::Held(lease) = holder
        && !force
        && !crashed_here(&lease.holder)
    {
        bail!(
            "volume {name} is held by {} (writer epoch {}), which has not stopped cleanly: if it \
             still runs, run this where it runs (with its --cache-dir); if it is gone, pass --force",
            lease.holder,
            lease.epoch
        );
    }
    Ok(())
}

/// How this process names itself in a writer lease it takes for `verb`.
pub(crate) fn holder_name(verb: &str) -> String {
    format!(
        "{} pid {} (bucketdisk {verb})",
        hostname(),
        std::process::id()
    )
}

fn verb(request: &Request) -> &'static str {
    match request {
        Request::CheckpointCreate { .. } => "checkpoint create",
        Request::CheckpointDelete { .. } => "checkpoint delete",
        Request::Holds { .. } => "holds",
        Request::Resize { .. } => "resize",
        Request::Restore { .. } => "restore",
    }
}

pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into())
}

/// Whether a lease holder named `"<host> pid <pid>…"` ran on this host and its process is
/// gone: a crash here, whose journal (in this cache folder) the open replays.
fn crashed_here(holder: &str) -> bool {
    let mut words = holder.split_whitespace();
    let (Some(host), Some("pid"), Some(pid)) = (words.next(), words.next(), words.next()) else {
        return false;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    host == hostname() && !Path::new(&format!("/proc/{pid}")).exists()
}
