//! The binary starts, serves the default export, and stops cleanly on SIGTERM.

mod common;
use common::*;
use std::process::Command;

#[test]
fn serves_default_export_and_stops_cleanly() {
    require_tool("nbdinfo");
    let mut server = Server::start();
    let size = run(Command::new("nbdinfo").arg("--size").arg(server.uri()));
    assert_eq!(size.trim(), GIB.to_string());
    assert!(server.stop().success(), "{}", server.log_text());
    assert!(server.log_text().contains("stopped cleanly"));
}
