//! The `sqlite3_vfs` named "bucketdisk": main database files are [`DatabaseState`]s looked up by
//! name in a process-wide registry, so every connection to one database shares one state;
//! every other file SQLite opens (temp files, journals) goes to the default VFS unchanged.
//!
//! Connections must use `PRAGMA journal_mode=MEMORY` ([`open_connection`] sets it): durability
//! comes from uploading whole committed transactions as LTX files, so a journal on disk would
//! protect nothing, and WAL mode is not supported. A transaction commits when its writer
//! releases the EXCLUSIVE lock.

use super::state::DatabaseState;
use rusqlite::ffi;
use rusqlite::{Connection, OpenFlags};
use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

pub const VFS_NAME: &str = "bucketdisk";
const VFS_NAME_C: &CStr = c"bucketdisk";

/// Lock levels held on one database by the files (connections) open on it.
#[derive(Default)]
struct Locks {
    shared: usize,
    reserved: Option<u64>,
    pending: Option<u64>,
    exclusive: Option<u64>,
}

struct Entry {
    state: Arc<DatabaseState>,
    locks: Mutex<Locks>,
}

impl Entry {
    fn locks(&self) -> MutexGuard<'_, Locks> {
        self.locks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn registry() -> MutexGuard<'static, HashMap<String, Arc<Entry>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, Arc<Entry>>>> = OnceLock::new();
    REGISTRY
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Makes `state` the database SQLite sees under `name` with this VFS.
pub fn attach(name: &str, state: Arc<DatabaseState>) {
    registry().insert(
        name.to_string(),
        Arc::new(Entry {
            state,
            locks: Mutex::new(Locks::default()),
        }),
    );
}

/// Forgets a database (open connections keep their state until closed).
pub fn detach(name: &str) {
    registry().remove(name);
}

/// Runs `f` on an attached database while no connection holds any lock on it (no reader mid
/// transaction, no writer), keeping new locks out until it returns. `None` if the database is
/// busy or not attached: try again later.
pub fn with_quiet_database<T>(name: &str, f: impl FnOnce(&DatabaseState) -> T) -> Option<T> {
    let entry = registry().get(name).cloned()?;
    let locks = entry.locks();
    let quiet = locks.shared == 0
        && locks.reserved.is_none()
        && locks.pending.is_none()
        && locks.exclusive.is_none();
    quiet.then(|| f(&entry.state))
}

/// Registers the VFS with SQLite (once per process).
pub fn register() -> rusqlite::Result<()> {
    static REGISTERED: OnceLock<c_int> = OnceLock::new();
    let rc = *REGISTERED.get_or_init(|| unsafe {
        // SAFETY: sqlite3_vfs_find(NULL) returns SQLite's default VFS, which lives for the whole
        // process; we copy it and override the entry points we need. The copy is leaked on
        // purpose: SQLite keeps a pointer to it for the rest of the process.
        let default = ffi::sqlite3_vfs_find(std::ptr::null());
        if default.is_null() {
            return ffi::SQLITE_ERROR;
        }
        let mut vfs: ffi::sqlite3_vfs = *default;
        vfs.zName = VFS_NAME_C.as_ptr();
        vfs.pNext = std::ptr::null_mut();
        vfs.szOsFile = (*default)
            .szOsFile
            .max(std::mem::size_of::<VfsFile>() as c_int);
        vfs.pAppData = default.cast();
        vfs.xOpen = Some(x_open);
        vfs.xFullPathname = Some(x_full_pathname);
        vfs.xAccess = Some(x_access);
        vfs.xDelete = Some(x_delete);
        ffi::sqlite3_vfs_register(Box::into_raw(Box::new(vfs)), 0)
    });
    if rc == ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(rusqlite::Error::SqliteFailure(
            ffi::Error::new(rc),
            Some("cannot register the bucketdisk VFS".into()),
        ))
    }
}

