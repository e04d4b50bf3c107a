//! The things being measured: bucketdisk and its peers, each serving the same local file, in
//! clear or over TLS (X.509, certificates made with `openssl` for the run; clients verify the
//! server, servers do not ask for client certificates).

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
    /// `bucketdisk serve --engine file --tls require`.
    BucketdiskTls,
    /// `qemu-nbd --tls-creds` (x509, no client certificates), AIO threads.
    QemuNbdTls,
    /// `nbdkit --tls=require file`.
    NbdkitTls,
}

impl Subject {
    pub fn name(self) -> &'static str {
        match self {
            Subject::Bucketdisk => "bucketdisk",
            Subject::QemuNbd => "qemu-nbd",
            Subject::QemuNbdIoUring => "qemu-nbd-io_uring",
            Subject::Nbdkit => "nbdkit",
            Subject::Local => "local",
            Subject::BucketdiskTls => "bucketdisk-tls",
            Subject::QemuNbdTls => "qemu-nbd-tls",
            Subject::NbdkitTls => "nbdkit-tls",
        }
    }

    fn tls(self) -> bool {
        matches!(
            self,
            Subject::BucketdiskTls | Subject::QemuNbdTls | Subject::NbdkitTls
        )
    }
}

/// The certificates of a run: the servers' directory (`ca-cert.pem`, `server-cert.pem`,
/// `server-key.pem`, as qemu, nbdkit and bucketdisk read it) and a home for the clients, whose
/// `.pki/libnbd/ca-cert.pem` libnbd reads when a URI names no certificates.
struct TlsDirs {
    server: PathBuf,
    client_home: PathBuf,
}

/// Makes the run's certificates under `dir` the first time they are needed.
fn tls_dirs(dir: &Path) -> Result<TlsDirs> {
    let root = dir.join("tls");
    let dirs = TlsDirs {
        server: root.join("server"),
        client_home: root.join("client-home"),
    };
    let client_ca = dirs.client_home.join(".pki/libnbd");
    if dirs.server.join("server-key.pem").exists() {
        return Ok(dirs);
    }
    std::fs::create_dir_all(&dirs.server)?;
    std::fs::create_dir_all(&client_ca)?;
    let openssl = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&root)
            .output()
            .context("running openssl (apt-get install openssl)")?;
        anyhow::ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=bench CA",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
    ])?;
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server/server-key.pem",
        "-out",
        "server.csr",
    ])?;
    std::fs::write(
        root.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca-cert.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "server/server-cert.pem",
    ])?;
    std::fs::copy(root.join("ca-cert.pem"), dirs.server.join("ca-cert.pem"))?;
    std::fs::copy(root.join("ca-cert.pem"), client_ca.join("ca-cert.pem"))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dirs.server.join("server-key.pem"),
        std::fs::Permissions::from_mode(0o600),
    )?;
    Ok(dirs)
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
    let tls = if subject.tls() {
        Some(tls_dirs(log_dir)?)
    } else {
        None
    };
    let cmd = server_command(subject, volume, bucketdisk, port, tls.as_ref());
    let command_line = describe(&cmd);
    let log = log_dir.join(format!("{}-{port}.log", subject.name()));
    let mut server = ServerProcess::spawn(subject.name(), cmd, &log)?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    server
        .wait_until_serving(addr, START_TIMEOUT)
        .with_context(|| format!("starting {}", subject.name()))?;
    Ok(Running {
        server: Some(server),
        target: match &tls {
            Some(dirs) => Target::NbdTls {
                uri: format!("nbds://localhost:{port}/"),
                home: dirs.client_home.clone(),
            },
            None => Target::Nbd {
                uri: format!("nbd://127.0.0.1:{port}/"),
            },
        },
        command_line,
    })
}

fn server_command(
    subject: Subject,
    volume: &Volume,
    bucketdisk: &Path,
    port: u16,
    tls: Option<&TlsDirs>,
) -> Command {
    let file = volume.file.as_os_str();
    match subject {
        Subject::Bucketdisk | Subject::BucketdiskTls => {
            let mut cmd = Command::new(bucketdisk);
            cmd.arg("serve")
                .args(["--engine", "file"])
                .arg("--store")
                .arg(format!("file://{}", volume.store.display()))
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--volume")
                .arg(&volume.name);
            if let Some(dirs) = tls {
                cmd.args(["--tls", "require", "--tls-dir"])
                    .arg(&dirs.server);
            }
            cmd
        }
        Subject::QemuNbd | Subject::QemuNbdIoUring | Subject::QemuNbdTls => {
            let aio = if subject == Subject::QemuNbdIoUring {
                "io_uring"
            } else {
                "threads"
            };
            let mut cmd = Command::new("qemu-nbd");
            if let Some(dirs) = tls {
                cmd.arg("--object")
                    .arg(format!(
                        "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=off",
                        dirs.server.display()
                    ))
                    .args(["--tls-creds", "tls0"]);
            }
            cmd.args(["-f", "raw", "--persistent", "--export-name="])
                .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
                // Room for the readiness probe next to fio's connection.
                .arg("--shared=4")
                .arg("--cache=writeback")
                .arg(format!("--aio={aio}"))
                .arg(file);
            cmd
        }
        Subject::Nbdkit | Subject::NbdkitTls => {
            let mut cmd = Command::new("nbdkit");
            cmd.args([
                "--exit-with-parent",
                "--foreground",
                "--ipaddr",
                "127.0.0.1",
            ])
            .args(["--port", &port.to_string()]);
            if let Some(dirs) = tls {
                cmd.arg("--tls=require")
                    .arg(format!("--tls-certificates={}", dirs.server.display()));
            }
            cmd.arg("file").arg(file);
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
