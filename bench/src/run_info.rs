//! When and where a suite ran: the command, its start and end, the machine, the tools and the
//! load around it. A suite's report carries one (flattened into its JSON, so every report has
//! the same top-level fields) and opens with its header.

use crate::machine::{self, Machine, Tools};
use anyhow::Result;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct RunInfo {
    pub command: String,
    pub started: String,
    pub finished: String,
    pub machine: Machine,
    pub tools: Tools,
    pub load_before: String,
    pub load_after: String,
    /// The UTC date the run started, for its results' file names.
    #[serde(skip)]
    date: String,
}

impl RunInfo {
    /// Probes the tools (`bin` built from `workspace`) and the machine whose filesystem holds
    /// `scratch`, and notes the load and the time: call it right before the suite's work.
    pub fn begin(command: String, bin: &Path, workspace: &Path, scratch: &Path) -> Result<RunInfo> {
        let tools = Tools::probe(bin, workspace)?;
        let load_before = machine::load_average();
        let (date, started) = machine::utc_now();
        Ok(RunInfo {
            command,
            started,
            finished: String::new(),
            machine: Machine::probe(scratch),
            tools,
            load_before,
            load_after: String::new(),
            date,
        })
    }

    /// Notes the end time and the load after the run.
    pub fn finish(&mut self) {
        self.finished = machine::utc_now().1;
        self.load_after = machine::load_average();
    }

    /// The results' file stem: `<suite>-<YYYY-MM-DD>-<HHMM>` of the start.
    pub fn stem(&self, suite: &str) -> String {
        format!("{suite}-{}-{}", self.date, machine::hhmm(&self.started))
    }

    /// A report's first screen: `# {title} — {started}`, the command that produced it and the
    /// "Machine and tools" table with `tools`.
    pub fn header(&self, o: &mut String, title: &str, tools: &[(&str, String)]) {
        let _ = writeln!(o, "# {title} — {}\n", self.started);
        let _ = writeln!(o, "```\n{}\n```\n", self.command);
        crate::report::machine_table(
            o,
            &self.machine,
            (&self.load_before, &self.load_after),
            &format!("{} → {}", self.started, self.finished),
            tools,
        );
    }
}