/// Opens a connection to an attached database through the VFS.
pub fn open_connection(name: &str) -> rusqlite::Result<Connection> {
    register()?;
    let conn = Connection::open_with_flags_and_vfs(
        name,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        VFS_NAME_C,
    )?;
    let mode: String = conn.query_row("PRAGMA journal_mode=MEMORY", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("memory") {
        return Err(rusqlite::Error::InvalidQuery);
    }
    Ok(conn)
}

/// Our file object: SQLite allocates `szOsFile` bytes and we place this at the start.
#[repr(C)]
struct VfsFile {
    base: ffi::sqlite3_file,
    entry: *const Entry,
    lock: c_int,
    id: u64,
}

unsafe fn default_vfs(vfs: *mut ffi::sqlite3_vfs) -> *mut ffi::sqlite3_vfs {
    // SAFETY: pAppData was set to the default VFS in `register`.
    unsafe { (*vfs).pAppData.cast() }
}

unsafe fn c_name(name: *const c_char) -> Option<String> {
    if name.is_null() {
        return None;
    }
    // SAFETY: SQLite passes NUL-terminated names.
    unsafe { CStr::from_ptr(name) }
        .to_str()
        .ok()
        .map(str::to_string)
}

static IO_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 1,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: None,
    xShmLock: None,
    xShmBarrier: None,
    xShmUnmap: None,
    xFetch: None,
    xUnfetch: None,
};

unsafe extern "C" fn x_open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    unsafe {
        if flags & ffi::SQLITE_OPEN_MAIN_DB == 0 {
            // Journals and temp files: the default VFS, in the same allocation (szOsFile is
            // the larger of the two), with its own io methods.
            let default = default_vfs(vfs);
            return match (*default).xOpen {
                Some(open) => open(default, name, file, flags, out_flags),
                None => ffi::SQLITE_CANTOPEN,
            };
        }
        let Some(key) = c_name(name) else {
            return ffi::SQLITE_CANTOPEN;
        };
        let Some(entry) = registry().get(&key).cloned() else {
            return ffi::SQLITE_CANTOPEN; // not attached
        };
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let f = file.cast::<VfsFile>();
        std::ptr::write(
            f,
            VfsFile {
                base: ffi::sqlite3_file {
                    pMethods: &IO_METHODS,
                },
                entry: Arc::into_raw(entry),
                lock: ffi::SQLITE_LOCK_NONE,
                id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            },
        );
        if !out_flags.is_null() {
            *out_flags = flags;
        }
        ffi::SQLITE_OK
    }
}

