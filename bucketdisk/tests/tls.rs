//! TLS on NBD with real clients: libnbd's `nbdinfo` and `nbdcopy` over `nbds://` with X.509
//! certificates (made by `openssl` here) and with pre-shared keys, qemu's `tls-creds-x509` and
//! `tls-creds-psk`; a plaintext client of a server that requires TLS gets `ERR_TLS_REQD`; wrong
//! CAs, missing or foreign client certificates, wrong keys and garbage instead of a ClientHello
//! each fail that connection alone while the server goes on serving.

mod common;
use common::{Server, ServerOptions, assert_fails_with, bucketdisk_bin, require_tool, run_output};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Certificates for one test, made with the `openssl` command.
struct Pki {
    dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = run_output(Command::new("openssl").args(args).current_dir(dir));
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

impl Pki {
    fn new() -> Pki {
        require_tool("openssl");
        let pki = Pki {
            dir: tempfile::tempdir().expect("tempdir"),
        };
        let d = pki.dir.path();
        for ca in ["ca", "other-ca"] {
            openssl(
                d,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-days",
                    "2",
                    "-subj",
                    &format!("/CN={ca}"),
                    "-keyout",
                    &format!("{ca}-key.pem"),
                    "-out",
                    &format!("{ca}-cert.pem"),
                ],
            );
        }
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )
        .expect("ext");
        std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
        pki.issue("server", "ca", "localhost", "server.ext");
        pki.issue("client", "ca", "client", "client.ext");
        pki.issue("foreign-client", "other-ca", "intruder", "client.ext");
        // The directory layouts qemu, nbdkit and libnbd read.
        pki.layout(
            "server-dir",
            &[
                ("ca-cert.pem", "ca-cert.pem"),
                ("server-cert.pem", "server-cert.pem"),
                ("server-key.pem", "server-key.pem"),
            ],
        );
        pki.layout(
            "client-dir",
            &[
                ("ca-cert.pem", "ca-cert.pem"),
                ("client-cert.pem", "client-cert.pem"),
                ("client-key.pem", "client-key.pem"),
            ],
        );
        pki.layout("ca-only", &[("ca-cert.pem", "ca-cert.pem")]);
        pki.layout("wrong-ca", &[("ca-cert.pem", "other-ca-cert.pem")]);
        pki.layout(
            "foreign-client-dir",
            &[
                ("ca-cert.pem", "ca-cert.pem"),
                ("client-cert.pem", "foreign-client-cert.pem"),
                ("client-key.pem", "foreign-client-key.pem"),
            ],
        );
        pki
    }

    fn issue(&self, name: &str, ca: &str, cn: &str, ext: &str) {
        let d = self.dir.path();
        openssl(
            d,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{name}-key.pem"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}-cert.pem"),
                "-CAkey",
                &format!("{ca}-key.pem"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                ext,
                "-out",
                &format!("{name}-cert.pem"),
            ],
        );
    }

    fn layout(&self, dir: &str, files: &[(&str, &str)]) {
        let target = self.path(dir);
        std::fs::create_dir_all(&target).expect("mkdir");
        for (name, from) in files {
            std::fs::copy(self.path(from), target.join(name)).expect("copy");
            set_mode(&target.join(name), 0o600);
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A psktool file of `lines`, owner-only.
    fn psk_file(&self, name: &str, lines: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, lines).expect("psk file");
        set_mode(&path, 0o600);
        path
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn port(server: &Server) -> u16 {
    match server.endpoint {
        common::Endpoint::Tcp(port) => port,
        _ => unreachable!("TCP servers only here"),
    }
}

fn tls_server(args: &[String]) -> Server {
    Server::start_with(ServerOptions {
        extra_args: args.to_vec(),
        ..ServerOptions::default()
    })
}

fn nbdinfo(uri: &str) -> std::process::Output {
    require_tool("nbdinfo");
    run_output(Command::new("nbdinfo").arg(uri))
}

fn assert_ok(out: &std::process::Output, what: &str) {
    assert!(out.status.success(), "{what}: {out:?}");
}

fn assert_refused(out: &std::process::Output, what: &str) {
    assert!(!out.status.success(), "{what} should fail: {out:?}");
}

/// qemu-io on the default export over TLS with credentials object `object`.
fn qemu_io(server: &Server, object: &str, command: &str) -> std::process::Output {
    require_tool("qemu-io");
    run_output(Command::new("qemu-io").args([
        "--object",
        object,
        "--image-opts",
        &format!(
            "driver=nbd,host=localhost,port={},export=disk,tls-creds=tls0",
            port(server)
        ),
        "-c",
        command,
    ]))
}

#[test]
fn x509_with_libnbd_and_qemu_and_client_certificates() {
    let pki = Pki::new();
    let server = tls_server(&[
        "--tls".into(),
        "require".into(),
        "--tls-dir".into(),
        pki.path("server-dir").display().to_string(),
        "--tls-verify-peer".into(),
    ]);
    let p = port(&server);
    let uri = |dir: &str| {
        format!(
            "nbds://localhost:{p}/?tls-certificates={}",
            pki.path(dir).display()
        )
    };
    let out = nbdinfo(&uri("client-dir"));
    assert_ok(&out, "nbdinfo with a client certificate");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("with TLS"),
        "{out:?}"
    );

    // Data through qemu over TLS, read back through libnbd's nbdcopy over TLS.
    let x509 = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        pki.path("client-dir").display()
    );
    assert_ok(
        &qemu_io(&server, &x509, "write -P 0x5a 1M 2M"),
        "qemu-io write over TLS",
    );
    assert_ok(
        &qemu_io(&server, &x509, "read -P 0x5a 1M 2M"),
        "qemu-io read over TLS",
    );
    require_tool("nbdcopy");
    let copy = pki.path("copy.raw");
    assert_ok(
        &run_output(Command::new("nbdcopy").arg(uri("client-dir")).arg(&copy)),
        "nbdcopy over TLS",
    );
    let bytes = std::fs::read(&copy).expect("copy");
    assert!(bytes[1 << 20..3 << 20].iter().all(|b| *b == 0x5a));
    assert!(bytes[..1 << 20].iter().all(|b| *b == 0));

    // Each of these fails its own connection only.
    assert_refused(&nbdinfo(&uri("ca-only")), "no client certificate");
    assert_refused(
        &nbdinfo(&uri("foreign-client-dir")),
        "a client certificate of another CA",
    );
    assert_refused(
        &nbdinfo(&uri("wrong-ca")),
        "a server certificate the client's CA did not sign",
    );
    assert_refused(&nbdinfo(&format!("nbd://localhost:{p}/")), "plaintext");
    assert_ok(&nbdinfo(&uri("client-dir")), "still serving");
    let log = server.log_text();
    assert!(
        log.contains("TLS handshake failed"),
        "the log says why:\n{log}"
    );
}

