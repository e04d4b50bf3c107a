//! Threads at the lowest CPU and I/O priority for work that must not compete with serving
//! requests: the uploader's CPU-heavy work (building block contents from the journal,
//! compressing, writing the cache) and the local-directory store's writes. When the machine is
//! short of CPU or disk, requests being served win and the background takes what is left.
//!
//! Measured (the uploader's work) on the reference 2-core VM, warm 2 GiB region, 5 s runs, against the same work on
//! tokio's blocking pool: fio 1M writes QD8 310–390 → 544–557 MiB/s, 4k random writes QD32
//! 51k → 54k IOPS. Uploads still get the whole machine when requests stop, and a writer that
//! outruns them is held back by the journal limit as before, so nothing waits forever.

use std::io;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Nice value of the threads (19: the lowest priority).
const NICENESS: i32 = 19;

/// I/O priority of the threads: best effort, level 7 (the lowest of its class). Not the idle
/// class: idle I/O can wait without bound behind a busy writer, and the journal limit already
/// holds a writer back when uploads fall behind.
const IOPRIO_BEST_EFFORT_LOWEST: libc::c_int = (2 << 13) | 7;

type Job = Box<dyn FnOnce() + Send>;

pub struct LowPriorityThreads {
    jobs: Sender<Job>,
}

impl LowPriorityThreads {
    /// Starts `threads` threads sharing one queue; they end when this is dropped (each after
    /// finishing the job it is on). With one thread, jobs run in the order they were sent.
    pub fn start(name: &str, threads: usize) -> io::Result<LowPriorityThreads> {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads.max(1) {
            let queue = Arc::clone(&queue);
            let name = if threads > 1 {
                format!("{name}-{i}")
            } else {
                name.to_string()
            };
            std::thread::Builder::new().name(name).spawn(move || {
                lower_own_priority();
                while let Some(job) = next_job(&queue) {
                    // A job that panics reports failure to its caller (its result channel is
                    // dropped) and the thread goes on serving the next jobs.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })?;
        }
        Ok(LowPriorityThreads { jobs })
    }

    /// Runs `f` on one of the threads and waits for it without blocking the caller's async
    /// worker.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let (done, result) = oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = done.send(f());
            }))
            .map_err(|_| io::Error::other("the low-priority threads are gone"))?;
        result
            .await
            .map_err(|_| io::Error::other("a low-priority job did not finish"))?
    }
}

/// The next job of a shared queue; `None` once the sender is gone. The lock is held only while
/// waiting, never while a job runs.
fn next_job(queue: &Mutex<Receiver<Job>>) -> Option<Job> {
    let queue = queue
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    queue.recv().ok()
}

/// Lowers the calling thread's CPU and I/O priority (Linux keeps both per thread). Lowering
/// one's own needs no privilege; failure only means the work competes as an equal.
fn lower_own_priority() {
    // SAFETY: plain system calls on the calling thread's own id.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    // SAFETY: as above.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, NICENESS) } != 0 {
        tracing::debug!(
            "cannot lower a background thread's CPU priority: {}",
            io::Error::last_os_error()
        );
    }
    // SAFETY: as above; IOPRIO_WHO_PROCESS (1) with a thread id sets that thread's priority.
    let io = unsafe { libc::syscall(libc::SYS_ioprio_set, 1, tid, IOPRIO_BEST_EFFORT_LOWEST) };
    if io != 0 {
        tracing::debug!(
            "cannot lower a background thread's I/O priority: {}",
            io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_in_order_at_low_priority() {
        let cpu = LowPriorityThreads::start("test-background", 1).expect("start");
        let (nice, io) = cpu
            .run(|| {
                // SAFETY: read the calling thread's own priorities.
                let tid = unsafe { libc::syscall(libc::SYS_gettid) };
                let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
                let io = unsafe { libc::syscall(libc::SYS_ioprio_get, 1, tid) };
                Ok((nice, io))
            })
            .await
            .expect("run");
        assert_eq!(nice, NICENESS);
        assert_eq!(io, i64::from(IOPRIO_BEST_EFFORT_LOWEST));
        let mut results = Vec::new();
        for i in 0..5 {
            results.push(cpu.run(move || Ok(i * 2)).await.expect("run"));
        }
        assert_eq!(results, vec![0, 2, 4, 6, 8]);
        let failed = cpu
            .run(|| -> io::Result<()> { Err(io::Error::other("boom")) })
            .await;
        assert_eq!(
            failed.expect_err("error passes through").to_string(),
            "boom"
        );
        let panicked = cpu.run(|| -> io::Result<()> { panic!("a bug") }).await;
        assert!(panicked.is_err(), "a panicking job is an error");
        assert_eq!(cpu.run(|| Ok(7)).await.expect("still running"), 7);
    }

    #[tokio::test]
    async fn a_pool_runs_jobs_side_by_side() {
        let pool = LowPriorityThreads::start("test-pool", 2).expect("start");
        let barrier = Arc::new(std::sync::Barrier::new(2));
        // Each job waits for the other: this only finishes if two threads run them at once.
        let meet = |b: Arc<std::sync::Barrier>| {
            move || {
                b.wait();
                Ok(())
            }
        };
        let (a, b) = tokio::join!(
            pool.run(meet(barrier.clone())),
            pool.run(meet(barrier.clone()))
        );
        a.expect("first");
        b.expect("second");
    }
}