unsafe extern "C" fn x_full_pathname(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    n_out: c_int,
    out: *mut c_char,
) -> c_int {
    // Database names are registry keys, not paths: keep them exactly as given.
    unsafe {
        let bytes = CStr::from_ptr(name).to_bytes_with_nul();
        if bytes.len() > n_out as usize {
            return ffi::SQLITE_CANTOPEN;
        }
        std::ptr::copy_nonoverlapping(bytes.as_ptr().cast(), out, bytes.len());
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_access(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    flags: c_int,
    out: *mut c_int,
) -> c_int {
    unsafe {
        if let Some(key) = c_name(name) {
            if registry().contains_key(&key) {
                *out = 1;
                return ffi::SQLITE_OK;
            }
        }
        let default = default_vfs(vfs);
        match (*default).xAccess {
            Some(access) => access(default, name, flags, out),
            None => ffi::SQLITE_ERROR,
        }
    }
}

unsafe extern "C" fn x_delete(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    sync_dir: c_int,
) -> c_int {
    unsafe {
        if let Some(key) = c_name(name) {
            if registry().contains_key(&key) {
                return ffi::SQLITE_IOERR_DELETE; // attached databases are never deleted by SQLite
            }
        }
        let default = default_vfs(vfs);
        match (*default).xDelete {
            Some(delete) => delete(default, name, sync_dir),
            None => ffi::SQLITE_ERROR,
        }
    }
}

unsafe fn file<'a>(f: *mut ffi::sqlite3_file) -> &'a mut VfsFile {
    // SAFETY: only called from IO_METHODS, which are installed only on our VfsFile objects.
    unsafe { &mut *f.cast::<VfsFile>() }
}

unsafe fn entry<'a>(f: &VfsFile) -> &'a Entry {
    // SAFETY: the Arc is kept alive from x_open until x_close.
    unsafe { &*f.entry }
}

unsafe extern "C" fn x_close(f: *mut ffi::sqlite3_file) -> c_int {
    unsafe {
        let vf = file(f);
        x_unlock(f, ffi::SQLITE_LOCK_NONE);
        drop(Arc::from_raw(vf.entry));
        vf.entry = std::ptr::null();
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_read(
    f: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    unsafe {
        let vf = file(f);
        let out = std::slice::from_raw_parts_mut(buf.cast::<u8>(), amount as usize);
        match entry(vf).state.read(offset as u64, out) {
            Ok(n) if n == out.len() => ffi::SQLITE_OK,
            Ok(_) => ffi::SQLITE_IOERR_SHORT_READ, // the buffer is zero-filled
            Err(_) => ffi::SQLITE_IOERR_READ,
        }
    }
}

unsafe extern "C" fn x_write(
    f: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amount: c_int,
    offset: i64,
) -> c_int {
    unsafe {
        let vf = file(f);
        let data = std::slice::from_raw_parts(buf.cast::<u8>(), amount as usize);
        match entry(vf).state.write(offset as u64, data) {
            Ok(()) => ffi::SQLITE_OK,
            Err(_) => ffi::SQLITE_IOERR_WRITE,
        }
    }
}

unsafe extern "C" fn x_truncate(f: *mut ffi::sqlite3_file, size: i64) -> c_int {
    unsafe {
        match entry(file(f)).state.truncate(size as u64) {
            Ok(()) => ffi::SQLITE_OK,
            Err(_) => ffi::SQLITE_IOERR_TRUNCATE,
        }
    }
}

unsafe extern "C" fn x_sync(_f: *mut ffi::sqlite3_file, _flags: c_int) -> c_int {
    // Durability is the upload of committed transactions, not a local fsync.
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_file_size(f: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    unsafe {
        *size = entry(file(f)).state.file_size() as i64;
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_lock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    unsafe {
        let vf = file(f);
        if level <= vf.lock {
            return ffi::SQLITE_OK;
        }
        let e = entry(vf);
        let mut locks = e.locks();
        let others = |owner: Option<u64>| owner.is_some_and(|o| o != vf.id);
        match level {
            ffi::SQLITE_LOCK_SHARED => {
                if others(locks.pending) || others(locks.exclusive) {
                    return ffi::SQLITE_BUSY;
                }
                locks.shared += 1;
            }
            ffi::SQLITE_LOCK_RESERVED => {
                if others(locks.reserved) || others(locks.exclusive) {
                    return ffi::SQLITE_BUSY;
                }
                locks.reserved = Some(vf.id);
            }
            ffi::SQLITE_LOCK_EXCLUSIVE => {
                if others(locks.pending) || others(locks.exclusive) {
                    return ffi::SQLITE_BUSY;
                }
                // PENDING first keeps new readers out while existing ones finish.
                locks.pending = Some(vf.id);
                if locks.shared > 1 {
                    vf.lock = ffi::SQLITE_LOCK_PENDING;
                    return ffi::SQLITE_BUSY;
                }
                locks.exclusive = Some(vf.id);
            }
            _ => return ffi::SQLITE_OK, // PENDING is never requested directly
        }
        vf.lock = level;
        ffi::SQLITE_OK
    }
}

unsafe extern "C" fn x_unlock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    unsafe {
        let vf = file(f);
        if level >= vf.lock {
            return ffi::SQLITE_OK;
        }
        let e = entry(vf);
        let mut guard = e.locks();
        let locks = &mut *guard;
        let was_exclusive = locks.exclusive == Some(vf.id);
        for owner in [
            &mut locks.reserved,
            &mut locks.pending,
            &mut locks.exclusive,
        ] {
            if *owner == Some(vf.id) {
                *owner = None;
            }
        }
        if level == ffi::SQLITE_LOCK_NONE && vf.lock >= ffi::SQLITE_LOCK_SHARED {
            locks.shared = locks.shared.saturating_sub(1);
        }
        vf.lock = level;
        drop(guard);
        if was_exclusive {
            // The writer is done: what it wrote is one transaction.
            e.state.commit();
        }
        ffi::SQLITE_OK
    }
}

unsafe extern "C" fn x_check_reserved_lock(f: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    unsafe {
        let locks = entry(file(f)).locks();
        *out = c_int::from(
            locks.reserved.is_some() || locks.pending.is_some() || locks.exclusive.is_some(),
        );
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_file_control(
    _f: *mut ffi::sqlite3_file,
    _op: c_int,
    _arg: *mut c_void,
) -> c_int {
    ffi::SQLITE_NOTFOUND
}

unsafe extern "C" fn x_sector_size(_f: *mut ffi::sqlite3_file) -> c_int {
    4096
}

unsafe extern "C" fn x_device_characteristics(_f: *mut ffi::sqlite3_file) -> c_int {
    ffi::SQLITE_IOCAP_POWERSAFE_OVERWRITE
}