#[test]
fn pre_shared_keys_with_libnbd_and_qemu() {
    let pki = Pki::new();
    let key = "8f1a".repeat(16);
    let keys = pki.psk_file("keys.psk", &format!("alice:{key}\nqemu:{key}\n"));
    let server = tls_server(&[
        "--tls".into(),
        "require".into(),
        "--tls-psk".into(),
        keys.display().to_string(),
    ]);
    let p = port(&server);
    let out = nbdinfo(&format!(
        "nbds://alice@localhost:{p}/?tls-psk-file={}",
        keys.display()
    ));
    assert_ok(&out, "nbdinfo with alice's key");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("with TLS"),
        "{out:?}"
    );

    // qemu reads `keys.psk` in a directory; its default identity is "qemu".
    let qemu_dir = pki.path("qemu-psk");
    std::fs::create_dir_all(&qemu_dir).expect("mkdir");
    std::fs::copy(&keys, qemu_dir.join("keys.psk")).expect("copy");
    let psk = format!(
        "tls-creds-psk,id=tls0,dir={},endpoint=client",
        qemu_dir.display()
    );
    assert_ok(
        &qemu_io(&server, &psk, "write -P 0x33 0 64k"),
        "qemu-io write over PSK",
    );
    assert_ok(
        &qemu_io(&server, &psk, "read -P 0x33 0 64k"),
        "qemu-io read over PSK",
    );

    // A wrong key, and an identity the server does not know.
    let wrong = pki.psk_file(
        "wrong.psk",
        &format!("alice:{}\nmallory:{key}\n", "00".repeat(32)),
    );
    for who in ["alice", "mallory"] {
        assert_refused(
            &nbdinfo(&format!(
                "nbds://{who}@localhost:{p}/?tls-psk-file={}",
                wrong.display()
            )),
            who,
        );
    }
    assert_ok(
        &nbdinfo(&format!(
            "nbds://alice@localhost:{p}/?tls-psk-file={}",
            keys.display()
        )),
        "still serving",
    );
    let log = server.log_text();
    assert!(
        log.contains("no pre-shared key for identity \"mallory\""),
        "{log}"
    );
}

// The raw protocol, for what no well-behaved client sends.
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_ERR_TLS_REQD: u32 = (1 << 31) | 5;

/// Greeted, with fixed newstyle and no zeroes.
fn greeted(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).expect("greeting");
    assert_eq!(
        u64::from_be_bytes(greeting[..8].try_into().unwrap()),
        NBDMAGIC
    );
    s.write_all(&3u32.to_be_bytes()).expect("flags");
    s
}

