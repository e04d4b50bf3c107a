//! TLS on NBD with real clients: libnbd's `nbdinfo` and `nbdcopy` over `nbds://` with X.509
//! certificates (made by `openssl` here) and with pre-shared keys, qemu's `tls-creds-x509` and
//! `tls-creds-psk`; a plaintext client of a server that requires TLS gets `ERR_TLS_REQD`; wrong
//! CAs, missing or foreign client certificates, wrong keys and garbage instead of a ClientHello
//! each fail that connection alone while the server goes on serving.

mod common;
use common::pki::{Pki, set_mode};
use common::{Server, ServerOptions, assert_fails_with, bucketdisk_bin, require_tool, run_output};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;

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
    let server = tls_dir_server(&pki.path("server-dir"), &["--tls-verify-peer"]);
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
    // qemu-img over TLS: the export's size, and a copy of it.
    require_tool("qemu-img");
    let image = format!("driver=nbd,host=localhost,port={p},export=disk,tls-creds=tls0");
    let info = run_output(Command::new("qemu-img").args([
        "info",
        "--object",
        &x509,
        "--image-opts",
        &image,
    ]));
    assert_ok(&info, "qemu-img info over TLS");
    assert!(
        String::from_utf8_lossy(&info.stdout).contains("1 GiB"),
        "{info:?}"
    );
    let converted = pki.path("converted.raw");
    assert_ok(
        &run_output(
            Command::new("qemu-img")
                .args([
                    "convert",
                    "--object",
                    &x509,
                    "--image-opts",
                    &image,
                    "-O",
                    "raw",
                ])
                .arg(&converted),
        ),
        "qemu-img convert over TLS",
    );
    let bytes = std::fs::read(&converted).expect("converted");
    assert!(bytes[1 << 20..3 << 20].iter().all(|b| *b == 0x5a));
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
const REP_INFO: u32 = 3;
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
fn option(s: &mut (impl Read + Write), option: u32, data: &[u8]) -> u32 {
    send_option(s, option, data);
    reply(s, option)
}

fn send_option(s: &mut impl Write, option: u32, data: &[u8]) {
    let mut request = Vec::new();
    request.extend_from_slice(&IHAVEOPT.to_be_bytes());
    request.extend_from_slice(&option.to_be_bytes());
    request.extend_from_slice(&(data.len() as u32).to_be_bytes());
    request.extend_from_slice(data);
    s.write_all(&request).expect("option");
}

/// One option reply to `option`: its type (its data skipped).
fn reply(s: &mut impl Read, option: u32) -> u32 {
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
    let server = tls_dir_server(&dir, &[]);
    let p = port(&server);
    let uri = |ca_dir: &str| {
        format!(
            "nbds://localhost:{p}/?tls-certificates={}",
            pki.path(ca_dir).display()
        )
    };
    let hangup = |expect: &str| hangup(&server, expect);
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

/// Sends SIGHUP to the server and waits for `expect` to appear once more in its log.
fn hangup(server: &Server, expect: &str) {
    let pid = server.child.as_ref().expect("running").id();
    let before = server.log_text().matches(expect).count();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill")
            .success()
    );
    wait_for_log(server, expect, before);
}

/// Waits until `expect` appears in the server's log more than `before` times.
fn wait_for_log(server: &Server, expect: &str, before: usize) {
    wait_for_log_where(server, expect, |log| log.matches(expect).count() > before);
}

