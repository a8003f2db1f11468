//! Rule banks as the agent sees them: trie keys with the bank byte, and the bank flip.
//!
//! The kernel translates new packets with the rule bank named in `RULE_BANK`; the agent writes
//! a new rule set into the other bank and flips, so a change is atomic for the program (see
//! `nat_common::maps::RULE_BANK`).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aya::maps::lpm_trie::Key;
use ipnet::Ipv4Net;
use nat_common::maps::{banked, BankedPrefix, BANK_PREFIX_BITS, RULE_BANKS};

/// How long a bank stays untouched after it stopped being the active one. A program run that
/// read the bank number just before the flip may still be looking things up in it; XDP runs
/// last microseconds, so this is generous by orders of magnitude.
pub const BANK_GRACE: Duration = Duration::from_millis(50);

/// The trie key of `prefix` in `bank`.
pub fn key(bank: u32, prefix: Ipv4Net) -> Key<BankedPrefix> {
    Key::new(
        BANK_PREFIX_BITS + u32::from(prefix.prefix_len()),
        banked(bank, prefix.network().octets()),
    )
}

/// The bank and prefix of a trie key; `None` for a key that no agent writes.
pub fn prefix_of(key: &Key<BankedPrefix>) -> Option<(u32, Ipv4Net)> {
    let data = key.data();
    let len = key.prefix_len().checked_sub(BANK_PREFIX_BITS)?;
    let bank = u32::from(data[0]);
    if bank >= RULE_BANKS || len > 32 {
        return None;
    }
    let addr = [data[1], data[2], data[3], data[4]];
    Ipv4Net::new(addr.into(), len as u8).ok().map(|n| (bank, n))
}

/// The prefixes of `bank` among `keys`.
pub fn prefixes_in(
    bank: u32,
    keys: impl Iterator<Item = Result<Key<BankedPrefix>, aya::maps::MapError>>,
    map: &str,
) -> Result<Vec<Ipv4Net>> {
    let mut out = Vec::new();
    for k in keys {
        let k = k.with_context(|| format!("listing {map}"))?;
        match prefix_of(&k) {
            Some((b, prefix)) if b == bank => out.push(prefix),
            Some(_) => {}
            None => anyhow::bail!(
                "{map} holds a key no agent writes (prefix length {})",
                k.prefix_len()
            ),
        }
    }
    Ok(out)
}

/// Which bank is live and when the other one was last live.
#[derive(Debug, Clone, Copy, Default)]
pub struct BankState {
    /// The bank the program reads.
    pub active: u32,
    /// Whether any rule set has been written yet (before that, bank 0 is filled in place:
    /// nothing is attached).
    pub written: bool,
    /// When `active` last changed.
    pub flipped_at: Option<Instant>,
}

impl BankState {
    /// The bank the next rule set goes into.
    pub fn target(&self) -> u32 {
        if self.written {
            1 - self.active
        } else {
            self.active
        }
    }

    /// How long to wait before writing into [`Self::target`].
    pub fn wait_before_write(&self, now: Instant) -> Duration {
        match self.flipped_at {
            Some(at) if self.written => BANK_GRACE.saturating_sub(now.duration_since(at)),
            _ => Duration::ZERO,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_with_their_bank() {
        for bank in 0..RULE_BANKS {
            for p in ["0.0.0.0/0", "198.18.0.0/15", "203.0.113.7/32"] {
                let prefix: Ipv4Net = p.parse().unwrap();
                assert_eq!(prefix_of(&key(bank, prefix)), Some((bank, prefix)));
            }
        }
    }

    #[test]
    fn the_first_write_fills_bank_zero_then_banks_alternate() {
        let mut s = BankState::default();
        assert_eq!(s.target(), 0);
        assert_eq!(s.wait_before_write(Instant::now()), Duration::ZERO);
        s.written = true;
        s.flipped_at = Some(Instant::now());
        assert_eq!(s.target(), 1);
        assert!(s.wait_before_write(Instant::now()) > Duration::ZERO);
        s.active = 1;
        assert_eq!(s.target(), 0);
    }
}
