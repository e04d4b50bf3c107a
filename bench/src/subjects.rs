//! The things being measured: bucketdisk and its peers, each serving the same local file.

use crate::fio::Target;
use crate::process::{ServerProcess, free_loopback_port};
use anyhow::{Context, Result};
use serde::Serialize;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// How long a server may take to start answering.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// One subject of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Subject {
    /// `bucketdisk serve --engine file`, local-file volume.
    Bucketdisk,
    /// `qemu-nbd`, its default AIO mode (threads), page cache (writeback).
    QemuNbd,
    /// `qemu-nbd --aio=io_uring`.
    #[value(name = "qemu-nbd-io_uring")]
    #[serde(rename = "qemu-nbd-io_uring")]
    QemuNbdIoUring,
    /// `nbdkit file`.
    Nbdkit,
    /// No server: fio's io_uring engine straight on the file (the local limit).
    Local,
}

impl Subject {
    pub fn name(self) -> &'static str {
        match self {
            Subject::Bucketdisk => "bucketdisk",
            Subject::QemuNbd => "qemu-nbd",
            Subject::QemuNbdIoUring => "qemu-nbd-io_uring",
            Subject::Nbdkit => "nbdkit",
            Subject::Local => "local",
        }
    }
}

/// The volume every subject serves.
pub struct Volume {
    /// The bucketdisk store directory (`file://` URL path).
    pub store: PathBuf,
    pub name: String,
    /// The data file inside the store that the peers serve directly.
    pub file: PathBuf,
}

/// A started subject: the process (if any) and where fio should point.
pub struct Running {
    pub server: Option<ServerProcess>,
    pub target: Target,
    /// The server command line, for the report.
    pub command_line: String,
}

/// Starts `subject` on a free loopback port and waits until it answers NBD.
pub fn start(
    subject: Subject,
    volume: &Volume,
    bucketdisk: &Path,
    log_dir: &Path,
) -> Result<Running> {
    if subject == Subject::Local {
        return Ok(Running {
            server: None,
            target: Target::File {
                path: volume.file.clone(),
            },
            command_line: "(none: fio --ioengine=io_uring on the file)".into(),
        });
    }
    let port = free_loopback_port()?;
    let cmd = server_command(subject, volume, bucketdisk, port);
    let command_line = describe(&cmd);
    let log = log_dir.join(format!("{}-{port}.log", subject.name()));
    let mut server = ServerProcess::spawn(subject.name(), cmd, &log)?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    server
        .wait_until_serving(addr, START_TIMEOUT)
        .with_context(|| format!("starting {}", subject.name()))?;
    Ok(Running {
        server: Some(server),
        target: Target::Nbd {
            uri: format!("nbd://127.0.0.1:{port}/"),
        },
        command_line,
    })
}

fn server_command(subject: Subject, volume: &Volume, bucketdisk: &Path, port: u16) -> Command {
    let file = volume.file.as_os_str();
    match subject {
        Subject::Bucketdisk => {
            let mut cmd = Command::new(bucketdisk);
            cmd.arg("serve")
                .args(["--engine", "file"])
                .arg("--store")
                .arg(format!("file://{}", volume.store.display()))
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--volume")
                .arg(&volume.name);
            cmd
        }
        Subject::QemuNbd | Subject::QemuNbdIoUring => {
            let aio = if subject == Subject::QemuNbd {
                "threads"
            } else {
                "io_uring"
            };
            let mut cmd = Command::new("qemu-nbd");
            cmd.args(["-f", "raw", "--persistent", "--export-name="])
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                // Room for the readiness probe next to fio's connection.
                .arg("--shared=4")
                .arg("--cache=writeback")
                .arg(format!("--aio={aio}"))
                .arg(file);
            cmd
        }
        Subject::Nbdkit => {
            let mut cmd = Command::new("nbdkit");
            cmd.args([
                "--exit-with-parent",
                "--foreground",
                "--ipaddr",
                "127.0.0.1",
            ])
            .args(["--port", &port.to_string()])
            .arg("file")
            .arg(file);
            cmd
        }
        Subject::Local => unreachable!("the local subject has no server"),
    }
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| {
            let s = a.to_string_lossy();
            if s.is_empty() || s.contains(' ') {
                format!("'{s}'")
            } else {
                s.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