/// Waits (10 s at most) until the server's log satisfies `found`; `what` names it on failure.
fn wait_for_log_where(server: &Server, what: &str, found: impl Fn(&str) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !found(&server.log_text()) {
        assert!(
            std::time::Instant::now() < deadline,
            "no {what:?} in the log:\n{}",
            server.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A server requiring TLS with the credentials in `dir` (qemu's and nbdkit's layout).
fn tls_dir_server(dir: &std::path::Path, extra: &[&str]) -> Server {
    let mut args: Vec<String> = vec![
        "--tls".into(),
        "require".into(),
        "--tls-dir".into(),
        dir.display().to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    tls_server(&args)
}

fn x509_server(pki: &Pki, cert: &str, extra: &[&str]) -> Server {
    let mut args: Vec<String> = vec![
        "--tls".into(),
        "require".into(),
        "--tls-cert".into(),
        pki.path(&format!("{cert}-cert.pem")).display().to_string(),
        "--tls-key".into(),
        pki.path(&format!("{cert}-key.pem")).display().to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    tls_server(&args)
}

#[test]
fn expired_and_not_yet_valid_certificates_fail_that_handshake_alone() {
    let pki = Pki::new();
    let (past, past_end) = ("20200101000000Z", "20200102000000Z");
    let (future, future_end) = ("20990101000000Z", "20990102000000Z");
    pki.issue_dated(
        "expired-server",
        "ca",
        "localhost",
        "server.ext",
        past,
        past_end,
    );
    pki.issue_dated(
        "expired-client",
        "ca",
        "client",
        "client.ext",
        past,
        past_end,
    );
    pki.issue_dated(
        "future-client",
        "ca",
        "client",
        "client.ext",
        future,
        future_end,
    );

    // A server whose certificate expired: clients refuse it; the server goes on.
    let server = x509_server(&pki, "expired-server", &[]);
    let p = port(&server);
    let ca_only = pki.path("ca-only");
    let uri = format!(
        "nbds://localhost:{p}/?tls-certificates={}",
        ca_only.display()
    );
    assert_refused(&nbdinfo(&uri), "an expired server certificate");
    let mut plain = greeted(p);
    assert_eq!(option(&mut plain, OPT_LIST, &[]), REP_ERR_TLS_REQD);
    drop(server);

    // Client certificates outside their validity, with --tls-verify-peer: refused, and the log
    // names the check that failed; a valid one is served in between.
    let ca = pki.path("ca-cert.pem").display().to_string();
    let server = x509_server(&pki, "server", &["--tls-ca", &ca, "--tls-verify-peer"]);
    let p = port(&server);
    for (cert, reason) in [
        ("expired-client", "certificate has expired"),
        ("future-client", "certificate is not yet valid"),
    ] {
        let dir = format!("{cert}-dir");
        pki.layout(
            &dir,
            &[
                ("ca-cert.pem", "ca-cert.pem"),
                ("client-cert.pem", &format!("{cert}-cert.pem")),
                ("client-key.pem", &format!("{cert}-key.pem")),
            ],
        );
        let before = server.log_text().matches(reason).count();
        let uri = |d: &str| {
            format!(
                "nbds://localhost:{p}/?tls-certificates={}",
                pki.path(d).display()
            )
        };
        assert_refused(&nbdinfo(&uri(&dir)), cert);
        wait_for_log(&server, reason, before);
        assert_ok(&nbdinfo(&uri("client-dir")), "a valid client certificate");
    }
}

#[test]
fn a_client_that_stalls_mid_handshake_is_dropped_at_the_limit() {
    let pki = Pki::new();
    let server = x509_server(&pki, "server", &["--tls-handshake-timeout", "2s"]);
    let p = port(&server);
    let mut stalled = greeted(p);
    assert_eq!(option(&mut stalled, OPT_STARTTLS, &[]), REP_ACK);
    // The header of a ClientHello record announcing 200 bytes, and nothing more.
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0xc8])
        .expect("half a hello");
    let started = std::time::Instant::now();
    // Others are served meanwhile.
    let uri = format!(
        "nbds://localhost:{p}/?tls-certificates={}",
        pki.path("ca-only").display()
    );
    assert_ok(&nbdinfo(&uri), "a client beside the stalled one");
    let mut rest = Vec::new();
    let closed = stalled.read_to_end(&mut rest);
    assert!(
        closed.is_ok(),
        "the server closes the connection: {closed:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(1500)
            && waited < std::time::Duration::from_secs(8),
        "closed after {waited:?}"
    );
    wait_for_log(&server, "TLS handshake not finished within 2s", 0);
}

unsafe extern "C" {
    /// libssl's (the openssl crate has no binding): starts a renegotiation on the next I/O.
    fn SSL_renegotiate(ssl: *mut openssl_sys::SSL) -> std::os::raw::c_int;
}

/// A TLS 1.2 session on the default export spoken by hand (what no packaged client does:
/// renegotiate, or hold a session open across a reload).
fn tls12_session(port: u16, ca: &Path) -> openssl::ssl::SslStream<TcpStream> {
    use openssl::ssl::{SslConnector, SslMethod, SslVersion};
    let mut plain = greeted(port);
    assert_eq!(option(&mut plain, OPT_STARTTLS, &[]), REP_ACK);
    let mut builder = SslConnector::builder(SslMethod::tls_client()).expect("connector");
    builder.set_ca_file(ca).expect("CA");
    builder
        .set_max_proto_version(Some(SslVersion::TLS1_2))
        .expect("TLS 1.2");
    let mut tls = builder
        .build()
        .connect("localhost", plain)
        .expect("TLS handshake");
    let mut go = Vec::new();
    go.extend_from_slice(&0u32.to_be_bytes());
    go.extend_from_slice(&0u16.to_be_bytes());
    send_option(&mut tls, OPT_GO, &go);
    loop {
        match reply(&mut tls, OPT_GO) {
            REP_ACK => break,
            REP_INFO => continue,
            other => panic!("OPT_GO answered {other:#x}"),
        }
    }
    tls
}

/// NBD_CMD_READ of 4 KiB at 0 (simple reply): its bytes.
fn read_4k(s: &mut (impl Read + Write), handle: u64) -> std::io::Result<Vec<u8>> {
    let mut request = Vec::new();
    request.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    request.extend_from_slice(&0u16.to_be_bytes()); // flags
    request.extend_from_slice(&0u16.to_be_bytes()); // READ
    request.extend_from_slice(&handle.to_be_bytes());
    request.extend_from_slice(&0u64.to_be_bytes());
    request.extend_from_slice(&4096u32.to_be_bytes());
    s.write_all(&request)?;
    let mut head = [0u8; 16];
    s.read_exact(&mut head)?;
    assert_eq!(
        u32::from_be_bytes(head[..4].try_into().unwrap()),
        0x6744_6698
    );
    assert_eq!(
        u32::from_be_bytes(head[4..8].try_into().unwrap()),
        0,
        "error"
    );
    assert_eq!(u64::from_be_bytes(head[8..].try_into().unwrap()), handle);
    let mut data = vec![0u8; 4096];
    s.read_exact(&mut data)?;
    Ok(data)
}

#[test]
fn sessions_outlive_a_reload_and_renegotiation_is_refused() {
    use foreign_types::ForeignTypeRef;
    let pki = Pki::new();
    let server = tls_dir_server(&pki.path("server-dir"), &[]);
    let p = port(&server);
    let ca = pki.path("ca-cert.pem");
    let mut session = tls12_session(p, &ca);
    assert_eq!(session.ssl().version_str(), "TLSv1.2");
    read_4k(&mut session, 1).expect("read before the reload");
    // SIGHUP: connected clients keep their sessions.
    hangup(&server, "read again");
    read_4k(&mut session, 2).expect("read on the same session after the reload");

    // A renegotiation the client asks for: refused, that connection ends, the log says so.
    let local = session.get_ref().local_addr().expect("address").to_string();
    // SAFETY: the pointer is the live session's; SSL_renegotiate only sets a flag on it.
    let asked = unsafe { SSL_renegotiate(session.ssl().as_ptr()) };
    assert_eq!(asked, 1, "the client side can ask");
    let renegotiated = session.do_handshake();
    assert!(renegotiated.is_err(), "the server refuses to renegotiate");
    assert!(read_4k(&mut session, 3).is_err(), "that session is over");
    drop(session);
    let refused = "asked to renegotiate TLS: refused";
    wait_for_log_where(&server, refused, |log| {
        log.lines()
            .any(|l| l.contains(&local) && l.contains(refused))
    });
    // Everyone else is served.
    let mut other = tls12_session(p, &ca);
    read_4k(&mut other, 4).expect("another client");
}

#[test]
fn fio_over_nbds_verifies_what_it_wrote() {
    require_tool("fio");
    let pki = Pki::new();
    let server = x509_server(&pki, "server", &[]);
    // libnbd reads a client's CA from $HOME/.pki/libnbd when the URI names none (fio's nbd
    // engine passes the URI as it is).
    let home = tempfile::tempdir().expect("home");
    let pki_dir = home.path().join(".pki/libnbd");
    std::fs::create_dir_all(&pki_dir).expect("pki dir");
    std::fs::copy(pki.path("ca-cert.pem"), pki_dir.join("ca-cert.pem")).expect("ca");
    let out = run_output(
        Command::new("fio")
            .args([
                "--name=tls",
                "--ioengine=nbd",
                &format!("--uri=nbds://localhost:{}/", port(&server)),
                "--rw=randwrite",
                "--bs=64k",
                "--iodepth=8",
                "--size=32M",
                "--verify=crc32c",
                "--do_verify=1",
                "--output-format=json",
                "--verify_state_save=0",
            ])
            .env("HOME", home.path())
            .current_dir(home.path()),
    );
    assert_ok(&out, "fio over TLS");
    let json: serde_json::Value = serde_json::from_slice(
        &out.stdout[out.stdout.iter().position(|&b| b == b'{').unwrap_or(0)..],
    )
    .expect("fio JSON");
    let job = &json["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert_eq!(job["write"]["io_bytes"], 32 << 20, "{job}");
    assert_eq!(job["read"]["io_bytes"], 32 << 20, "verified: {job}");
}