/// Sends option `option` with `data`; the reply's type (its data skipped).
fn option(s: &mut TcpStream, option: u32, data: &[u8]) -> u32 {
    let mut request = Vec::new();
    request.extend_from_slice(&IHAVEOPT.to_be_bytes());
    request.extend_from_slice(&option.to_be_bytes());
    request.extend_from_slice(&(data.len() as u32).to_be_bytes());
    request.extend_from_slice(data);
    s.write_all(&request).expect("option");
    let mut head = [0u8; 20];
    s.read_exact(&mut head).expect("reply");
    assert_eq!(
        u64::from_be_bytes(head[..8].try_into().unwrap()),
        REPLY_MAGIC
    );
    assert_eq!(u32::from_be_bytes(head[8..12].try_into().unwrap()), option);
    let length = u32::from_be_bytes(head[16..20].try_into().unwrap());
    let mut rest = vec![0u8; length as usize];
    s.read_exact(&mut rest).expect("reply data");
    u32::from_be_bytes(head[12..16].try_into().unwrap())
}

#[test]
fn a_plaintext_client_gets_tls_required_and_garbage_handshakes_fail_alone() {
    let pki = Pki::new();
    let server = tls_server(&[
        "--tls".into(),
        "require".into(),
        "--tls-cert".into(),
        pki.path("server-cert.pem").display().to_string(),
        "--tls-key".into(),
        pki.path("server-key.pem").display().to_string(),
    ]);
    let p = port(&server);
    let mut s = greeted(p);
    let mut go = Vec::new();
    go.extend_from_slice(&0u32.to_be_bytes());
    go.extend_from_slice(&0u16.to_be_bytes());
    assert_eq!(option(&mut s, OPT_GO, &go), REP_ERR_TLS_REQD, "GO in clear");
    assert_eq!(
        option(&mut s, OPT_LIST, &[]),
        REP_ERR_TLS_REQD,
        "LIST in clear"
    );
    // Garbage instead of a ClientHello: that connection ends.
    assert_eq!(option(&mut s, OPT_STARTTLS, &[]), REP_ACK);
    s.write_all(&[0x47u8; 512]).expect("garbage");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    // The server goes on serving.
    let mut again = greeted(p);
    assert_eq!(option(&mut again, OPT_LIST, &[]), REP_ERR_TLS_REQD);
    assert_ok(
        &nbdinfo(&format!(
            "nbds://localhost:{p}/?tls-certificates={}",
            pki.path("ca-only").display()
        )),
        "a TLS client",
    );
}

#[test]
fn key_files_others_can_read_are_refused_at_start() {
    let pki = Pki::new();
    let keys = pki.psk_file("keys.psk", "alice:00112233\n");
    set_mode(&keys, 0o644);
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run_output(
        Command::new(bucketdisk_bin())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--tls",
                "require",
                "--tls-psk",
            ])
            .arg(&keys)
            .arg("--store")
            .arg(dir.path().join("store"))
            .arg("--cache-dir")
            .arg(dir.path().join("cache")),
    );
    assert_fails_with(out, "chmod 600");
    let out = run_output(
        Command::new(bucketdisk_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--tls", "on"])
            .arg("--store")
            .arg(dir.path().join("store")),
    );
    assert_fails_with(
        out,
        "needs --tls-cert and --tls-key, --tls-dir, or --tls-psk",
    );
}

#[test]
fn sighup_reads_the_credentials_again_and_a_bad_reload_keeps_them() {
    let pki = Pki::new();
    pki.issue("server2", "other-ca", "localhost", "server.ext");
    let dir = pki.path("server-dir");
    let server = tls_server(&[
        "--tls".into(),
        "require".into(),
        "--tls-dir".into(),
        dir.display().to_string(),
    ]);
    let p = port(&server);
    let uri = |ca_dir: &str| {
        format!(
            "nbds://localhost:{p}/?tls-certificates={}",
            pki.path(ca_dir).display()
        )
    };
    let hangup = |expect: &str| {
        let pid = server.child.as_ref().expect("running").id();
        let before = server.log_text().matches(expect).count();
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status()
                .expect("kill")
                .success()
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while server.log_text().matches(expect).count() == before {
            assert!(
                std::time::Instant::now() < deadline,
                "no {expect:?} in the log"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    assert_ok(&nbdinfo(&uri("ca-only")), "the first certificate");

    // A key others can read: refused, the credentials in use kept.
    set_mode(&dir.join("server-key.pem"), 0o644);
    hangup("kept as they were");
    assert_ok(&nbdinfo(&uri("ca-only")), "still the first certificate");

    // A certificate from another CA: new handshakes use it.
    std::fs::copy(pki.path("server2-cert.pem"), dir.join("server-cert.pem")).expect("cert");
    std::fs::copy(pki.path("server2-key.pem"), dir.join("server-key.pem")).expect("key");
    set_mode(&dir.join("server-key.pem"), 0o600);
    hangup("read again");
    assert_refused(&nbdinfo(&uri("ca-only")), "the old CA no longer fits");
    assert_ok(
        &nbdinfo(&uri("wrong-ca")),
        "the other CA signs the new certificate",
    );
}
