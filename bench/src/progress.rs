//! What the suite is doing right now: a progress bar on a terminal, plain lines otherwise (so
//! a log file or CI output still says which subject and workload ran when).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::Instant;

pub struct Progress {
    bar: Option<ProgressBar>,
    started: Instant,
    done: u64,
    total: u64,
}

impl Progress {
    /// `total` is the number of measured steps (fio runs) planned.
    pub fn new(total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} (eta {eta}) {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar
        });
        Progress {
            bar,
            started: Instant::now(),
            done: 0,
            total,
        }
    }

    /// Announces the step about to run (it counts once [`Progress::step_done`] is called).
    pub fn step(&self, what: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(what.to_string()),
            None => eprintln!(
                "[{:>5.0} s] {}/{} {what}",
                self.started.elapsed().as_secs_f64(),
                self.done + 1,
                self.total
            ),
        }
    }

    pub fn step_done(&mut self) {
        self.done += 1;
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    /// A phase that is not a measured step (starting servers, filling disks).
    pub fn note(&self, what: &str) {
        let line = format!("[{:>5.0} s] {what}", self.started.elapsed().as_secs_f64());
        match &self.bar {
            Some(bar) => {
                bar.set_message(what.to_string());
                bar.println(line);
            }
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
