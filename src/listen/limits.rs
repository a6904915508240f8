//! Connection admission: the server-wide and per-client-address connection limits.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

const SHARDS: usize = 16;

/// Counts open connections in total and per client address.
#[derive(Debug)]
pub struct ConnLimits {
    max_total: AtomicU32,
    max_per_ip: AtomicU32,
    total: AtomicU32,
    per_ip: Vec<Mutex<HashMap<IpAddr, u32>>>,
}

/// The outcome of admitting a connection.
pub enum Admission {
    /// Holds the connection's place until dropped.
    Admitted(Permit),
    /// The `reason` label of `gatehouse_connections_rejected_total`.
    Refused(&'static str),
}

/// A connection's place in the limits; released on drop.
#[derive(Debug)]
pub struct Permit {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
        let mut shard = self.limits.shard(self.ip);
        if let Some(n) = shard.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                shard.remove(&self.ip);
            }
        }
    }
}

impl ConnLimits {
    pub fn new(max_total: u32, max_per_ip: u32) -> Arc<Self> {
        Arc::new(ConnLimits {
            max_total: AtomicU32::new(max_total),
            max_per_ip: AtomicU32::new(max_per_ip),
            total: AtomicU32::new(0),
            per_ip: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        })
    }

    /// New limits apply to new connections; open ones are not closed.
    pub fn set(&self, max_total: u32, max_per_ip: u32) {
        self.max_total.store(max_total, Ordering::Relaxed);
        self.max_per_ip.store(max_per_ip, Ordering::Relaxed);
    }

    fn shard(&self, ip: IpAddr) -> std::sync::MutexGuard<'_, HashMap<IpAddr, u32>> {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let h = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(ip) as usize;
        self.per_ip[h % SHARDS].lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Admission {
        let max_total = self.max_total.load(Ordering::Relaxed);
        if self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max_total).then_some(n + 1)
            })
            .is_err()
        {
            return Admission::Refused("max_connections");
        }
        let mut shard = self.shard(ip);
        let n = shard.entry(ip).or_insert(0);
        if *n >= self.max_per_ip.load(Ordering::Relaxed) {
            if *n == 0 {
                shard.remove(&ip);
            }
            drop(shard);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Admission::Refused("per_ip");
        }
        *n += 1;
        drop(shard);
        Admission::Admitted(Permit {
            limits: self.clone(),
            ip,
        })
    }

    pub fn open(&self) -> u32 {
        self.total.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_admit_and_release() {
        let l = ConnLimits::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = match l.admit(a) {
            Admission::Admitted(p) => p,
            _ => panic!(),
        };
        let _p2 = match l.admit(a) {
            Admission::Admitted(p) => p,
            _ => panic!(),
        };
        assert!(matches!(l.admit(a), Admission::Refused("per_ip")));
        let _p3 = match l.admit(b) {
            Admission::Admitted(p) => p,
            _ => panic!(),
        };
        assert!(matches!(l.admit(b), Admission::Refused("max_connections")));
        drop(p1);
        assert_eq!(l.open(), 2);
        assert!(matches!(l.admit(a), Admission::Admitted(_)));
    }
}
