//! Counting the objects a server writes to a local-directory store, by watching the directory
//! tree with inotify: every object PUT ends as a new name in the tree (object_store's local
//! store writes a staging file `<name>#<n>` and then renames or hard-links it into place), so
//! counting the final names that appear counts PUTs, including objects that compaction or GC
//! deletes again before the run ends (which a before/after listing would miss).

use anyhow::{Result, bail};
use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Watches a directory tree in a thread until [`StoreWatch::finish`].
pub struct StoreWatch {
    stop: Arc<AtomicBool>,
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
    thread: Option<JoinHandle<()>>,
}

struct Watcher {
    fd: i32,
    root: PathBuf,
    dirs: HashMap<i32, PathBuf>,
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
}

const MASK: u32 = libc::IN_CREATE | libc::IN_MOVED_TO;

impl Watcher {
    /// Watches `dir` and, recursively, the directories already in it.
    fn add(&mut self, dir: &Path) {
        let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
            return;
        };
        // SAFETY: fd is our inotify descriptor and c a valid NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd, c.as_ptr(), MASK | libc::IN_ONLYDIR) };
        if wd < 0 {
            return;
        }
        self.dirs.insert(wd, dir.to_path_buf());
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    self.add(&e.path());
                }
            }
        }
    }

    /// The counter a new object at `path` belongs to: its first directory under the root
    /// (`<volume>/chunks/x` → "chunks").
    fn count(&self, path: &Path) {
        let rel = path.strip_prefix(&self.root).unwrap_or(path);
        let parts: Vec<_> = rel.components().collect();
        let key = match parts.len() {
            0 | 1 => "(top)".to_string(),
            2 => "(volume)".to_string(),
            _ => parts[1].as_os_str().to_string_lossy().into_owned(),
        };
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        *counts.entry(key).or_default() += 1;
    }

    fn drain(&mut self) -> bool {
        let mut buf = [0u8; 64 * 1024];
        // SAFETY: reading into a buffer we own, from our non-blocking inotify descriptor.
        let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return false;
        }
        let n = n as usize;
        let header = std::mem::size_of::<libc::inotify_event>();
        let mut at = 0;
        while at + header <= n {
            // SAFETY: the kernel wrote a whole event header at `at`; read it unaligned.
            let ev: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buf.as_ptr().add(at).cast()) };
            let name_bytes = &buf[at + header..at + header + ev.len as usize];
            let name_len = name_bytes
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(name_bytes.len());
            let name = OsStr::from_bytes(&name_bytes[..name_len]);
            at += header + ev.len as usize;
            if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
                *counts.entry("(events lost)".to_string()).or_default() += 1;
                continue;
            }
            let Some(dir) = self.dirs.get(&ev.wd).cloned() else {
                continue;
            };
            let path = dir.join(name);
            if ev.mask & libc::IN_ISDIR != 0 {
                // Objects created before the watch is in place are counted by a listing.
                self.add(&path);
                count_files(&path, &mut |p| self.count(p));
            } else if !name.as_bytes().contains(&b'#') {
                self.count(&path);
            }
        }
        true
    }
}

fn count_files(dir: &Path, f: &mut dyn FnMut(&Path)) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                count_files(&p, f);
            } else if !p.as_os_str().as_bytes().contains(&b'#') {
                f(&p);
            }
        }
    }
}

impl StoreWatch {
    /// Starts watching `root` (the store directory, which must exist).
    pub fn start(root: &Path) -> Result<StoreWatch> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            bail!("inotify_init1: {}", std::io::Error::last_os_error());
        }
        let counts = Arc::new(Mutex::new(BTreeMap::new()));
        let mut watcher = Watcher {
            fd,
            root: root.to_path_buf(),
            dirs: HashMap::new(),
            counts: Arc::clone(&counts),
        };
        watcher.add(root);
        if watcher.dirs.is_empty() {
            // SAFETY: closing our own descriptor.
            unsafe { libc::close(fd) };
            bail!("cannot watch {}", root.display());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                loop {
                    let stopping = stop.load(Ordering::SeqCst);
                    while watcher.drain() {}
                    if stopping {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                // SAFETY: closing our own descriptor.
                unsafe { libc::close(watcher.fd) };
            })
        };
        Ok(StoreWatch {
            stop,
            counts,
            thread: Some(thread),
        })
    }

    /// Stops watching; returns the objects created per first-level directory of the volume
    /// (`chunks`, `blockmap`, `lease`, …).
    pub fn finish(mut self) -> BTreeMap<String, u64> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for StoreWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
