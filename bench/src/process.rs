//! Child processes the benchmark owns: servers under test and fio.
//!
//! Every child is started with `PR_SET_PDEATHSIG`, so it dies with the benchmark even when the
//! benchmark itself is killed with SIGKILL, and servers are wrapped in [`ServerProcess`], whose
//! `Drop` stops them on every exit path (errors, panics, early returns).

use anyhow::{Context, Result, bail};
use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long a server gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(50);

/// Makes `cmd`'s child receive SIGTERM when the benchmark exits, however it exits.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// A free TCP port on the loopback interface (bound and released, so a small race remains).
pub fn free_loopback_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener
        .local_addr()
        .context("reading the bound address")?
        .port())
}

/// Runs a command to completion and returns its trimmed stdout, failing on a non-zero exit.
pub fn output_of(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Waits for a child with a deadline; kills it (SIGKILL) if the deadline passes.
pub fn wait_with_timeout(child: &mut Child, what: &str, timeout: Duration) -> Result<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for {what}"))?
        {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {timeout:?}; killed it");
        }
        std::thread::sleep(POLL);
    }
}

/// A server under test. Output goes to a log file; dropping it stops the process.
pub struct ServerProcess {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl ServerProcess {
    /// Starts `cmd` with stdout and stderr written to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("duplicating {}", log.display()))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(ServerProcess {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits until the server answers on `addr` with the NBD greeting ("NBDMAGIC").
    pub fn wait_until_serving(&mut self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child
                    .try_wait()
                    .with_context(|| format!("checking on {}", self.name))?
            {
                bail!(
                    "{} exited before serving ({status}); log tail:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if nbd_greeting(addr).is_ok() {
                // Another process may have taken the port between our probe for a free one and
                // the server's bind; then the greeting is not ours, and our server has exited.
                std::thread::sleep(Duration::from_millis(200));
                return self.ensure_running();
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not start serving on {addr} within {timeout:?}; log tail:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Fails if the server has exited (it must stay up for as long as it is measured).
    pub fn ensure_running(&mut self) -> Result<()> {
        let child = self.child.as_mut().context("server already stopped")?;
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("checking on {}", self.name))?
        {
            bail!(
                "{} exited unexpectedly ({status}); log tail:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    /// CPU time (user + system, all threads) the server has used so far.
    pub fn cpu_time(&self) -> Option<Duration> {
        self.pid().and_then(|pid| process_cpu_time(pid).ok())
    }

    /// SIGTERM, then SIGKILL after a grace period. Returns the exit status.
    pub fn stop(self) -> Result<ExitStatus> {
        self.stop_within(STOP_GRACE)
    }

    /// SIGTERM, then SIGKILL if the server has not exited after `grace` (a server that
    /// uploads its backlog on a clean stop may need longer than the default).
    pub fn stop_within(mut self, grace: Duration) -> Result<ExitStatus> {
        let child = self.child.take().context("server already stopped")?;
        terminate(child, &self.name, grace)
    }

    /// SIGKILL: the crash a server must survive. Returns once the process is gone.
    pub fn kill(mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("server already stopped")?;
        child
            .kill()
            .with_context(|| format!("killing {}", self.name))?;
        child
            .wait()
            .with_context(|| format!("waiting for {} to die", self.name))
    }

    /// Waits for the process to exit by itself (e.g. a FUSE daemon after its unmount); after
    /// `timeout`, SIGKILL.
    pub fn wait_exit(mut self, timeout: Duration) -> Result<ExitStatus> {
        let mut child = self.child.take().context("server already stopped")?;
        wait_with_timeout(&mut child, &self.name, timeout)
    }

    /// The last lines of the server's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.take()
            && let Err(e) = terminate(child, &self.name, STOP_GRACE)
        {
            eprintln!("bench: stopping {}: {e:#}", self.name);
        }
    }
}

fn terminate(mut child: Child, name: &str, grace: Duration) -> Result<ExitStatus> {
    if let Some(status) = child.try_wait().context("checking the server")? {
        return Ok(status);
    }
    let pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
    // SAFETY: kill(2) on our own child, which has not been reaped yet, so the pid is still ours.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_with_timeout(&mut child, name, grace)
        .with_context(|| format!("{name} did not exit after SIGTERM"))
}

/// Connects and reads the 8-byte NBD greeting.
fn nbd_greeting(addr: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut magic = [0u8; 8];
    stream.read_exact(&mut magic)?;
    if &magic == b"NBDMAGIC" {
        Ok(())
    } else {
        Err(std::io::Error::other("not an NBD server"))
    }
}

/// CPU seconds a process has used so far; 0 without a process or when it cannot be read (a
/// statistic for reports, never a reason to fail a run).
pub fn cpu_seconds(pid: Option<u32>) -> f64 {
    pid.and_then(|p| process_cpu_time(p).ok())
        .map_or(0.0, |d| d.as_secs_f64())
}

/// utime + stime of a process (all its threads) from /proc/PID/stat.
pub fn process_cpu_time(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may contain spaces and parentheses; split after the last ')'.
    let (_, rest) = stat.rsplit_once(')').context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime is field 14 and stime field 15 (1-based).
    let ticks = |field: usize| -> Result<u64> {
        fields
            .get(field - 3)
            .context("short /proc stat")?
            .parse::<u64>()
            .context("non-numeric /proc stat field")
    };
    let total = ticks(14)? + ticks(15)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100);
    Ok(Duration::from_secs_f64(total as f64 / hz as f64))
}

/// A process's resident memory from `/proc/PID/status`, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Memory {
    /// Peak resident set size so far (`VmHWM`).
    pub hwm: u64,
    /// Resident now: anonymous memory (heap, stacks) and file-backed pages (mappings).
    pub anon: u64,
    pub file: u64,
}

impl Memory {
    /// Field-wise maximum.
    pub fn max(self, other: Memory) -> Memory {
        Memory {
            hwm: self.hwm.max(other.hwm),
            anon: self.anon.max(other.anon),
            file: self.file.max(other.file),
        }
    }
}

pub fn memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    Ok(Memory {
        hwm: field("VmHWM:").with_context(|| format!("no VmHWM in {path}"))?,
        anon: field("RssAnon:").unwrap_or(0),
        file: field("RssFile:").unwrap_or(0),
    })
}

/// Peak resident set size (`VmHWM`) of a running process, in bytes.
pub fn peak_rss(pid: u32) -> Result<u64> {
    Ok(memory(pid)?.hwm)
}

/// Samples a process's memory every 50 ms in a thread, so that the peak includes the
/// process's last moments (a clean stop that uploads a backlog), when it can no longer be
/// read once the process has exited.
pub struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Memory>>,
}

impl RssSampler {
    pub fn start(pid: u32) -> RssSampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut peak = Memory::default();
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                match memory(pid) {
                    Ok(m) => peak = peak.max(m),
                    Err(_) => break,
                }
                std::thread::sleep(POLL);
            }
            if let Ok(m) = memory(pid) {
                peak = peak.max(m);
            }
            peak
        });
        RssSampler {
            stop,
            thread: Some(thread),
        }
    }

    /// The highest VmHWM seen, and the highest anonymous and file-backed RSS sampled.
    pub fn finish(mut self) -> Memory {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Turns SIGINT/SIGTERM into a flag, so the benchmark unwinds normally: servers are stopped by
/// their guards and the temporary volume is deleted. (Children in the same process group get
/// the terminal's SIGINT themselves; fio stops early and its run fails.)
pub fn catch_interrupts() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

/// Fails once SIGINT or SIGTERM has arrived.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}
