//! Per-client limits, so that one client cannot starve the others: how many connections it may
//! hold at once, and how much memory its requests in flight may take across all of them (the
//! payloads read and the replies not yet written: one [`Budget`] per client, shared by its
//! connections).
//!
//! A client is an IP address over TCP (every connection from loopback is one client) and a
//! user id over a Unix socket.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use tokio::sync::Semaphore;

/// Connections one client may hold at once, by default.
pub const DEFAULT_CONNECTIONS: usize = 64;
/// Memory one client's requests in flight may take, by default.
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// A budget's unit: a request holds at least one.
pub const BUDGET_UNIT: u64 = 64 * 1024;

/// Who a connection belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientId {
    Ip(IpAddr),
    Uid(u32),
    /// A Unix socket peer whose user is unknown.
    Unknown,
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientId::Ip(ip) => write!(f, "{ip}"),
            ClientId::Uid(uid) => write!(f, "uid {uid}"),
            ClientId::Unknown => f.write_str("an unknown local user"),
        }
    }
}

/// Memory for requests in flight, in [`BUDGET_UNIT`]s.
#[derive(Clone)]
pub struct Budget {
    pub semaphore: Arc<Semaphore>,
    pub units: u32,
}

impl Budget {
    /// A budget of `bytes` (at least one unit).
    pub fn new(bytes: u64) -> Budget {
        let units = u32::try_from(bytes.div_ceil(BUDGET_UNIT).max(1)).unwrap_or(u32::MAX >> 3);
        Budget {
            semaphore: Arc::new(Semaphore::new(units as usize)),
            units,
        }
    }

    /// Units a request of `bytes` holds: at least one, at most the whole budget (a request
    /// larger than it waits until nothing else of its client is in flight).
    pub fn units_for(&self, bytes: u64) -> u32 {
        (bytes.div_ceil(BUDGET_UNIT).min(u64::from(self.units)) as u32).max(1)
    }
}

struct Client {
    connections: AtomicUsize,
    budget: Budget,
}

/// The limits, and the clients connected now.
pub struct ClientLimits {
    max_connections: usize,
    memory: u64,
    clients: Mutex<HashMap<ClientId, Weak<Client>>>,
}

/// One admitted connection: its client's budget; the connection counts until this drops.
pub struct ClientTicket {
    client: Arc<Client>,
}

impl ClientTicket {
    pub fn budget(&self) -> Budget {
        self.client.budget.clone()
    }
}

impl Drop for ClientTicket {
    fn drop(&mut self) {
        self.client.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits::new(DEFAULT_CONNECTIONS, DEFAULT_MEMORY)
    }
}

impl ClientLimits {
    pub fn new(max_connections: usize, memory: u64) -> ClientLimits {
        ClientLimits {
            max_connections: max_connections.max(1),
            memory,
            clients: Mutex::default(),
        }
    }

    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// A ticket for one more connection of `client`, or `None` if it holds the most already.
    pub fn admit(&self, client: ClientId) -> Option<ClientTicket> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if clients.len() > 256 {
            clients.retain(|_, c| c.strong_count() > 0);
        }
        let entry = match clients.get(&client).and_then(Weak::upgrade) {
            Some(c) => c,
            None => {
                let c = Arc::new(Client {
                    connections: AtomicUsize::new(0),
                    budget: Budget::new(self.memory),
                });
                clients.insert(client, Arc::downgrade(&c));
                c
            }
        };
        // Counted under the map's lock: two connections cannot both take the last place.
        if entry.connections.load(Ordering::Relaxed) >= self.max_connections {
            return None;
        }
        entry.connections.fetch_add(1, Ordering::Relaxed);
        Some(ClientTicket { client: entry })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn a_client_gets_its_connections_and_shares_one_budget() {
        let limits = ClientLimits::new(2, 4 * BUDGET_UNIT);
        let a = ClientId::Ip(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        let b = ClientId::Ip(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)));
        let first = limits.admit(a.clone()).expect("first");
        let second = limits.admit(a.clone()).expect("second");
        assert!(limits.admit(a.clone()).is_none(), "a third is refused");
        let other = limits.admit(b).expect("another client is not affected");

        // One budget for both of a's connections, another for b.
        let taken = first
            .budget()
            .semaphore
            .try_acquire_many_owned(4)
            .expect("all of a's");
        assert!(
            second.budget().semaphore.try_acquire_owned().is_err(),
            "shared"
        );
        assert!(
            other.budget().semaphore.try_acquire_many_owned(4).is_ok(),
            "b's own"
        );
        drop(taken);

        drop(second);
        let again = limits.admit(a.clone()).expect("a place came free");
        drop((first, again));
        assert!(limits.admit(a).is_some());
    }

    #[test]
    fn a_request_holds_at_least_one_unit_and_at_most_the_budget() {
        let budget = Budget::new(4 * BUDGET_UNIT);
        assert_eq!(budget.units_for(0), 1);
        assert_eq!(budget.units_for(BUDGET_UNIT + 1), 2);
        assert_eq!(budget.units_for(1 << 30), 4);
    }
}
