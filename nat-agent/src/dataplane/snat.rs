//! Writing the SNAT rules and pools, through [`SnatTables`] so the order of writes is plain
//! logic the tests drive with an in-memory table.

use std::collections::BTreeMap;

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{Array, LpmTrie, MapData},
    Ebpf,
};
use ipnet::Ipv4Net;
use nat_common::{
    conntrack::{Pool, SnatRuleSet},
    maps::{banked_pool, BankedPrefix, SNAT_POOLS, SNAT_RULES},
};

use super::bank;

/// Write access to one bank of `SNAT_RULES` and `SNAT_POOLS` (pool indexes and the pool ids in
/// the sets are the bank's own, from 0).
pub trait SnatTables {
    /// The source prefixes currently present.
    fn prefixes(&self) -> Result<Vec<Ipv4Net>>;
    /// Inserts or replaces the rule set of one prefix.
    fn put(&mut self, prefix: Ipv4Net, set: &SnatRuleSet) -> Result<()>;
    /// Removes one prefix.
    fn remove(&mut self, prefix: Ipv4Net) -> Result<()>;
    /// Writes pool `index`.
    fn put_pool(&mut self, index: u32, pool: &Pool) -> Result<()>;
}

/// Brings the SNAT tables to `sets` and `pools`. Pools go first, so a rule never points at a
/// pool that is not written yet; pools past the new count that an earlier config used
/// (`previous_pools`) are cleared last, when no rule refers to them any more.
pub fn reconcile_snat(
    tables: &mut impl SnatTables,
    sets: &BTreeMap<Ipv4Net, SnatRuleSet>,
    pools: &[Pool],
    previous_pools: usize,
) -> Result<()> {
    for (index, pool) in pools.iter().enumerate() {
        tables.put_pool(index as u32, pool)?;
    }
    for (prefix, set) in sets {
        tables.put(*prefix, set)?;
    }
    for stale in tables.prefixes()? {
        if !sets.contains_key(&stale) {
            tables.remove(stale)?;
        }
    }
    for index in pools.len()..previous_pools {
        tables.put_pool(index as u32, &Pool::default())?;
    }
    Ok(())
}

/// [`SnatTables`] over one bank of the kernel maps.
pub(super) struct KernelSnatTables<'a> {
    pub(super) ebpf: &'a mut Ebpf,
    pub(super) bank: u32,
}

impl KernelSnatTables<'_> {
    fn trie(&mut self) -> Result<LpmTrie<&mut MapData, BankedPrefix, SnatRuleSet>> {
        let map = self
            .ebpf
            .map_mut(SNAT_RULES)
            .ok_or_else(|| anyhow!("missing map {SNAT_RULES}"))?;
        LpmTrie::try_from(map).with_context(|| format!("opening {SNAT_RULES}"))
    }
}

impl SnatTables for KernelSnatTables<'_> {
    fn prefixes(&self) -> Result<Vec<Ipv4Net>> {
        let map = self
            .ebpf
            .map(SNAT_RULES)
            .ok_or_else(|| anyhow!("missing map {SNAT_RULES}"))?;
        let trie: LpmTrie<&MapData, BankedPrefix, SnatRuleSet> = LpmTrie::try_from(map)?;
        bank::prefixes_in(self.bank, trie.keys(), SNAT_RULES)
    }

    fn put(&mut self, prefix: Ipv4Net, set: &SnatRuleSet) -> Result<()> {
        let key = bank::key(self.bank, prefix);
        // The kernel reads pool ids as they are: point this bank's rules at its own pools.
        let mut set = *set;
        let base = banked_pool(self.bank, 0);
        for rule in set.rules.iter_mut() {
            rule.pool += base;
        }
        let bank = self.bank;
        self.trie()?
            .insert(&key, set, 0)
            .with_context(|| format!("writing {prefix} into bank {bank} of {SNAT_RULES}"))
    }

    fn remove(&mut self, prefix: Ipv4Net) -> Result<()> {
        let key = bank::key(self.bank, prefix);
        let bank = self.bank;
        self.trie()?
            .remove(&key)
            .with_context(|| format!("removing {prefix} from bank {bank} of {SNAT_RULES}"))
    }

    fn put_pool(&mut self, index: u32, pool: &Pool) -> Result<()> {
        let map = self
            .ebpf
            .map_mut(SNAT_POOLS)
            .ok_or_else(|| anyhow!("missing map {SNAT_POOLS}"))?;
        let mut pools: Array<&mut MapData, Pool> =
            Array::try_from(map).with_context(|| format!("opening {SNAT_POOLS}"))?;
        let id = banked_pool(self.bank, index);
        pools
            .set(id, pool, 0)
            .with_context(|| format!("writing {SNAT_POOLS}[{id}]"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every write, to check the order as well as the result.
    #[derive(Default)]
    struct FakeSnat {
        sets: BTreeMap<Ipv4Net, SnatRuleSet>,
        pools: BTreeMap<u32, Pool>,
        log: Vec<String>,
    }

    impl SnatTables for FakeSnat {
        fn prefixes(&self) -> Result<Vec<Ipv4Net>> {
            Ok(self.sets.keys().copied().collect())
        }
        fn put(&mut self, prefix: Ipv4Net, set: &SnatRuleSet) -> Result<()> {
            self.log.push(format!("set {prefix}"));
            self.sets.insert(prefix, *set);
            Ok(())
        }
        fn remove(&mut self, prefix: Ipv4Net) -> Result<()> {
            self.log.push(format!("remove {prefix}"));
            self.sets.remove(&prefix);
            Ok(())
        }
        fn put_pool(&mut self, index: u32, pool: &Pool) -> Result<()> {
            self.log.push(format!("pool {index}"));
            self.pools.insert(index, *pool);
            Ok(())
        }
    }

    #[test]
    fn pools_before_rules_and_stale_entries_cleared_after() {
        let mut t = FakeSnat::default();
        let old: Ipv4Net = "198.18.9.0/24".parse().unwrap();
        t.sets.insert(old, SnatRuleSet::default());
        let new: Ipv4Net = "198.18.0.0/24".parse().unwrap();
        let sets = BTreeMap::from([(
            new,
            SnatRuleSet {
                len: 1,
                ..Default::default()
            },
        )]);
        let pool = Pool {
            len: 1,
            ..Default::default()
        };
        reconcile_snat(&mut t, &sets, &[pool], 3).unwrap();
        assert_eq!(
            t.log,
            [
                "pool 0",
                "set 198.18.0.0/24",
                "remove 198.18.9.0/24",
                "pool 1",
                "pool 2"
            ]
        );
        assert_eq!(t.sets, sets);
        assert_eq!(t.pools[&0], pool);
        assert_eq!(t.pools[&2], Pool::default());
    }
}
