//! Certificates for a test, made with the `openssl` command: two CAs, a server certificate
//! (localhost, 127.0.0.1), client certificates from each CA, certificates outside their
//! validity, and the directory layouts qemu, nbdkit and libnbd read.

use super::{require_tool, run_output};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Certificates for one test, made with the `openssl` command.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = run_output(Command::new("openssl").args(args).current_dir(dir));
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

impl Pki {
    pub fn new() -> Pki {
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

    /// A new key `<name>-key.pem` and its signing request `<name>.csr` for `cn`.
    fn request(&self, name: &str, cn: &str) {
        openssl(
            self.dir.path(),
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
    }

    pub fn issue(&self, name: &str, ca: &str, cn: &str, ext: &str) {
        let d = self.dir.path();
        self.request(name, cn);
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

    /// A certificate like [`Pki::issue`]'s, valid only from `start` to `end` (ASN.1 times,
    /// `YYYYMMDDHHMMSSZ`): `openssl ca`, the one `openssl` command of 3.0 that takes dates.
    pub fn issue_dated(&self, name: &str, ca: &str, cn: &str, ext: &str, start: &str, end: &str) {
        let d = self.dir.path();
        let db = format!("{name}.db");
        std::fs::create_dir_all(d.join(&db)).expect("ca dir");
        std::fs::write(d.join(&db).join("index.txt"), "").expect("ca index");
        std::fs::write(d.join(&db).join("serial"), "1000\n").expect("ca serial");
        let config = format!(
            "[ca]\ndefault_ca = dated\n[dated]\ndatabase = {db}/index.txt\n\
             new_certs_dir = {db}\nserial = {db}/serial\ndefault_md = sha256\n\
             policy = any\n[any]\ncommonName = supplied\n"
        );
        std::fs::write(d.join(format!("{name}.cnf")), config).expect("ca config");
        self.request(name, cn);
        openssl(
            d,
            &[
                "ca",
                "-batch",
                "-notext",
                "-config",
                &format!("{name}.cnf"),
                "-cert",
                &format!("{ca}-cert.pem"),
                "-keyfile",
                &format!("{ca}-key.pem"),
                "-in",
                &format!("{name}.csr"),
                "-startdate",
                start,
                "-enddate",
                end,
                "-extfile",
                ext,
                "-out",
                &format!("{name}-cert.pem"),
            ],
        );
    }

    pub fn layout(&self, dir: &str, files: &[(&str, &str)]) {
        let target = self.path(dir);
        std::fs::create_dir_all(&target).expect("mkdir");
        for (name, from) in files {
            std::fs::copy(self.path(from), target.join(name)).expect("copy");
            set_mode(&target.join(name), 0o600);
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A psktool file of `lines`, owner-only.
    pub fn psk_file(&self, name: &str, lines: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, lines).expect("psk file");
        set_mode(&path, 0o600);
        path
    }
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}
