//! A hasher for keys nobody outside chooses: call ids and target ids (ours,
//! sequential), group slots, and values that are already keyed SipHash outputs. One
//! multiply spreads them over the table; SipHash again would cost each lookup tens of
//! instructions per probe (a connect makes about a dozen). Never use it for keys a
//! peer picks: it offers no protection against chosen collisions.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A `HashMap` keyed by numbers we choose ([`Spread`]).
pub type NumMap<K, V> = HashMap<K, V, BuildHasherDefault<Spread>>;

/// Fibonacci hashing, one multiply per word written.
#[derive(Default, Clone, Copy)]
pub struct Spread(u64);

impl Hasher for Spread {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}
