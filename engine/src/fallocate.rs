//! fallocate(2) on the sparse files the engine keeps: the local-file engine's volumes and the
//! block cache. `Ok(false)` where the filesystem cannot, so callers fall back to writing zeros.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Deallocates a range (it reads as zeros).
pub fn punch_hole(file: &File, offset: u64, length: u64) -> io::Result<bool> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        length,
    )
}

/// Zeroes a range in place, allocated.
pub fn zero_range(file: &File, offset: u64, length: u64) -> io::Result<bool> {
    fallocate(
        file,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        length,
    )
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, length: u64) -> io::Result<bool> {
    // SAFETY: plain system call on a valid open descriptor.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            length as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(false),
        _ => Err(err),
    }
}
