//! A minimal NBD client for measurements that must not include a client's own start-up: fixed
//! newstyle handshake with `NBD_OPT_GO` (no structured replies, so every reply is simple), then
//! `NBD_CMD_READ`s, pipelined and matched by cookie; and writes, trims, zeroing and flushes
//! one at a time, for workloads that must know the order their requests took.

use anyhow::{Context, Result, bail, ensure};
use nbd_server::proto;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub struct NbdClient {
    stream: TcpStream,
    /// Export size from `NBD_INFO_EXPORT`.
    pub size: u64,
    next_cookie: u64,
}

fn read_u16(s: &mut TcpStream) -> Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(s: &mut TcpStream) -> Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(s: &mut TcpStream) -> Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

impl NbdClient {
    /// Handshakes on an open connection and selects the default export `""`.
    pub fn handshake(mut stream: TcpStream) -> Result<NbdClient> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        ensure!(read_u64(&mut stream)? == proto::NBDMAGIC, "no NBDMAGIC");
        ensure!(
            read_u64(&mut stream)? == proto::IHAVEOPT,
            "not fixed newstyle"
        );
        let flags = read_u16(&mut stream)?;
        ensure!(
            flags & proto::FLAG_FIXED_NEWSTYLE != 0,
            "server is not fixed newstyle"
        );
        let mut client_flags = proto::CLIENT_FIXED_NEWSTYLE;
        if flags & proto::FLAG_NO_ZEROES != 0 {
            client_flags |= proto::CLIENT_NO_ZEROES;
        }
        // NBD_OPT_GO with an empty name and no information requests.
        let mut msg = Vec::with_capacity(32);
        msg.extend_from_slice(&client_flags.to_be_bytes());
        msg.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&proto::OPT_GO.to_be_bytes());
        msg.extend_from_slice(&6u32.to_be_bytes()); // u32 name length + u16 info count
        msg.extend_from_slice(&0u32.to_be_bytes());
        msg.extend_from_slice(&0u16.to_be_bytes());
        stream.write_all(&msg)?;
        let mut size = None;
        loop {
            ensure!(
                read_u64(&mut stream)? == proto::OPTION_REPLY_MAGIC,
                "bad option reply magic"
            );
            ensure!(
                read_u32(&mut stream)? == proto::OPT_GO,
                "reply to another option"
            );
            let kind = read_u32(&mut stream)?;
            let len = read_u32(&mut stream)? as usize;
            let mut data = vec![0u8; len];
            stream.read_exact(&mut data)?;
            match kind {
                proto::REP_ACK => break,
                proto::REP_INFO if data.len() >= 12 && data[..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into()?));
                }
                proto::REP_INFO => {}
                other => bail!(
                    "NBD_OPT_GO refused (reply {other:#x}): {}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
        Ok(NbdClient {
            stream,
            size: size.context("the server sent no NBD_INFO_EXPORT")?,
            next_cookie: 1,
        })
    }

    /// Reads `(offset, length)` ranges with up to `depth` requests in flight; returns the data
    /// in request order.
    pub fn read_many(&mut self, ranges: &[(u64, u32)], depth: usize) -> Result<Vec<Vec<u8>>> {
        let mut out: Vec<Option<Vec<u8>>> = vec![None; ranges.len()];
        let mut in_flight: HashMap<u64, usize> = HashMap::new();
        let mut sent = 0;
        let mut done = 0;
        while done < ranges.len() {
            let mut batch = Vec::new();
            while sent < ranges.len() && in_flight.len() < depth.max(1) {
                let (offset, length) = ranges[sent];
                let cookie = self.next_cookie;
                self.next_cookie += 1;
                batch.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
                batch.extend_from_slice(&0u16.to_be_bytes());
                batch.extend_from_slice(&proto::CMD_READ.to_be_bytes());
                batch.extend_from_slice(&cookie.to_be_bytes());
                batch.extend_from_slice(&offset.to_be_bytes());
                batch.extend_from_slice(&length.to_be_bytes());
                in_flight.insert(cookie, sent);
                sent += 1;
            }
            if !batch.is_empty() {
                self.stream.write_all(&batch)?;
            }
            ensure!(
                read_u32(&mut self.stream)? == proto::SIMPLE_REPLY_MAGIC,
                "expected a simple reply"
            );
            let error = read_u32(&mut self.stream)?;
            let cookie = read_u64(&mut self.stream)?;
            let index = in_flight
                .remove(&cookie)
                .with_context(|| format!("reply for unknown cookie {cookie}"))?;
            let (offset, length) = ranges[index];
            if error != 0 {
                bail!("read of {length} bytes at {offset} failed: NBD error {error}");
            }
            let mut data = vec![0u8; length as usize];
            self.stream.read_exact(&mut data)?;
            out[index] = Some(data);
            done += 1;
        }
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// One read.
    pub fn read(&mut self, offset: u64, length: u32) -> Result<Vec<u8>> {
        Ok(self
            .read_many(&[(offset, length)], 1)?
            .pop()
            .unwrap_or_default())
    }

    /// One request of `command` (no reply payload: not a read), waited for. `Ok(error)` is the
    /// server's answer (0: done); `Err` a connection that failed.
    pub fn request(
        &mut self,
        command: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<u32> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut msg = Vec::with_capacity(28 + payload.len());
        msg.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        msg.extend_from_slice(&0u16.to_be_bytes());
        msg.extend_from_slice(&command.to_be_bytes());
        msg.extend_from_slice(&cookie.to_be_bytes());
        msg.extend_from_slice(&offset.to_be_bytes());
        msg.extend_from_slice(&length.to_be_bytes());
        msg.extend_from_slice(payload);
        self.stream.write_all(&msg)?;
        ensure!(
            read_u32(&mut self.stream)? == proto::SIMPLE_REPLY_MAGIC,
            "expected a simple reply"
        );
        let error = read_u32(&mut self.stream)?;
        ensure!(
            read_u64(&mut self.stream)? == cookie,
            "a reply to another request"
        );
        Ok(error)
    }

    /// `NBD_CMD_DISC`, then the connection closes.
    pub fn disconnect(mut self) -> Result<()> {
        let mut msg = Vec::with_capacity(28);
        msg.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        msg.extend_from_slice(&0u16.to_be_bytes());
        msg.extend_from_slice(&proto::CMD_DISC.to_be_bytes());
        msg.extend_from_slice(&0u64.to_be_bytes());
        msg.extend_from_slice(&0u64.to_be_bytes());
        msg.extend_from_slice(&0u32.to_be_bytes());
        self.stream.write_all(&msg)?;
        Ok(())
    }
}
