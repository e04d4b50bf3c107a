//! A server whose store misbehaves (`--inject-faults`: 20 % of requests fail, time out, stall,
//! come back damaged or lose their reply): an NBD client's writes, FLUSHes and reads all
//! succeed with the right bytes, the server stops cleanly and says what it injected, and a
//! server without faults on an empty cache reads everything back from the store.

mod common;
use common::nbd_client::NbdClient;
use common::*;

const BLOCK: usize = 65536;
const BLOCKS: u64 = 96;

#[test]
fn a_client_sees_right_bytes_through_a_faulty_store_and_the_store_keeps_them() {
    let mut server = Server::start_with(ServerOptions {
        extra_args: vec![
            "--inject-faults".into(),
            "seed=5,rate=0.2,stall=100ms,timeout=300ms".into(),
            // Small: reads of what was uploaded go to the store, through the faults.
            "--cache-size".into(),
            "1M".into(),
            "--sync-interval".into(),
            "100ms".into(),
        ],
        ..ServerOptions::default()
    });
    let mut client = NbdClient::connect(&server.endpoint, "").expect("connect");
    for b in 0..BLOCKS {
        let data = pattern(BLOCK, b);
        client
            .write(b * BLOCK as u64, &data, b % 7 == 0)
            .expect("a write through a faulty store");
        if b % 8 == 7 {
            client.flush().expect("flush");
        }
    }
    client.flush().expect("flush");
    // Once uploaded and out of the 1 MiB cache, most of these come from the store.
    std::thread::sleep(std::time::Duration::from_secs(2));
    for round in 0..2 {
        for b in (0..BLOCKS).rev() {
            let got = client.read(b * BLOCK as u64, BLOCK).expect("a read");
            assert!(
                got == pattern(BLOCK, b),
                "block {b} differs (round {round})"
            );
        }
    }
    client.disconnect().expect("disconnect");
    assert!(server.stop().success(), "{}", server.log_text());
    let log = server.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("injected store faults: requests="))
        .unwrap_or_else(|| panic!("no fault summary in the log:\n{log}"));
    let injected: u64 = line
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter(|(k, _)| !matches!(*k, "requests" | "outage" | "retried"))
        .filter_map(|(_, n)| {
            n.trim_end_matches(|c: char| !c.is_ascii_digit())
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert!(injected >= 10, "too few faults to mean anything: {line}");

    // The store alone: no faults, a new cache.
    std::fs::remove_dir_all(server.cache_dir()).expect("drop the cache");
    server
        .extra_args
        .retain(|a| a != "--inject-faults" && !a.starts_with("seed="));
    server.spawn();
    let mut client = NbdClient::connect(&server.endpoint, "").expect("connect");
    for b in 0..BLOCKS {
        let got = client.read(b * BLOCK as u64, BLOCK).expect("a read");
        assert!(got == pattern(BLOCK, b), "block {b} differs in the store");
    }
    client.disconnect().expect("disconnect");
    assert!(server.stop().success());
}
